//! Distillation from a teacher (`train.objective: distill`): at each label position, with the
//! teacher's and the student's distributions softened by the temperature T,
//!
//! `loss = alpha · CE(student, label) + (1 − alpha) · T² · D(teacher_T ‖ student_T)`,
//!
//! summed over the label tokens and divided by the step's label tokens like the SFT loss, so
//! gradient accumulation stays exact. D is forward KL (`Σ p_t (log p_t − log p_s)`, torchtune's
//! knowledge-distillation recipe), reverse KL (`Σ p_s (log p_s − log p_t)`), or TRL's generalised
//! JSD with the teacher's weight β: `β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m)`, `m = β p_t + (1 − β) p_s`.
//! T² keeps the soft term's gradient on the scale of the CE's as T grows (Hinton et al.).
//!
//! The teacher is a second model without adapters, frozen in the student's weight dtype; it
//! runs without gradients on the same batch, and its logits are computed chunk by chunk beside
//! the student's, so neither model's full-vocabulary logits of the batch ever exist.
//! With `distill.cache` the teacher's top-k log-probabilities come from disk instead
//! ([`super::distill_cache`]) and D is that of the distributions coarsened to the top k and the
//! rest ([`DistillLoss::top_k_divergence`]).

use super::activations::Activations;
use super::distill_cache::TeacherCache;
use super::{head_loss_in_chunks, Backward, LOGITS_PER_CHUNK};
use crate::config::{Config, DistillConfig, Divergence};
use crate::data::format::IGNORE;
use crate::data::tokenizer::TextTokenizer;
use crate::data::{Batch, RunData};
use crate::model::load::{activation_kind, load_model_quantized, weight_kind};
use crate::model::{Decoder, ModelSpec};
use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use std::path::Path;
use tch::{Device, Kind, Reduction, Tensor};

/// The metrics of a training step: the mean divergence D (at temperature T, without the T²) and
/// the mean hard-label cross-entropy per label token.
pub const DISTILL_METRICS: [&str; 2] = ["train/kl", "train/ce"];

/// [`DISTILL_METRICS`] of the validation data.
pub const EVAL_DISTILL_METRICS: [&str; 2] = ["eval/kl", "eval/ce"];

/// The distillation loss's settings.
#[derive(Debug, Clone, Copy)]
pub struct DistillLoss {
    pub temperature: f64,
    pub alpha: f64,
    pub divergence: Divergence,
    pub jsd_beta: f64,
}

impl DistillLoss {
    pub fn of(cfg: &DistillConfig) -> DistillLoss {
        DistillLoss {
            temperature: cfg.temperature,
            alpha: cfg.alpha,
            divergence: cfg.loss,
            jsd_beta: cfg.jsd_beta,
        }
    }

    /// D(teacher_T ‖ student_T) at each row of fp32 logits `[rows, vocab]`: `[rows]`.
    pub fn divergence(&self, student: &Tensor, teacher: &Tensor) -> Tensor {
        let soft = |logits: &Tensor| (logits / self.temperature).log_softmax(-1, Kind::Float);
        self.divergence_of(&soft(student), &soft(teacher))
    }

    /// D between the student's fp32 logits `[rows, vocab]` and a teacher's cached top-k (see
    /// [`SoftTargets`]): the exact D of the two distributions coarsened to the k tokens and one
    /// bucket holding the rest of the mass, so never negative, and D itself when k is the
    /// vocabulary. `[rows]`.
    pub fn top_k_divergence(&self, student: &Tensor, ids: &Tensor, teacher: &Tensor) -> Tensor {
        let s = (student / self.temperature).log_softmax(-1, Kind::Float);
        let top = s.gather(-1, ids, false);
        // The student's mass off the teacher's top k; with k the whole vocabulary it is e^FLOOR, 0.
        let rest = s.scatter_value(-1, ids, LOG_FLOOR).logsumexp([-1], true);
        let coarse = Tensor::cat(&[top, rest], -1).clamp_min(LOG_FLOOR);
        self.divergence_of(&coarse, &teacher.clamp_min(LOG_FLOOR))
    }

    /// D between two rows of log-probabilities over the same support: `[rows]`.
    fn divergence_of(&self, s: &Tensor, t: &Tensor) -> Tensor {
        // Σ p_a (log p_a − log p_b) over the support.
        let kl = |a: &Tensor, b: &Tensor| (a.exp() * (a - b)).sum_dim_intlist(-1, false, Kind::Float);
        match self.divergence {
            Divergence::ForwardKl => kl(t, s),
            Divergence::ReverseKl => kl(s, t),
            Divergence::Jsd => {
                let beta = self.jsd_beta;
                let m = Tensor::stack(&[t + beta.ln(), s + (1.0 - beta).ln()], 0).logsumexp(0, false);
                kl(t, &m) * beta + kl(s, &m) * (1.0 - beta)
            }
        }
    }
}

