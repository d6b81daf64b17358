//! Preference losses on chosen/rejected pairs, with TRL's semantics: a micro-batch holds its
//! pairs' chosen rows first and their rejected rows after (as TRL concatenates them); each row's
//! log-probability is the sum over its answer tokens; the reference is the same model with the
//! adapters off, computed without gradients once per micro-batch (or ahead for the whole data set
//! with `train.precompute_ref`, then carried by each batch).
//!
//! With `d = (logπ(c) − logπ_ref(c)) − (logπ(r) − logπ_ref(r))`:
//! * dpo (TRL `sigmoid`): `−log σ(β d)`; with label smoothing ε, TRL's `robust`:
//!   `((1 − ε)(−log σ(β d)) + ε log σ(−β d)) / (1 − 2ε)`;
//! * ipo: `(d_avg − 1/(2β))²`, the log-ratios divided by each answer's token count;
//! * orpo (TRL's ORPOTrainer, no reference): with `a` each answer's log-probability divided by
//!   its token count, `NLL − β log σ(log odds(c) − log odds(r))`, `log odds = a − log(1 − eᵃ)`,
//!   and NLL the mean next-token loss over every token of the micro-batch's chosen rows, prompt
//!   included (as TRL computes it);
//! * kto (TRL's KTOTrainer): each row alone, desirable or not as its batch says
//!   ([`Batch::desirable`]: KTO's labels, a pair's chosen answer desirable):
//!   `w_d (1 − σ(β (r − z)))` or `w_u (1 − σ(β (z − r)))`, with `r = logπ − logπ_ref` of the row
//!   and `z` the KL estimate: the mean of `r` over the micro-batch's mismatched rows (each prompt
//!   with the previous row's answer), clamped at 0, without gradient.
//!
//! Rewards are `β (logπ − logπ_ref)` of each answer (orpo: `β a`), as TRL logs them.

use super::activations::Activations;
use super::Backward;
use crate::config::{Objective, TrainConfig};
use crate::data::format::IGNORE;
use crate::data::Batch;
use crate::model::{without_adapters, Decoder};
use indicatif::ProgressBar;
use tch::{Kind, Reduction, Tensor};

