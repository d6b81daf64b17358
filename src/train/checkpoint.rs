//! Resumable checkpoints: `step-<N>/` holds the adapter (a PEFT adapter other tools can load
//! as it is), the AdamW moments (and an fp16-mixed run's loss scale) and `trainer_state.json` (step, data position, evaluation
//! history). The directory is built under a temporary name and renamed into place, and the
//! state file is written last, so a checkpoint either exists whole or not at all.

use super::scaler::ScalerState;
use super::Trainer;
use crate::config::LoraConfig;
use crate::files::{publish_dir, read_safetensors, remove_staging, safetensors_bytes, write_atomic};
use crate::lora::{peft, AttachedAdapters};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Metadata keys of [`OPTIMIZER_FILE`]: the AdamW step count, and an fp16-mixed run's loss scale
/// and clean steps since it last changed.
const ADAMW_STEP: &str = "adamw_step";
const LOSS_SCALE: &str = "loss_scale";
const LOSS_SCALE_GROWTH_TRACKER: &str = "loss_scale_growth_tracker";

/// Where training stands: enough to continue exactly where it stopped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// The epoch the next step belongs to, and the steps of its plan already done.
    pub epoch: usize,
    pub step_in_epoch: usize,
    pub best_eval_loss: Option<f64>,
    pub evals_since_best: usize,
    pub tokens_seen: i64,
    pub padded_seen: i64,
    pub first_loss: Option<f64>,
    pub skipped_steps: usize,
    /// The settings exact resumption depends on, as this run used them (see
    /// [`super::resume`]); empty in checkpoints written before they were recorded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, String>,
}

/// The directory of the checkpoint after `step` steps.
pub fn dir_for(run_dir: &Path, step: usize) -> PathBuf {
    run_dir.join(format!("step-{step}"))
}

/// Saves a checkpoint into `dir`, replacing it atomically.
pub fn save(
    dir: &Path,
    state: &TrainerState,
    lora: &LoraConfig,
    injected: &AttachedAdapters,
    trainer: &Trainer,
    base_model: &str,
) -> Result<()> {
    let optimizer = &trainer.optimizer;
    let mut moments = Vec::with_capacity(2 * injected.trainables.len());
    for (t, (m, v)) in injected.trainables.iter().zip(&optimizer.moments) {
        moments.push((format!("{}.exp_avg", t.peft_key), m.shallow_clone()));
        moments.push((format!("{}.exp_avg_sq", t.peft_key), v.shallow_clone()));
    }
    let mut metadata = vec![(ADAMW_STEP, optimizer.step.to_string())];
    if let Some(scaler) = trainer.scaler.as_ref().map(|s| s.state()) {
        metadata.push((LOSS_SCALE, scaler.scale.to_string()));
        metadata.push((LOSS_SCALE_GROWTH_TRACKER, scaler.growth_tracker.to_string()));
    }
    let metadata: Vec<(&str, &str)> = metadata.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let optimizer_bytes = safetensors_bytes(&moments, &metadata)?;
    publish_dir(dir, |tmp| {
        peft::write_files(tmp, lora, injected, base_model)?;
        write_atomic(&tmp.join(OPTIMIZER_FILE), &optimizer_bytes)?;
        write_atomic(&tmp.join(STATE_FILE), &serde_json::to_vec_pretty(state)?)
    })
    .with_context(|| {
        format!("cannot save the checkpoint {} (the previous checkpoint is kept)", dir.display())
    })
}

/// The trainer state of the checkpoint `dir`, read without touching its tensors.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("{} is not a complete checkpoint (no {STATE_FILE})", dir.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is damaged", state_path.display()))
}