/// The log-probability a coarsened distribution's empty bucket gets instead of −∞ (whose
/// products and gradients would be NaN): e^-10000 is 0 in fp32, so its terms vanish exactly.
const LOG_FLOOR: f64 = -1e4;

/// The teacher and the loss it is distilled with.
pub struct Distiller {
    pub teacher: Teacher,
    pub loss: DistillLoss,
}

/// Where the teacher's distributions come from.
pub enum Teacher {
    /// A second model, run on each batch.
    Model(Box<Decoder>),
    /// `distill.cache`: its top-k, attached to each batch as [`Batch::soft_targets`].
    Cache(TeacherCache),
}

impl Distiller {
    pub fn new(teacher: Decoder, loss: DistillLoss) -> Distiller {
        Distiller { teacher: Teacher::Model(Box::new(teacher)), loss }
    }

    /// The teacher of `cfg`'s `distill` section for the run on `data`: the cache `distill.cache`
    /// names (checked against the run), or else the model `distill.teacher` names (see
    /// [`load_teacher`]).
    pub fn load(cfg: &Config, student: &ModelSpec, data: &RunData, device: Device) -> Result<Distiller> {
        let teacher = match &cfg.distill.cache {
            Some(_) => Teacher::Cache(TeacherCache::open(cfg, student, data, device)?),
            None => Teacher::Model(Box::new(load_teacher(cfg, student, &data.tokenizer, device)?)),
        };
        Ok(Distiller { teacher, loss: DistillLoss::of(&cfg.distill) })
    }

    /// The teacher's cache, when the teacher is one.
    pub fn cache(&self) -> Option<&TeacherCache> {
        match &self.teacher {
            Teacher::Cache(cache) => Some(cache),
            Teacher::Model(_) => None,
        }
    }

    /// The summed loss over the label tokens of `batch` (fp32 scalar, detached) and the sums of
    /// [`DISTILL_METRICS`] (`[2]`), accumulating the gradient of `scale · loss` when `backward`
    /// is given. With a cached teacher, D is that of the coarsened distributions
    /// ([`DistillLoss::top_k_divergence`]).
    pub fn batch_loss(&self, model: &Decoder, batch: &Batch, backward: Option<Backward>) -> (Tensor, Tensor) {
        let teacher_hidden = match &self.teacher {
            Teacher::Model(teacher) => Some(tch::no_grad(|| target_hidden(teacher, batch))),
            Teacher::Cache(_) => None,
        };
        let device = batch.target_ids.device();
        let (mut kl_sum, mut ce_sum) =
            (Tensor::zeros([], (Kind::Float, device)), Tensor::zeros([], (Kind::Float, device)));
        let DistillLoss { alpha, temperature, .. } = self.loss;
        let soft_weight = (1.0 - alpha) * temperature * temperature;
        // Four vocabulary-wide tensors live per row (both models' logits and log-probabilities).
        let rows_per_chunk = (LOGITS_PER_CHUNK / 4 / model.spec.vocab_size).max(1);
        let loss = head_loss_in_chunks(model, batch, backward, rows_per_chunk, |logits, start| {
            let rows = logits.size()[0];
            let divergence = match (&self.teacher, &teacher_hidden, &batch.soft_targets) {
                (Teacher::Model(teacher), Some(hidden), _) => {
                    let teacher = tch::no_grad(|| teacher.logits(&hidden.narrow(0, start, rows), false));
                    self.loss.divergence(logits, &teacher)
                }
                (_, _, Some(soft)) => self.loss.top_k_divergence(
                    logits,
                    &soft.ids.narrow(0, start, rows),
                    &soft.logprobs.narrow(0, start, rows),
                ),
                _ => panic!("a batch distilled from a teacher cache carries no cached targets"),
            };
            let ids = batch.target_ids.narrow(0, start, rows);
            let ce = logits.cross_entropy_loss(&ids, None::<Tensor>, Reduction::None, IGNORE, 0.0);
            kl_sum += divergence.detach().sum(Kind::Float);
            ce_sum += ce.detach().sum(Kind::Float);
            (ce * alpha + divergence * soft_weight).sum(Kind::Float)
        });
        (loss, Tensor::stack(&[kl_sum, ce_sum], 0))
    }