/// Declares a list of metric names and its validation twin: the same names in lorafit's `eval/`
/// section (where TRL's evaluation writes `eval_rewards/chosen`, ...).
macro_rules! metric_names {
    ($(#[$doc:meta])* $train:ident, $eval:ident = [$($name:literal),* $(,)?]) => {
        $(#[$doc])*
        pub const $train: [&str; [$($name),*].len()] = [$($name),*];
        #[doc = concat!("[`", stringify!($train), "`] of the validation data.")]
        pub const $eval: [&str; [$($name),*].len()] = [$(concat!("eval/", $name)),*];
    };
}

metric_names! {
    /// The metrics each pair contributes (summed over pairs, divided by the step's pairs), by the
    /// names TRL logs them under.
    PAIR_METRICS, EVAL_PAIR_METRICS = [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ]
}

metric_names! {
    /// ORPO's metrics: [`PAIR_METRICS`] and the odds-ratio terms TRL's ORPOTrainer logs.
    ORPO_METRICS, EVAL_ORPO_METRICS = [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "nll_loss",
        "log_odds_ratio",
        "log_odds_chosen",
    ]
}

metric_names! {
    /// KTO's metrics, as TRL's KTOTrainer logs them: means over the micro-batch's desirable
    /// (`chosen`) or undesirable (`rejected`) rows, and the KL estimate.
    KTO_METRICS, EVAL_KTO_METRICS = [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "kl",
    ]
}

/// The preference loss's settings.
#[derive(Debug, Clone, Copy)]
pub struct PreferenceLoss {
    pub objective: Objective,
    pub beta: f64,
    pub label_smoothing: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

/// What KTO's loss needs besides the rows' log-probabilities: the KL estimate (a detached
/// scalar) and which rows are desirable (`[rows]`, bool).
struct Kto {
    kl: Tensor,
    desirable: Tensor,
}

/// One forward pass's per-row sums of answer log-probabilities (`[rows]`, fp32) and answer
/// token counts, with ORPO's NLL over the chosen rows when asked for.
struct RowLogps<'a> {
    logps: Tensor,
    tokens: Tensor,
    nll: Option<Tensor>,
    blocks: Activations<'a>,
}

impl PreferenceLoss {
    pub fn of(cfg: &TrainConfig) -> PreferenceLoss {
        PreferenceLoss {
            objective: cfg.objective,
            beta: cfg.beta,
            label_smoothing: cfg.label_smoothing,
            desirable_weight: cfg.desirable_weight,
            undesirable_weight: cfg.undesirable_weight,
        }
    }

    /// Whether the objective compares against a reference (the model with its adapters off):
    /// all but ORPO.
    pub fn uses_reference(&self) -> bool {
        self.objective != Objective::Orpo
    }

    /// The names of the metrics [`Self::pair_loss`] sums, as TRL logs them.
    pub fn metric_names(&self) -> &'static [&'static str] {
        match self.objective {
            Objective::Orpo => &ORPO_METRICS,
            Objective::Kto => &KTO_METRICS,
            _ => &PAIR_METRICS,
        }
    }

    /// [`Self::metric_names`] of the validation data, in lorafit's `eval/` section.
    pub fn eval_metric_names(&self) -> &'static [&'static str] {
        match self.objective {
            Objective::Orpo => &EVAL_ORPO_METRICS,
            Objective::Kto => &EVAL_KTO_METRICS,
            _ => &EVAL_PAIR_METRICS,
        }
    }

    /// What the loss is a mean over in `batch`: its pairs, or for KTO (each answer alone, as
    /// TRL averages it) its rows.
    pub fn units(&self, batch: &Batch) -> i64 {
        let rows = batch.input_ids.size()[0];
        if self.objective == Objective::Kto {
            rows
        } else {
            rows / 2
        }
    }

    /// What [`Self::units`] counts, as reports name it: "pairs", or "answers" for KTO.
    pub fn unit_name(&self) -> &'static str {
        if self.objective == Objective::Kto {
            "answers"
        } else {
            "pairs"
        }
    }

    /// The loss summed over the units of `batch` (fp32 scalar, detached) and the sums of
    /// [`Self::metric_names`] over them, accumulating the gradient of `scale · loss` when
    /// `backward` is given.
    pub fn pair_loss(&self, model: &Decoder, batch: &Batch, backward: Option<Backward>) -> (Tensor, Tensor) {
        let reference = self.uses_reference().then(|| {
            batch
                .reference_logps
                .as_ref()
                .map_or_else(|| reference_logps(model, batch), Tensor::shallow_clone)
        });
        let kto = (self.objective == Objective::Kto).then(|| Kto {
            kl: kl_estimate(model, &batch.mismatched()),
            desirable: Tensor::from_slice(&batch.desirable).to_device(batch.input_ids.device()),
        });
        let orpo = self.objective == Objective::Orpo;
        let train = backward.is_some();
        let checkpointing = backward.is_some_and(|b| b.checkpointing);
        let rows = row_logps(model, batch, train, checkpointing, orpo);
        let (loss, metrics) = self.losses(&rows, reference.as_ref(), kto.as_ref());
        if let Some(b) = backward {
            (&loss * b.scale).backward();
            rows.blocks.backward(model);
        }
        (loss.detach(), metrics)
    }

    /// Without gradients over `batches`: `[loss sum, units, metric sums...]`, advancing `bar` by
    /// one per batch.
    pub fn evaluate_sums(&self, model: &Decoder, batches: &[Batch], bar: &ProgressBar) -> Vec<f64> {
        let mut sums = vec![0.0; 2 + self.metric_names().len()];
        tch::no_grad(|| {
            for batch in batches {
                let (loss, metrics) = self.pair_loss(model, batch, None);
                sums[0] += loss.double_value(&[]);
                sums[1] += self.units(batch) as f64;
                for (i, sum) in sums[2..].iter_mut().enumerate() {
                    *sum += metrics.double_value(&[i as i64]);
                }
                bar.inc(1);
            }
        });
        bar.finish_and_clear();
        sums
    }

    /// The summed loss (with its graph) and the metric sums (detached) of one micro-batch.
    fn losses(&self, rows: &RowLogps, reference: Option<&Tensor>, kto: Option<&Kto>) -> (Tensor, Tensor) {
        let (logps, tokens) = (&rows.logps, &rows.tokens);
        let detached = logps.detach();
        let sums =
            |ts: Vec<Tensor>| Tensor::stack(&ts.iter().map(|t| t.sum(Kind::Float)).collect::<Vec<_>>(), 0);
        match (self.objective, reference, kto, &rows.nll) {
            (Objective::Orpo, _, _, Some(nll)) => {
                let averages = logps / tokens.clamp_min(1.0);
                let [c, r] = halves(&averages);
                let log_odds = (&c - &r) - (log1mexp(&c) - log1mexp(&r));
                let ratio = log_odds.log_sigmoid();
                let pairs = c.size()[0] as f64;
                let loss = nll * pairs - (&ratio * self.beta).sum(Kind::Float);
                let [ac, ar] = halves(&averages.detach());
                let mut metrics = pair_metrics(&(&averages.detach() * self.beta), &ac, &ar);
                metrics.extend([nll.detach() * pairs, ratio.detach(), log_odds.detach()]);
                (loss, sums(metrics))
            }
            (Objective::Kto, Some(reference), Some(Kto { kl, desirable }), _) => {
                let ratios = logps - reference;
                let chosen = (-((&ratios - kl) * self.beta).sigmoid() + 1.0) * self.desirable_weight;
                let rejected = (-((kl - &ratios) * self.beta).sigmoid() + 1.0) * self.undesirable_weight;
                let loss = chosen.where_self(desirable, &rejected).sum(Kind::Float);
                (loss, kto_metrics(&(ratios.detach() * self.beta), &detached, kl, desirable))
            }
            (_, Some(reference), _, _) => {
                let per_pair = self.per_pair_loss(logps, reference, tokens);
                let [lc, lr] = halves(&detached);
                let metrics = pair_metrics(&((&detached - reference) * self.beta), &lc, &lr);
                (per_pair.sum(Kind::Float), sums(metrics))
            }
            _ => unreachable!("pair_loss computes what {} needs", self.objective),
        }
    }

    /// Each pair's DPO or IPO loss (`[pairs]`).
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
}

