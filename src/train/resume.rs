//! `--resume`: which checkpoint, which run directory, and whether the config still continues
//! the run exactly. Every checkpoint records the settings its steps depended on ([`settings`]);
//! a resume whose config changes one of them is refused naming it, unless `--resume-anyway`,
//! which accepts the change and records it in the run. Nothing here writes.

use super::checkpoint;
use super::distill_cache::{cache_identity, teacher_fingerprint};
use crate::config::{Config, Objective};
use crate::data::cache::CacheKey;
use crate::data::RunData;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Config keys (or whole sections, ending in `.`) a resume may change silently: they decide how
/// long training goes on and what is logged, saved, evaluated and printed, not what a step
/// computes. Every other key is part of what the run computes, and so are the data files'
/// contents (the setting `data`), which is why their paths may change.
pub const FREE_TO_CHANGE: &[&str] = &[
    "train.max_steps",
    "train.epochs",
    "train.log_every",
    "train.save_every",
    "train.keep_last",
    "train.eval_every",
    "train.save_best",
    "train.early_stopping_patience",
    "train.on_nonfinite",
    "train.threads",
    "train.dist_timeout",
    "data.train",
    "data.validation",
    "output.",
];

/// The file in a run directory that lists the changes accepted by `--resume-anyway`.
pub const CHANGES_FILE: &str = "resumed_with_changes.txt";

/// One setting that differs between a checkpoint and the config resuming it.
pub struct Change {
    pub key: String,
    pub old: String,
    pub new: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} → {}", self.key, self.old, self.new)
    }
}

/// The setting that sizes a step in place of `train.grad_accum_steps`: a step takes as many
/// micro-batches as accumulation steps times data-parallel workers, so a run may resume on
/// another number of workers with the accumulation that keeps the product.
const ACCUM: &str = "train.grad_accum_steps";
const STEP_MICRO_BATCHES: &str = "train.grad_accum_steps × workers";

/// The settings exact resumption depends on: every key of the config (as given, `auto`
/// unresolved) except [`FREE_TO_CHANGE`], as compact JSON, with the accumulation counted over
/// the run's `workers` ([`STEP_MICRO_BATCHES`]), `data`, the identity of the prepared
/// examples, and a distillation teacher's or cache's files.
pub fn settings(cfg: &Config, data: &RunData, workers: usize) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    flatten("", &serde_json::to_value(cfg)?, &mut out);
    out.retain(|key, _| !is_free(key) && key != ACCUM);
    out.insert(STEP_MICRO_BATCHES.to_string(), (cfg.train.grad_accum_steps * workers).to_string());
    out.insert("data".to_string(), data_identity(data));
    // A teacher retrained in place, or a cache written again, changes what the steps compute
    // though the config's paths stay the same.
    if cfg.train.objective == Objective::Distill {
        if let Some(teacher) = &cfg.distill.teacher {
            out.insert("distill.teacher files".to_string(), teacher_fingerprint(teacher)?);
        }
        if let Some(cache) = &cfg.distill.cache {
            out.insert("distill.cache files".to_string(), cache_identity(cache)?);
        }
    }
    Ok(out)
}

fn is_free(key: &str) -> bool {
    FREE_TO_CHANGE.iter().any(|free| key == *free || (free.ends_with('.') && key.starts_with(free)))
}

/// `{"a": {"b": 1}}` as `a.b` → `1`.
fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match value.as_object() {
        Some(map) if !map.is_empty() => {
            for (key, inner) in map {
                let key = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                flatten(&key, inner, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), value.to_string());
        }
    }
}

/// The examples' counts and a digest of their token ids and labels: equal exactly when the run
/// trains (and evaluates) on the same tokens, wherever the files now are.
pub(super) fn data_identity(data: &RunData) -> String {
    let mut key = CacheKey::default();
    let mut counts = Vec::new();
    for set in std::iter::once(&data.train).chain(data.validation.as_ref()) {
        counts.push(set.examples.len().to_string());
        for example in &set.examples {
            for ids in [&example.input_ids, &example.labels] {
                let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
                key.add_bytes(&bytes);
            }
        }
    }
    format!("{} examples, tokens {}", counts.join(" + "), &key.hex()[..12])
}

