//! The training loop: micro-batches → summed token loss → AdamW on the adapter tensors only.
//!
//! One optimizer step's loss is the mean over every label token of all its micro-batches: each
//! micro-batch contributes `sum(token NLL) / total label tokens of the step`, so gradient
//! accumulation gives the same update as one large batch (not a mean of per-batch means).

pub mod activations;
pub mod checkpoint;
pub mod data_commands;
pub mod distill;
pub mod distill_cache;
pub mod eval;
pub mod interrupt;
pub mod memory;
pub mod optim;
pub mod precision;
pub mod preference;
pub mod resume;
pub mod run;
pub mod scaler;
pub mod schedule;
mod steps;

use crate::config::{Precision, TrainConfig};
use crate::data::format::IGNORE;
use crate::data::Batch;
use crate::dist::Group;
use crate::model::Decoder;
use activations::Activations;
use anyhow::Result;
use distill::{Distiller, DISTILL_METRICS};
use optim::AdamW;
use preference::PreferenceLoss;
use scaler::{LossScaler, GRAD_SCALER_DEFAULTS};
use std::sync::Arc;
use tch::{Kind, Reduction, Tensor};

/// fp32 logits computed at once in the loss: 16M of them (64 MB), whatever the vocabulary, so
/// full-vocabulary logits of a whole batch (400 MB for 4 × 512 tokens of a 49k vocabulary, and as
/// much again for their gradient) never exist.
const LOGITS_PER_CHUNK: i64 = 16 << 20;

/// The gradient [`token_loss`] accumulates into the adapters besides computing the loss.
#[derive(Debug, Clone, Copy)]
pub struct Backward {
    /// The gradient is that of `scale · loss`.
    pub scale: f64,
    /// Activation checkpointing (see [`activations`]).
    pub checkpointing: bool,
}

/// Summed next-token NLL (fp32 scalar, detached) over the label tokens of `batch`, with dropout
/// and gradients when `backward` is given.
///
/// Logits are computed only at the positions whose next token is a target, a chunk of rows at a
/// time; each chunk's backward runs at once into a detached copy of the hidden states, and their
/// summed gradient then goes through the blocks of the model in one backward pass.
pub fn token_loss(model: &Decoder, batch: &Batch, backward: Option<Backward>) -> Tensor {
    token_loss_in_chunks(model, batch, backward, (LOGITS_PER_CHUNK / model.spec.vocab_size).max(1))
}

/// [`token_loss`] with logits for `rows_per_chunk` target positions at a time.
pub fn token_loss_in_chunks(
    model: &Decoder,
    batch: &Batch,
    backward: Option<Backward>,
    rows_per_chunk: i64,
) -> Tensor {
    head_loss_in_chunks(model, batch, backward, rows_per_chunk, |logits, start| {
        let ids = batch.target_ids.narrow(0, start, logits.size()[0]);
        logits.cross_entropy_loss(&ids, None::<Tensor>, Reduction::Sum, IGNORE, 0.0)
    })
}

/// The sum over chunks of `chunk_loss(logits, start)`, where `logits` (fp32) are those of the
/// `rows_per_chunk` target positions from the `start`-th on, with the gradient of `scale · loss`
/// accumulated into the adapters when `backward` is given (see [`token_loss`]).
pub(crate) fn head_loss_in_chunks(
    model: &Decoder,
    batch: &Batch,
    backward: Option<Backward>,
    rows_per_chunk: i64,
    mut chunk_loss: impl FnMut(&Tensor, i64) -> Tensor,
) -> Tensor {
    let train = backward.is_some();
    let blocks = Activations::forward(model, batch, train, backward.is_some_and(|b| b.checkpointing));
    let hidden = model.final_norm(&blocks.output);
    let width = *hidden.size().last().expect("hidden states have a width");
    let hidden = hidden.reshape([-1, width]);
    let head_input = if train { hidden.detach().set_requires_grad(true) } else { hidden.shallow_clone() };
    let targets = batch.target_ids.numel() as i64;
    let mut total = Tensor::zeros([], (Kind::Float, hidden.device()));
    for start in (0..targets).step_by(rows_per_chunk as usize) {
        let rows = rows_per_chunk.min(targets - start);
        let positions = batch.target_positions.narrow(0, start, rows);
        let logits = model.logits(&head_input.index_select(0, &positions), train);
        let loss = chunk_loss(&logits, start);
        if let Some(b) = backward {
            (&loss * b.scale).backward();
        }
        total += loss.detach();
    }
    let head_grad = head_input.grad();
    if train && head_grad.defined() && hidden.requires_grad() {
        (hidden * head_grad).sum(Kind::Float).backward();
        blocks.backward(model);
    }
    total
}