    /// Without gradients over `batches`: `[loss sum, label tokens, DISTILL_METRICS sums...]`,
    /// advancing `bar` by one per batch.
    pub fn evaluate_sums(&self, model: &Decoder, batches: &[Batch], bar: &ProgressBar) -> Vec<f64> {
        let mut sums = vec![0.0; 2 + DISTILL_METRICS.len()];
        tch::no_grad(|| {
            for batch in batches {
                let (loss, metrics) = self.batch_loss(model, batch, None);
                sums[0] += loss.double_value(&[]);
                sums[1] += batch.label_tokens as f64;
                for (i, sum) in sums[2..].iter_mut().enumerate() {
                    *sum += metrics.double_value(&[i as i64]);
                }
                bar.inc(1);
            }
        });
        bar.finish_and_clear();
        sums
    }
}

/// A teacher in 4 bits (`distill.quantize`) has double-quantized scales, as QLoRA bases do.
pub const TEACHER_DOUBLE_QUANT: bool = true;

/// The teacher `cfg.distill.teacher` names, in the student's weight dtype (its linear layers in
/// 4 bits with `distill.quantize`), after checking that
/// it shares the student's vocabulary: the same vocabulary size, and the same token → id map
/// in its `tokenizer.json` as the student's `tokenizer`.
pub fn load_teacher(
    cfg: &Config,
    student: &ModelSpec,
    tokenizer: &TextTokenizer,
    device: Device,
) -> Result<Decoder> {
    let Some(dir) = &cfg.distill.teacher else { bail!("train.objective distill needs distill.teacher") };
    let spec =
        ModelSpec::from_dir(dir).with_context(|| format!("cannot load the teacher {}", dir.display()))?;
    check_vocabulary(dir, &spec, &cfg.model.path, student, tokenizer)?;
    let kind = weight_kind(cfg.model.dtype, cfg.train.precision);
    let quantization = cfg.distill.quantize.map(|format| (format, TEACHER_DOUBLE_QUANT));
    let mut teacher = load_model_quantized(dir, kind, device, quantization)
        .with_context(|| format!("cannot load the teacher {}", dir.display()))?;
    teacher.activations = activation_kind(cfg.train.precision);
    Ok(teacher)
}

/// The teacher's final hidden states at `batch`'s target positions, `[targets, hidden]`.
pub(super) fn target_hidden(teacher: &Decoder, batch: &Batch) -> Tensor {
    let blocks = Activations::forward(teacher, batch, false, false);
    let hidden = teacher.final_norm(&blocks.output);
    let width = *hidden.size().last().expect("hidden states have a width");
    hidden.reshape([-1, width]).index_select(0, &batch.target_positions)
}

/// Refuses a teacher whose logits do not index the student's tokens: another vocabulary size,
/// or another token → id map.
fn check_vocabulary(
    teacher_dir: &Path,
    teacher: &ModelSpec,
    student_dir: &Path,
    student: &ModelSpec,
    tokenizer: &TextTokenizer,
) -> Result<()> {
    let (t, s) = (teacher_dir.display(), student_dir.display());
    if teacher.vocab_size != student.vocab_size {
        bail!(
            "the teacher {t} has a vocabulary of {} tokens and the student {s} one of {}; distillation \
             compares their distributions token by token, so distill.teacher must use the student's \
             vocabulary",
            teacher.vocab_size,
            student.vocab_size
        );
    }
    let path = teacher_dir.join("tokenizer.json");
    let theirs = TextTokenizer::from_file(&path, tokenizer.eos_id)
        .with_context(|| format!("cannot check the teacher {t}'s vocabulary against the student {s}'s"))?
        .vocab();
    let ours = tokenizer.vocab();
    let mut differ: Vec<String> = ours
        .iter()
        .filter(|(token, id)| theirs.get(*token) != Some(id))
        .map(|(token, id)| match theirs.get(token) {
            Some(other) => format!("{token:?} is {id} in the student, {other} in the teacher"),
            None => format!("{token:?} only in the student"),
        })
        .collect();
    differ.extend(
        theirs
            .keys()
            .filter(|token| !ours.contains_key(*token))
            .map(|token| format!("{token:?} only in the teacher")),
    );
    if let Some(first) = differ.iter().min() {
        bail!(
            "the teacher {t} and the student {s} tokenize differently ({} tokens differ, e.g. {first}); \
             distill.teacher must use the student's tokenizer",
            differ.len()
        );
    }
    Ok(())
}