/// What changed from the checkpoint's settings `old` to `new`. A checkpoint that recorded none
/// (written before they were recorded) is taken as it is.
pub fn changes(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> Vec<Change> {
    if old.is_empty() {
        return Vec::new();
    }
    // Checkpoints of single-process runs written before the step was counted over workers.
    let mut old = old.clone();
    if let Some(accum) = old.remove(ACCUM) {
        old.entry(STEP_MICRO_BATCHES.to_string()).or_insert(accum);
    }
    let missing = || "(not set)".to_string();
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| Change {
            key: k.clone(),
            old: old.get(k).cloned().unwrap_or_else(missing),
            new: new.get(k).cloned().unwrap_or_else(missing),
        })
        .collect()
}

/// Refuses `changes` unless `anyway`.
pub fn check(changes: &[Change], checkpoint: &Path, anyway: bool) -> Result<()> {
    if changes.is_empty() || anyway {
        return Ok(());
    }
    let list: Vec<String> = changes.iter().map(|c| format!("  {c}")).collect();
    bail!(
        "cannot resume from {} exactly: the config changes what the run computes:\n{}\n\
         put the settings back, start a new run, or pass --resume-anyway to continue with the changes \
         (they are recorded in the run's {CHANGES_FILE})",
        checkpoint.display(),
        list.join("\n")
    )
}

/// The checkpoint `--resume` names and the run directory the resumed run continues in. Without
/// a path, it is the run the config names. With a path, it is that run directory, or for a
/// checkpoint `step-N/`, the directory holding it, which must be a run directory (it has the
/// run's config.yaml) or the run the config names: a checkpoint kept elsewhere is refused, so
/// resuming never writes a run's files into an unrelated directory.
pub fn resume_point(cfg: &Config, resume: &Option<PathBuf>) -> Result<(PathBuf, PathBuf)> {
    let named = cfg.output.run_name.as_ref().map(|name| cfg.output.dir.join(name));
    let save_every = cfg.train.save_every;
    let Some(given) = resume else {
        let run_dir = match named {
            Some(dir) => dir,
            None => newest_run_of(cfg)?,
        };
        return Ok((checkpoint::resolve(&run_dir, save_every)?, run_dir));
    };
    if !checkpoint::is_checkpoint(given) {
        return Ok((checkpoint::resolve(given, save_every)?, given.clone()));
    }
    let parent = given.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let same =
        |a: &Path, b: &Path| a.canonicalize().ok().zip(b.canonicalize().ok()).is_some_and(|(a, b)| a == b);
    if parent.join("config.yaml").exists() || named.as_deref().is_some_and(|n| same(n, parent)) {
        return Ok((given.clone(), parent.to_path_buf()));
    }
    bail!(
        "{} is a checkpoint outside a run directory ({} has no config.yaml): copy it into the run's \
         directory as step-N/ and resume that run, or start a new run from its adapter with lora.init_from",
        given.display(),
        parent.display()
    )
}

/// The newest run in `output.dir` of a config that names no run (its name was generated): the
/// run directory whose `config.yaml` holds this config, up to the keys a resume may change
/// ([`FREE_TO_CHANGE`]) other than the data files; the newest by that file's time when several do.
fn newest_run_of(cfg: &Config) -> Result<PathBuf> {
    let out_dir = &cfg.output.dir;
    let wanted = comparable(&serde_json::to_value(cfg)?);
    let mut found: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(out_dir).into_iter().flatten().flatten() {
        let file = entry.path().join("config.yaml");
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        // A config.yaml another program wrote, or an older layout, is simply not this run.
        let Ok(stored) = serde_yaml::from_str::<serde_json::Value>(&text) else { continue };
        if comparable(&stored) == wanted {
            let time = file.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            if found.as_ref().is_none_or(|(newest, _)| time > *newest) {
                found = Some((time, entry.path()));
            }
        }
    }
    match found {
        Some((_, dir)) => Ok(dir),
        None => bail!(
            "--resume: no run of this config in {}; pass --resume RUN_DIR, or set output.run_name",
            out_dir.display()
        ),
    }
}

/// A config's keys and values, leaving out those a resume may change but the data files (runs
/// on other files are other runs).
fn comparable(config: &serde_json::Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    flatten("", config, &mut out);
    out.retain(|key, _| !is_free(key) || key.starts_with("data."));
    out
}

/// Appends the accepted `changes` to the run's [`CHANGES_FILE`].
pub fn record(run_dir: &Path, step: usize, changes: &[Change]) -> Result<()> {
    use std::io::Write;
    let path = run_dir.join(CHANGES_FILE);
    let mut text = format!("resumed after step {step} with --resume-anyway:\n");
    for change in changes {
        text.push_str(&format!("  {change}\n"));
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|_| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}