/// Mean token NLL over `batches` without gradients or dropout: (loss, label tokens).
pub fn evaluate(model: &Decoder, batches: &[Batch]) -> (f64, i64) {
    evaluate_with_progress(model, batches, &indicatif::ProgressBar::hidden())
}

/// [`evaluate`], advancing `bar` by one per batch.
pub fn evaluate_with_progress(
    model: &Decoder,
    batches: &[Batch],
    bar: &indicatif::ProgressBar,
) -> (f64, i64) {
    let (total, tokens) = evaluate_sums(model, batches, bar);
    (total / tokens.max(1) as f64, tokens)
}

/// The summed token NLL over `batches` and their label tokens (what ranks add up to evaluate a
/// data-parallel run), advancing `bar` by one per batch.
pub fn evaluate_sums(model: &Decoder, batches: &[Batch], bar: &indicatif::ProgressBar) -> (f64, i64) {
    let tokens: i64 = batches.iter().map(|b| b.label_tokens).sum();
    let total = tch::no_grad(|| {
        let mut total = 0.0;
        for b in batches {
            total += token_loss(model, b, None).double_value(&[]);
            bar.inc(1);
        }
        total
    });
    bar.finish_and_clear();
    (total, tokens)
}

/// What one optimizer step did.
pub struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
    /// False when a non-finite loss or gradient kept the update from being applied.
    pub applied: bool,
    /// The update was skipped by the loss scaler: the scaled gradient overflowed while the loss
    /// stayed finite, which fp16-mixed expects now and then (the scale backs off).
    pub overflow: bool,
    /// The loss scale this step ran with (fp16-mixed only).
    pub loss_scale: Option<f64>,
    pub label_tokens: i64,
    pub real_tokens: i64,
    pub padded_tokens: i64,
    /// The objective's metrics by name, averaged over the step's loss units: the preference
    /// objective's (per pair; KTO: per answer) or [`DISTILL_METRICS`] (per label token); none for
    /// SFT.
    pub metrics: Vec<(&'static str, f64)>,
}

/// The adapter parameters with their optimizer (and, for fp16-mixed, the loss scaler), and the
/// group of a data-parallel run.
pub struct Trainer {
    pub params: Vec<Tensor>,
    pub optimizer: AdamW,
    pub scaler: Option<LossScaler>,
    max_grad_norm: Option<f64>,
    checkpointing: bool,
    /// The loss of a preference objective; `None` for SFT.
    preference: Option<PreferenceLoss>,
    /// The teacher and loss of distillation; `None` for the other objectives.
    distill: Option<Distiller>,
    /// The other ranks of a data-parallel run: each step's token counts and gradients are
    /// summed across them.
    pub group: Option<Arc<Group>>,
}

/// The loss units (label tokens or pairs), label, real and padded tokens of a step's micro-batches.
type TokenCounts = [i64; 4];

impl Trainer {
    /// `cfg.precision` is the resolved one: fp16-mixed gets a loss scaler.
    pub fn new(params: Vec<Tensor>, cfg: &TrainConfig) -> Trainer {
        let optimizer = AdamW::new(&params, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps, cfg.weight_decay);
        let device = params.first().map_or(tch::Device::Cpu, |p| p.device());
        let scaler =
            (cfg.precision == Precision::Fp16Mixed).then(|| LossScaler::new(GRAD_SCALER_DEFAULTS, device));
        Trainer {
            params,
            optimizer,
            scaler,
            max_grad_norm: cfg.max_grad_norm,
            checkpointing: cfg.gradient_checkpointing,
            preference: cfg.objective.is_preference().then(|| PreferenceLoss::of(cfg)),
            distill: None,
            group: None,
        }
    }