/// Restores the adapter, optimizer and loss scale from `dir` and returns the trainer state.
pub fn load(dir: &Path, injected: &AttachedAdapters, trainer: &mut Trainer) -> Result<TrainerState> {
    let state = read_state(dir)?;
    peft::copy_weights(dir, injected)?;
    let path = dir.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let header = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let metadata = header.1.metadata().clone().unwrap_or_default();
    let step = metadata.get(ADAMW_STEP).and_then(|s| s.parse().ok());
    let Some(step) = step else { bail!("{}: no optimizer step recorded", path.display()) };
    if let Some(scaler) = trainer.scaler.as_mut() {
        // A checkpoint of a run in another precision has none: the scale starts afresh.
        if let Some(state) = scaler_state(&metadata, &path)? {
            scaler.restore(state);
        }
    }
    let optimizer = &mut trainer.optimizer;
    let mut stored: HashMap<String, tch::Tensor> = read_safetensors(&path)?.into_iter().collect();
    for (t, (m, v)) in injected.trainables.iter().zip(optimizer.moments.iter_mut()) {
        for (suffix, moment) in [("exp_avg", m), ("exp_avg_sq", v)] {
            let key = format!("{}.{suffix}", t.peft_key);
            let Some(value) = stored.remove(&key) else { bail!("{}: no `{key}`", path.display()) };
            if value.size() != moment.size() {
                bail!(
                    "{}: `{key}` has shape {:?}, expected {:?}",
                    path.display(),
                    value.size(),
                    moment.size()
                );
            }
            tch::no_grad(|| moment.copy_(&value.to_device(moment.device())));
        }
    }
    optimizer.step = step;
    Ok(state)
}

/// The loss scaler's state in the metadata of the optimizer file `path`, if it has one.
fn scaler_state(metadata: &HashMap<String, String>, path: &Path) -> Result<Option<ScalerState>> {
    let Some(scale) = metadata.get(LOSS_SCALE) else { return Ok(None) };
    let scale = scale.parse::<f64>().ok().filter(|s| s.is_finite() && *s > 0.0);
    let tracker = metadata.get(LOSS_SCALE_GROWTH_TRACKER).and_then(|t| t.parse::<i64>().ok());
    match (scale, tracker) {
        (Some(scale), Some(growth_tracker)) if growth_tracker >= 0 => {
            Ok(Some(ScalerState { scale, growth_tracker }))
        }
        _ => bail!(
            "{}: `{LOSS_SCALE}` must be a positive number and `{LOSS_SCALE_GROWTH_TRACKER}` a whole \
             number >= 0; the checkpoint is damaged: resume from an earlier one",
            path.display()
        ),
    }
}

/// Complete step checkpoints of a run, oldest first.
pub fn list(run_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path().join(STATE_FILE).exists().then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// Whether `path` is a checkpoint (rather than a run directory).
pub fn is_checkpoint(path: &Path) -> bool {
    path.join(STATE_FILE).exists()
}

/// The checkpoint to resume from: `path` itself when it is one, else the newest in the run
/// directory `path`. `save_every` (the run's setting) says why a run may have none.
pub fn resolve(path: &Path, save_every: Option<usize>) -> Result<PathBuf> {
    if is_checkpoint(path) {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        bail!("{} does not exist: --resume needs a run directory or a step-N/ checkpoint", path.display());
    }
    match list(path).pop() {
        Some((_, dir)) => Ok(dir),
        None if save_every.is_some() => bail!(
            "{} has no checkpoint yet (no step-N/ with {STATE_FILE}): the run stopped before its first save, \
             so there is nothing to resume; start it over with --overwrite instead of --resume",
            path.display()
        ),
        None => bail!(
            "{} holds no checkpoint (step-N/ with {STATE_FILE}) because train.save_every is not set; \
             start the run over with --overwrite, and set train.save_every to make it resumable",
            path.display()
        ),
    }
}

/// Removes all but the newest `keep` step checkpoints.
pub fn prune(run_dir: &Path, keep: usize) -> Result<()> {
    let all = list(run_dir);
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("cannot remove old checkpoint {}", dir.display()))?;
    }
    Ok(())
}

/// Before resuming from step `step`: removes what a killed run left behind — staging and
/// incomplete directories of unfinished saves, checkpoints after `step`, and metrics.jsonl lines of steps
/// after it (they will be logged again) — so the resumed run's record reads like an
/// uninterrupted one.
pub fn forget_after(run_dir: &Path, step: usize) -> Result<()> {
    remove_staging(run_dir)?;
    for entry in std::fs::read_dir(run_dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("step-") && !entry.path().join(STATE_FILE).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    for (n, dir) in list(run_dir) {
        if n > step {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
    }
    let metrics = run_dir.join("metrics.jsonl");
    if let Ok(text) = std::fs::read_to_string(&metrics) {
        let kept: String = text
            .lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("step")?.as_u64())
                    .is_some_and(|s| s as usize <= step)
            })
            .map(|line| format!("{line}\n"))
            .collect();
        write_atomic(&metrics, kept.as_bytes())?;
    }
    Ok(())
}
