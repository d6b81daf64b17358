//! `lorafit eval`: the validation loss of a model with an adapter, computed exactly as a run
//! logs it (for a preference objective, the pair loss and TRL's `eval_rewards/*` metrics; for
//! distillation, its loss with `eval_kl` and `eval_ce`).

use super::distill::{Distiller, EVAL_DISTILL_METRICS};
use super::preference::PreferenceLoss;
use super::run::{load_run_data, row_layout};
use super::{evaluate_sums, precision};
use crate::config::{Config, Objective};
use crate::data::format::{resolve_format, Prepared};
use crate::data::{Batch, RowLayout};
use crate::lora::peft;
use crate::model::load::{load_model_for, resolve_device};
use crate::model::ModelSpec;
use anyhow::{bail, Result};
use indicatif::ProgressBar;
use std::path::{Path, PathBuf};
use tch::Device;

/// A validation pass: the mean loss over its units (label tokens, or pairs for a preference
/// objective, answers for KTO), their count, and a preference objective's metrics by name
/// (`eval/rewards/...`).
pub struct Validation {
    pub loss: f64,
    pub units: f64,
    /// What the units are: "label_tokens", "pairs" or "answers".
    pub unit_name: &'static str,
    pub metrics: Vec<(&'static str, f64)>,
}

impl Validation {
    /// The pass of `sums` as [`validation_sums`] gives them (summed over ranks) for `loss`.
    pub fn from_sums(sums: &[f64], loss: EvalLoss<'_>) -> Validation {
        let units = sums[1];
        let mean = |sum: f64| sum / units.max(1.0);
        let (names, unit_name) = match loss {
            EvalLoss::Tokens => (&[][..], "label_tokens"),
            EvalLoss::Preference(p) => (p.eval_metric_names(), p.unit_name()),
            EvalLoss::Distill(_) => (&EVAL_DISTILL_METRICS[..], "label_tokens"),
        };
        let metrics = names.iter().zip(&sums[2..]).map(|(&name, &sum)| (name, mean(sum))).collect();
        Validation { loss: mean(sums[0]), units, unit_name, metrics }
    }

    fn is_pairs(&self) -> bool {
        self.unit_name != "label_tokens"
    }