    /// Distills from `distiller`'s teacher instead of the SFT loss.
    pub fn distill_from(&mut self, distiller: Distiller) {
        self.distill = Some(distiller);
    }

    /// The teacher and loss of distillation, when the objective distills.
    pub fn distiller(&self) -> Option<&Distiller> {
        self.distill.as_ref()
    }

    /// The names of the metrics each step reports besides the loss.
    fn metric_names(&self) -> &'static [&'static str] {
        match (&self.preference, &self.distill) {
            (Some(p), _) => p.metric_names(),
            (None, Some(_)) => &DISTILL_METRICS,
            (None, None) => &[],
        }
    }

    /// What validation computes for this trainer's objective.
    pub fn eval_loss(&self) -> eval::EvalLoss<'_> {
        match (&self.preference, &self.distill) {
            (Some(p), _) => eval::EvalLoss::Preference(p),
            (None, Some(d)) => eval::EvalLoss::Distill(d),
            (None, None) => eval::EvalLoss::Tokens,
        }
    }

    /// (rank, world size): (0, 1) for a single process.
    pub fn rank_world(&self) -> (usize, usize) {
        self.group.as_ref().map_or((0, 1), |g| (g.rank, g.world))
    }

    /// Forward and backward over this process's micro-batches of one step, leaving the gradient
    /// of `loss_scale` × its share of the step loss in `.grad()`; `seeds[i]` seeds micro-batch
    /// i's dropout (`None`: the current random stream goes on). Returns its share of the step
    /// loss (summed NLL over the label tokens of every rank's micro-batches, divided by their
    /// count, unscaled) as a scalar tensor on the model's device, so nothing waits for it here,
    /// and the token counts of the whole step.
    pub fn accumulate(
        &mut self,
        model: &Decoder,
        micro_batches: &[Batch],
        seeds: Option<&[i64]>,
        loss_scale: f64,
    ) -> Result<(Tensor, TokenCounts, Tensor)> {
        let counts = self.step_token_counts(micro_batches)?;
        let device = self.params.first().map_or(tch::Device::Cpu, |p| p.device());
        let mut step_loss = Tensor::zeros([], (Kind::Float, device));
        let mut metrics = Tensor::zeros([self.metric_names().len() as i64], (Kind::Float, device));
        let scale = 1.0 / counts[0].max(1) as f64;
        let backward = Backward { scale: scale * loss_scale, checkpointing: self.checkpointing };
        for (i, batch) in micro_batches.iter().enumerate() {
            if let Some(seed) = seeds.and_then(|s| s.get(i)) {
                tch::manual_seed(*seed);
            }
            let (loss, batch_metrics) = self.micro_batch_loss(model, batch, backward);
            step_loss = &step_loss + loss * scale;
            if let Some(m) = batch_metrics {
                metrics += m * scale;
            }
        }
        Ok((step_loss, counts, metrics))
    }

    /// The counts of the step: this process's micro-batches, summed across the group. The first
    /// is what the step loss is a mean over: label tokens, or pairs for a preference objective.
    fn step_token_counts(&self, micro_batches: &[Batch]) -> Result<TokenCounts> {
        let mut counts = [0i64; 4];
        for b in micro_batches {
            counts[0] += match &self.preference {
                Some(p) => p.units(b),
                None => b.label_tokens,
            };
            counts[1] += b.label_tokens;
            counts[2] += b.real_tokens;
            counts[3] += b.padded_tokens;
        }
        let Some(group) = &self.group else { return Ok(counts) };
        let summed = Tensor::from_slice(&counts);
        group.all_reduce_sum(std::slice::from_ref(&summed))?;
        Ok([0, 1, 2, 3].map(|i| summed.int64_value(&[i])))
    }

    /// One full optimizer step: accumulate, sum across the group, unscale (fp16-mixed), clip,
    /// update, zero the gradients. A non-finite loss or gradient leaves the adapter and optimizer
    /// untouched (`applied: false`). The host waits for the device once, for the loss and
    /// gradient norm.
    pub fn step(
        &mut self,
        model: &Decoder,
        micro_batches: &[Batch],
        seeds: Option<&[i64]>,
        lr: f64,
    ) -> Result<StepStats> {
        let loss_scale = self.scaler.as_ref().map(LossScaler::scale);
        let (loss, counts, metrics) =
            self.accumulate(model, micro_batches, seeds, loss_scale.unwrap_or(1.0))?;
        // The step loss and the pair metrics' shares, summed over the ranks with the gradients.
        let sums = Tensor::cat(&[loss.reshape([1]), metrics], 0);
        let sums = reduce_gradients(&self.params, sums, self.group.as_deref())?;
        let found_inf = self.scaler.as_ref().map(|s| s.unscale(&self.params));
        let norm = optim::grad_norm(&self.params);
        let read = Tensor::cat(&[norm.reshape([1]), sums.to_device(norm.device()).to_kind(Kind::Double)], 0);
        let (grad_norm, loss) = (read.double_value(&[0]), read.double_value(&[1]));
        let metrics = self
            .metric_names()
            .iter()
            .enumerate()
            .map(|(i, &name)| (name, read.double_value(&[i as i64 + 2])))
            .collect();
        let applied = loss.is_finite() && grad_norm.is_finite();
        if applied {
            if let Some(max) = self.max_grad_norm {
                optim::clip_grads(&self.params, &norm, max);
            }
            self.optimizer.update(&mut self.params, lr);
        }
        if let (Some(scaler), Some(found_inf)) = (self.scaler.as_mut(), found_inf) {
            scaler.update(&found_inf);
        }
        optim::zero_grads(&self.params);
        let [_, label_tokens, real_tokens, padded_tokens] = counts;
        Ok(StepStats {
            loss,
            grad_norm,
            applied,
            overflow: loss_scale.is_some() && !grad_norm.is_finite() && loss.is_finite(),
            loss_scale,
            label_tokens,
            real_tokens,
            padded_tokens,
            metrics,
        })
    }
}

