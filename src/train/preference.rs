//! Preference losses on chosen/rejected pairs, with TRL's DPOTrainer semantics: a micro-batch
//! holds its pairs' chosen rows first and their rejected rows after (as TRL concatenates them);
//! each row's log-probability is the sum over its answer tokens; the reference is the same
//! model with the adapters off, computed without gradients once per micro-batch (or ahead for
//! the whole data set with `train.precompute_ref`, then carried by each batch).
//!
//! With `d = (logπ(c) − logπ_ref(c)) − (logπ(r) − logπ_ref(r))`:
//! * dpo (TRL `sigmoid`): `−log σ(β d)`; with label smoothing ε, TRL's `robust`:
//!   `((1 − ε)(−log σ(β d)) + ε log σ(−β d)) / (1 − 2ε)`;
//! * ipo: `(d_avg − 1/(2β))²`, the log-ratios divided by each answer's token count.
//!
//! Rewards are `β (logπ − logπ_ref)` of each answer, as TRL logs them.

use super::activations::Activations;
use super::Backward;
use crate::config::{Objective, TrainConfig};
use crate::data::format::IGNORE;
use crate::data::Batch;
use crate::model::{without_adapters, Decoder};
use indicatif::ProgressBar;
use tch::{Kind, Reduction, Tensor};

/// The metrics each pair contributes (summed over pairs, divided by the step's pairs), by the
/// names TRL logs them under.
pub const PAIR_METRICS: [&str; 6] = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
];

/// [`PAIR_METRICS`] of the validation pairs, as TRL's evaluation names them (`eval_rewards/...`)
/// in lorafit's `eval/` section.
pub const EVAL_PAIR_METRICS: [&str; 6] = [
    "eval/rewards/chosen",
    "eval/rewards/rejected",
    "eval/rewards/accuracies",
    "eval/rewards/margins",
    "eval/logps/chosen",
    "eval/logps/rejected",
];

/// The preference loss's settings.
#[derive(Debug, Clone, Copy)]
pub struct PreferenceLoss {
    pub objective: Objective,
    pub beta: f64,
    pub label_smoothing: f64,
}

impl PreferenceLoss {
    pub fn of(cfg: &TrainConfig) -> PreferenceLoss {
        PreferenceLoss { objective: cfg.objective, beta: cfg.beta, label_smoothing: cfg.label_smoothing }
    }

    /// The summed loss over the pairs of `batch` (fp32 scalar, detached) and the sums of
    /// [`PAIR_METRICS`] (`[6]`), accumulating the gradient of `scale · loss` when `backward` is
    /// given.
    pub fn pair_loss(&self, model: &Decoder, batch: &Batch, backward: Option<Backward>) -> (Tensor, Tensor) {
        let reference = batch
            .reference_logps
            .as_ref()
            .map_or_else(|| reference_logps(model, batch), Tensor::shallow_clone);
        let train = backward.is_some();
        let checkpointing = backward.is_some_and(|b| b.checkpointing);
        let (logps, tokens, blocks) = row_logps(model, batch, train, checkpointing);
        let per_pair = self.per_pair_loss(&logps, &reference, &tokens);
        let loss = per_pair.sum(Kind::Float);
        if let Some(b) = backward {
            (&loss * b.scale).backward();
            blocks.backward(model);
        }
        (loss.detach(), self.metrics(&logps.detach(), &reference))
    }

    /// Without gradients over `batches` of pairs: `[loss sum, pairs, PAIR_METRICS sums...]`,
    /// advancing `bar` by one per batch.
    pub fn evaluate_sums(&self, model: &Decoder, batches: &[Batch], bar: &ProgressBar) -> Vec<f64> {
        let mut sums = vec![0.0; 2 + PAIR_METRICS.len()];
        tch::no_grad(|| {
            for batch in batches {
                let (loss, metrics) = self.pair_loss(model, batch, None);
                sums[0] += loss.double_value(&[]);
                sums[1] += (batch.input_ids.size()[0] / 2) as f64;
                for (i, sum) in sums[2..].iter_mut().enumerate() {
                    *sum += metrics.double_value(&[i as i64]);
                }
                bar.inc(1);
            }
        });
        bar.finish_and_clear();
        sums
    }

    /// Each pair's loss (`[pairs]`).
    pub fn per_pair_loss(&self, logps: &Tensor, reference: &Tensor, tokens: &Tensor) -> Tensor {
        let ratios = logps - reference;
        match self.objective {
            Objective::Ipo => {
                let [c, r] = halves(&(ratios / tokens.clamp_min(1.0)));
                (c - r - 1.0 / (2.0 * self.beta)).square()
            }
            _ => {
                let [c, r] = halves(&ratios);
                let d = (c - r) * self.beta;
                let eps = self.label_smoothing;
                let clean = -d.log_sigmoid() * (1.0 - eps);
                let flipped = -(-&d).log_sigmoid() * eps;
                (clean - flipped) / (1.0 - 2.0 * eps)
            }
        }
    }

    /// Sums over pairs of [`PAIR_METRICS`].
    fn metrics(&self, logps: &Tensor, reference: &Tensor) -> Tensor {
        let rewards = (logps - reference) * self.beta;
        let ([rc, rr], [lc, lr]) = (halves(&rewards), halves(logps));
        let wins = rc.gt_tensor(&rr).to_kind(Kind::Float);
        let margin = &rc - &rr;
        Tensor::stack(&[rc, rr, wins, margin, lc, lr].map(|t| t.sum(Kind::Float)), 0)
    }
}

/// Each row's summed log-probability under the reference: the model with its adapters off,
/// without gradients (`[rows]`, fp32).
pub fn reference_logps(model: &Decoder, batch: &Batch) -> Tensor {
    tch::no_grad(|| without_adapters(|| row_logps(model, batch, false, false).0))
}

/// The chosen (first) and rejected (second) halves of a per-row tensor.
fn halves(t: &Tensor) -> [Tensor; 2] {
    let pairs = t.size()[0] / 2;
    [t.narrow(0, 0, pairs), t.narrow(0, pairs, pairs)]
}

/// Each row's summed log-probability of its target tokens (`[rows]`, fp32), its target count
/// (`[rows]`, fp32), and the blocks' activations for the backward pass.
fn row_logps<'a>(
    model: &Decoder,
    batch: &'a Batch,
    train: bool,
    checkpointing: bool,
) -> (Tensor, Tensor, Activations<'a>) {
    let blocks = Activations::forward(model, batch, train, checkpointing);
    let hidden = model.final_norm(&blocks.output);
    let width = *hidden.size().last().expect("hidden states have a width");
    let [rows, seq] = [0, 1].map(|i| batch.input_ids.size()[i]);
    let logits = model.logits(&hidden.reshape([-1, width]).index_select(0, &batch.target_positions), train);
    let token_logps =
        -logits.cross_entropy_loss(&batch.target_ids, None::<Tensor>, Reduction::None, IGNORE, 0.0);
    let row = batch.target_positions.divide_scalar_mode(seq, "floor");
    let zeros = Tensor::zeros([rows], (Kind::Float, token_logps.device()));
    let logps = zeros.index_add(0, &row, &token_logps);
    let tokens = zeros.index_add(0, &row, &token_logps.ones_like());
    (logps, tokens, blocks)
}