    /// Its headline besides the loss: the reward accuracy of pairs (the reward margin for KTO,
    /// which has no accuracy), the divergence from a teacher, or the perplexity of a token loss.
    pub fn summary(&self) -> String {
        let metric = |wanted: &str| self.metrics.iter().find(|(name, _)| *name == wanted).map(|(_, v)| *v);
        if let Some(accuracy) = metric("eval/rewards/accuracies") {
            format!("reward accuracy {accuracy:.3}")
        } else if let Some(margin) = metric("eval/rewards/margins") {
            format!("reward margin {margin:.3}")
        } else if let Some(kl) = metric("eval/kl") {
            format!("divergence from the teacher {kl:.4}")
        } else {
            format!("perplexity {:.2}", self.loss.exp())
        }
    }
}

/// What a validation pass computes: the token loss, or a preference or distillation objective's
/// loss with its metrics.
#[derive(Clone, Copy)]
pub enum EvalLoss<'a> {
    Tokens,
    Preference(&'a PreferenceLoss),
    Distill(&'a Distiller),
}

/// Without gradients over `batches`: `[loss sum, units, metric sums...]`, the units being label
/// tokens, or pairs (KTO: answers) with a preference loss; what data-parallel ranks add up.
pub fn validation_sums(
    model: &crate::model::Decoder,
    batches: &[Batch],
    loss: EvalLoss<'_>,
    bar: &ProgressBar,
) -> Vec<f64> {
    match loss {
        EvalLoss::Preference(p) => p.evaluate_sums(model, batches, bar),
        EvalLoss::Distill(d) => d.evaluate_sums(model, batches, bar),
        EvalLoss::Tokens => {
            let (total, tokens) = evaluate_sums(model, batches, bar);
            vec![total, tokens as f64]
        }
    }
}

/// What `lorafit eval` is asked for: a config file, or a model and a data file.
#[derive(Debug, Clone, Default)]
pub struct EvalOptions {
    pub config: Option<PathBuf>,
    pub model: Option<PathBuf>,
    pub data: Option<PathBuf>,
    /// The adapter; `none` evaluates the base model alone; by default the final adapter of the
    /// run the config names.
    pub adapter: Option<PathBuf>,
    pub overrides: Vec<String>,
}

/// Micro-batches of `examples`, in order, for evaluation; with [`RowLayout::Pairs`], of
/// `micro_batch_size` pairs each, chosen rows first as in training.
pub fn eval_batches(
    data: &Prepared,
    micro_batch_size: usize,
    pad_id: i64,
    device: Device,
    layout: RowLayout,
) -> Vec<Batch> {
    if layout == RowLayout::Pairs {
        let pairs: Vec<_> = data.examples.chunks_exact(2).map(|p| (&p[0], &p[1])).collect();
        return pairs
            .chunks(micro_batch_size)
            .map(|chunk| Batch::collate_pairs(chunk, pad_id, device))
            .collect();
    }
    data.examples
        .chunks(micro_batch_size)
        .map(|chunk| Batch::collate(&chunk.iter().collect::<Vec<_>>(), pad_id, device))
        .collect()
}

/// The config of `eval --data FILE` without a config file: the data's format is detected from
/// its first record, as `train` does, unless `--set data.format=...` names it.
fn config_for_data(model: &Path, data: &Path, overrides: &[String]) -> Result<Config> {
    let mut cfg = Config::for_model_and_data(model, data, overrides)?;
    // eval prints its report alone (scripts read it), so what was detected goes unsaid.
    resolve_format(&mut cfg.data)?;
    Ok(cfg)
}

/// `lorafit eval`: [`eval`] of the config and adapter `opts` give.
pub fn eval_command(opts: &EvalOptions) -> Result<Validation> {
    let given_adapter = opts.adapter.as_ref().filter(|dir| dir.as_os_str() != "none");
    let cfg = match (&opts.config, &opts.data, given_adapter) {
        (Some(config), _, _) => {
            let mut cfg = Config::load(config, &opts.overrides)?;
            resolve_format(&mut cfg.data)?; // unsaid, as in config_for_data
            cfg
        }
        (None, Some(data), Some(adapter)) => {
            let model = peft::base_model_dir(adapter, opts.model.as_deref())?;
            config_for_data(&model, data, &opts.overrides)?
        }
        (None, Some(data), None) => match &opts.model {
            Some(model) => config_for_data(model, data, &opts.overrides)?,
            None => {
                bail!("give --model DIR (or an --adapter whose adapter_config.json names its base model)")
            }
        },
        (None, None, _) => bail!("give a CONFIG, or --data (with --model or --adapter)"),
    };
    let adapter = match &opts.adapter {
        Some(dir) if dir.as_os_str() == "none" => None,
        Some(dir) => Some(dir.clone()),
        None => match &cfg.output.run_name {
            Some(name) => Some(cfg.output.dir.join(name).join("adapter")),
            None => bail!("give --adapter DIR, or set output.run_name to evaluate that run's adapter"),
        },
    };
    eval(&cfg, adapter.as_deref())
}

/// The report `lorafit eval` prints: a line for people, then one JSON object for scripts (for
/// pairs, the metrics under TRL's evaluation names: `eval_loss`, `eval_rewards/chosen`, ...).
pub fn eval_report(v: &Validation) -> String {
    let loss = v.loss;
    if v.is_pairs() {
        let mut json = serde_json::json!({"eval_loss": loss, v.unit_name: v.units as i64});
        for (name, value) in &v.metrics {
            json[name.replacen("eval/", "eval_", 1)] = (*value).into();
        }
        return format!("eval loss {loss:.6} {} over {} {}\n{json}\n", v.summary(), v.units, v.unit_name);
    }
    let tokens = v.units as i64;
    if !v.metrics.is_empty() {
        // Distillation: its loss is no token NLL, so no perplexity; its KL and CE beside it.
        let mut json = serde_json::json!({"eval_loss": loss, "label_tokens": tokens});
        let mut line = format!("eval loss {loss:.6}");
        for (name, value) in &v.metrics {
            let name = name.replacen("eval/", "eval_", 1);
            line.push_str(&format!(" {} {value:.6}", &name["eval_".len()..]));
            json[name] = (*value).into();
        }
        return format!("{line} over {tokens} tokens\n{json}\n");
    }
    let json = serde_json::json!({"eval_loss": loss, "eval_perplexity": loss.exp(), "label_tokens": tokens});
    format!("eval loss {loss:.6} perplexity {:.4} over {tokens} tokens\n{json}\n", loss.exp())
}

/// `lorafit eval`: the validation loss of the base model with `adapter` (none: the base
/// alone), computed exactly as during training, with a preference objective's metrics.
pub fn eval(cfg: &Config, adapter: Option<&Path>) -> Result<Validation> {
    let device = resolve_device(&cfg.train.device)?;
    let (resolved, _) = precision::resolve(cfg, device);
    let cfg = &resolved;
    if let Some(threads) = cfg.train.threads {
        tch::set_num_threads(threads as i32);
    }
    let spec = ModelSpec::from_dir(&cfg.model.path)?;
    let data = load_run_data(cfg, &spec)?;
    let Some(validation) = &data.validation else {
        bail!("there is no validation data: set data.validation (a file) or data.val_split in the config");
    };
    let mut model = load_model_for(cfg, device)?;
    if let Some(dir) = adapter {
        peft::load(dir, &mut model, device)?;
    }
    let mut batches =
        eval_batches(validation, cfg.train.micro_batch_size, data.tokenizer.eos_id, device, row_layout(cfg));
    let preference = cfg.train.objective.is_preference().then(|| PreferenceLoss::of(&cfg.train));
    let distiller = (cfg.train.objective == Objective::Distill)
        .then(|| Distiller::load(cfg, &spec, &data, device))
        .transpose()?;
    if let Some(cache) = distiller.as_ref().and_then(Distiller::cache) {
        cache.attach_validation(&mut batches);
    }
    let loss = match (&preference, &distiller) {
        (Some(p), _) => EvalLoss::Preference(p),
        (None, Some(d)) => EvalLoss::Distill(d),
        (None, None) => EvalLoss::Tokens,
    };
    let sums = validation_sums(&model, &batches, loss, &ProgressBar::hidden());
    Ok(Validation::from_sums(&sums, loss))
}