impl Trainer {
    /// The training objective: the summed loss of one micro-batch, its gradient (of
    /// `scale · loss`) accumulated into the adapters; with a preference or distillation
    /// objective, the sums of its metrics.
    fn micro_batch_loss(
        &self,
        model: &Decoder,
        batch: &Batch,
        backward: Backward,
    ) -> (Tensor, Option<Tensor>) {
        if let Some(p) = &self.preference {
            let (loss, metrics) = p.pair_loss(model, batch, Some(backward));
            return (loss, Some(metrics));
        }
        if let Some(d) = &self.distill {
            let (loss, metrics) = d.batch_loss(model, batch, Some(backward));
            return (loss, Some(metrics));
        }
        (token_loss(model, batch, Some(backward)), None)
    }
}

/// Called once a step's gradients are accumulated, before clipping and the update: in a
/// data-parallel run, sums the adapter gradients and `sums` (the step loss, then the pair
/// metrics' shares: every rank's, not only this one's) across the group in one collective
/// (`sums` rides along in the gradients' dtype and device). Returns the summed `sums`.
fn reduce_gradients(params: &[Tensor], sums: Tensor, group: Option<&Group>) -> Result<Tensor> {
    let Some(group) = group else { return Ok(sums) };
    let mut tensors: Vec<Tensor> = params.iter().map(|p| p.grad()).filter(|g| g.defined()).collect();
    let like = tensors.first().map_or((Kind::Float, tch::Device::Cpu), |g| (g.kind(), g.device()));
    let sums = sums.to_device(like.1).to_kind(like.0);
    tensors.push(sums.shallow_clone());
    group.all_reduce_sum(&tensors)?;
    Ok(sums)
}