/// Per pair, [`PAIR_METRICS`] from the rows' rewards and log-probabilities (chosen, rejected).
fn pair_metrics(rewards: &Tensor, chosen_logps: &Tensor, rejected_logps: &Tensor) -> Vec<Tensor> {
    let [rc, rr] = halves(rewards);
    let wins = rc.gt_tensor(&rr).to_kind(Kind::Float);
    let margin = &rc - &rr;
    vec![rc, rr, wins, margin, chosen_logps.shallow_clone(), rejected_logps.shallow_clone()]
}

/// [`KTO_METRICS`] of a micro-batch, as TRL computes them for it, times its rows (so that the
/// step's mean over rows weighs micro-batches as TRL's mean over them does at equal sizes).
/// TRL logs no chosen (rejected) metrics for a micro-batch without desirable (undesirable)
/// rows, and no margin without both; here such a micro-batch adds 0 to them.
fn kto_metrics(rewards: &Tensor, logps: &Tensor, kl: &Tensor, desirable: &Tensor) -> Tensor {
    let rows = rewards.size()[0] as f64;
    let chosen = desirable.to_kind(Kind::Float);
    let rejected = desirable.logical_not().to_kind(Kind::Float);
    // Means over the rows of one kind, 0 where the micro-batch has none.
    let mean_of =
        |t: &Tensor, kind: &Tensor| (t * kind).sum(Kind::Float) / kind.sum(Kind::Float).clamp_min(1.0);
    let both = (chosen.sum(Kind::Float).gt(0.0).logical_and(&rejected.sum(Kind::Float).gt(0.0)))
        .to_kind(Kind::Float);
    let [rc, rr, lc, lr] = [(rewards, &chosen), (rewards, &rejected), (logps, &chosen), (logps, &rejected)]
        .map(|(t, k)| mean_of(t, k));
    let margin = (&rc - &rr) * both;
    Tensor::stack(&[rc, rr, margin, lc, lr, kl.shallow_clone()], 0) * rows
}

/// KTO's KL estimate on the mismatched rows: the mean of `logπ − logπ_ref` over them, clamped at
/// 0, without gradient.
fn kl_estimate(model: &Decoder, mismatched: &Batch) -> Tensor {
    tch::no_grad(|| {
        let policy = row_logps(model, mismatched, false, false, false).logps;
        let reference = without_adapters(|| row_logps(model, mismatched, false, false, false).logps);
        (policy - reference).mean(Kind::Float).clamp_min(0.0)
    })
}

/// `log(1 − eˣ)` for `x < 0`, as TRL's `log1mexp` computes it (two forms, each stable on its side
/// of `−ln 2`).
fn log1mexp(x: &Tensor) -> Tensor {
    let near = (-x.expm1()).log();
    let far = (-x.exp()).log1p();
    far.where_self(&x.lt(-std::f64::consts::LN_2), &near)
}

/// Each row's summed log-probability under the reference: the model with its adapters off,
/// without gradients (`[rows]`, fp32).
pub fn reference_logps(model: &Decoder, batch: &Batch) -> Tensor {
    tch::no_grad(|| without_adapters(|| row_logps(model, batch, false, false, false).logps))
}

/// The chosen (first) and rejected (second) halves of a per-row tensor.
fn halves(t: &Tensor) -> [Tensor; 2] {
    let pairs = t.size()[0] / 2;
    [t.narrow(0, 0, pairs), t.narrow(0, pairs, pairs)]
}

/// Each row's summed log-probability of its target tokens and its target count, the blocks'
/// activations for the backward pass, and with `chosen_nll` ORPO's NLL: the mean next-token loss
/// over every real token of the chosen (first half of the) rows.
fn row_logps<'a>(
    model: &Decoder,
    batch: &'a Batch,
    train: bool,
    checkpointing: bool,
    chosen_nll: bool,
) -> RowLogps<'a> {
    let blocks = Activations::forward(model, batch, train, checkpointing);
    let hidden = model.final_norm(&blocks.output);
    let width = *hidden.size().last().expect("hidden states have a width");
    let hidden = hidden.reshape([-1, width]);
    let [rows, seq] = [0, 1].map(|i| batch.input_ids.size()[i]);
    let logits = model.logits(&hidden.index_select(0, &batch.target_positions), train);
    let token_logps =
        -logits.cross_entropy_loss(&batch.target_ids, None::<Tensor>, Reduction::None, IGNORE, 0.0);
    let row = batch.target_positions.divide_scalar_mode(seq, "floor");
    let zeros = Tensor::zeros([rows], (Kind::Float, token_logps.device()));
    let logps = zeros.index_add(0, &row, &token_logps);
    let tokens = zeros.index_add(0, &row, &token_logps.ones_like());
    let nll = chosen_nll.then(|| {
        let positions: Vec<i64> = (0..rows / 2)
            .flat_map(|r| (0..batch.lengths[r as usize] - 1).map(move |p| r * seq + p))
            .collect();
        let positions = Tensor::from_slice(&positions).to_device(hidden.device());
        let targets = batch.input_ids.reshape([-1]).index_select(0, &(&positions + 1));
        let logits = model.logits(&hidden.index_select(0, &positions), train);
        logits.cross_entropy_loss(&targets, None::<Tensor>, Reduction::Mean, IGNORE, 0.0)
    });
    RowLogps { logps, tokens, nll, blocks }
}
