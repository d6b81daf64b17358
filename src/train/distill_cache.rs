//! `lorafit distill-cache`: the teacher run once over a run's training and validation examples,
//! its top-k log-probabilities (at the temperature T) at every label position written to a
//! folder, so that training with `distill.cache` reads them instead of holding the teacher.
//!
//! The folder holds `teacher.safetensors` and `meta.json`. For each split (`train`, and
//! `validation` when the run has one), `SPLIT.offsets` (int64 `[examples + 1]`) gives where each
//! example's targets start, in the order of its label positions; `SPLIT.ids` (int32
//! `[targets, k]`) the teacher's k most likely tokens, most likely first; `SPLIT.logprobs` (fp32
//! `[targets, k + 1]`) their log-probabilities, then the log of the mass of every other token.
//! Keyed by example, not by micro-batch, the cache serves any shuffle, packing, epoch or resume.
//! `meta.json` says what it was made from (teacher, vocabulary, T, k, the examples' identity),
//! and a run whose settings differ is refused. The folder is published whole by a rename, so an
//! interrupted `distill-cache` never leaves one that looks complete.

use super::distill::{load_teacher, target_hidden};
use super::resume::data_identity;
use super::run::load_run_data;
use super::{precision, LOGITS_PER_CHUNK};
use crate::config::Config;
use crate::data::batch::SoftTargets;
use crate::data::cache::CacheKey;
use crate::data::format::{resolve_format, Example, Prepared, IGNORE};
use crate::data::{Batch, RunData};
use crate::files::{publish_dir, read_safetensors, safetensors_bytes};
use crate::model::load::resolve_device;
use crate::model::{Decoder, ModelSpec};
use crate::observe::progress::progress_bar;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// `--top-k` when not given: 64 tokens hold nearly all of a trained model's mass at T = 1.
pub const DEFAULT_TOP_K: usize = 64;

const META_FILE: &str = "meta.json";
const TENSORS_FILE: &str = "teacher.safetensors";
/// Bumped whenever the folder's layout changes: an older cache is refused, not misread.
const FORMAT_VERSION: u32 = 1;

/// What a cache was made from (`meta.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheMeta {
    pub format_version: u32,
    /// The teacher's model directory as the config named it, and [`teacher_fingerprint`] of it.
    pub teacher: PathBuf,
    pub teacher_fingerprint: String,
    pub vocab_size: i64,
    pub temperature: f64,
    pub top_k: usize,
    /// The identity of the run's prepared examples (as `--resume` compares them).
    pub data: String,
}

/// A digest of a model directory's config.json and tokenizer.json and the names and sizes of
/// its weight files: another teacher, or the same one retrained in place, gets another one.
pub fn teacher_fingerprint(dir: &Path) -> Result<String> {
    let mut key = CacheKey::default();
    for file in ["config.json", "tokenizer.json"] {
        let path = dir.join(file);
        if path.exists() {
            key.add_path(&path)?;
        }
    }
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read the teacher {}", dir.display()))?;
    let mut weights: Vec<(String, u64)> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().map_or(0, |m| m.len())))
        .collect();
    weights.sort();
    for (name, size) in weights {
        key.add_bytes(format!("{name}:{size}").as_bytes());
    }
    Ok(key.hex()[..16].to_string())
}

/// A digest of a cache's metadata, which names its teacher, k, temperature and examples: what a
/// resumed run compares.
pub fn cache_identity(dir: &Path) -> Result<String> {
    let mut key = CacheKey::default();
    key.add_bytes(&serde_json::to_vec(&read_meta(dir)?)?);
    Ok(key.hex()[..16].to_string())
}

/// One split's cached targets, on the run's device.
struct CachedSplit {
    /// Example i's targets are rows `offsets[i]..offsets[i + 1]`.
    offsets: Vec<i64>,
    ids: Tensor,
    logprobs: Tensor,
}

impl CachedSplit {
    /// The rows of `examples`' targets, in that order.
    fn targets(&self, examples: impl IntoIterator<Item = usize>) -> SoftTargets {
        let rows: Vec<i64> =
            examples.into_iter().flat_map(|e| self.offsets[e]..self.offsets[e + 1]).collect();
        let rows = Tensor::from_slice(&rows).to_device(self.ids.device());
        SoftTargets { ids: self.ids.index_select(0, &rows), logprobs: self.logprobs.index_select(0, &rows) }
    }
}

/// A cache checked against the run that reads it.
pub struct TeacherCache {
    pub meta: CacheMeta,
    train: CachedSplit,
    validation: Option<CachedSplit>,
}

impl TeacherCache {
    /// The cache `cfg.distill.cache` names, refused unless it was made for this run: the same
    /// examples, temperature and vocabulary, and the teacher `distill.teacher` names, if any.
    pub fn open(cfg: &Config, student: &ModelSpec, data: &RunData, device: Device) -> Result<TeacherCache> {
        let Some(dir) = &cfg.distill.cache else { bail!("distill.cache is not set") };
        let meta = read_meta(dir)?;
        check_meta(&meta, dir, cfg, student, data)?;
        let path = dir.join(TENSORS_FILE);
        let tensors = read_safetensors(&path)?;
        let split = |name: &str, examples: &[Example]| -> Result<CachedSplit> {
            let find = |part: &str| {
                let key = format!("{name}.{part}");
                tensors.iter().find(|(n, _)| *n == key).map(|(_, t)| t.shallow_clone()).with_context(|| {
                    format!("{} has no tensor {key}: re-run `lorafit distill-cache`", path.display())
                })
            };
            let (offsets, ids, logprobs) = (find("offsets")?, find("ids")?, find("logprobs")?);
            let offsets = Vec::<i64>::try_from(&offsets.to_kind(Kind::Int64).flatten(0, -1))?;
            check_split(&path, name, examples, &offsets, &ids, &logprobs, meta.top_k)?;
            Ok(CachedSplit {
                offsets,
                ids: ids.to_kind(Kind::Int64).to_device(device),
                logprobs: logprobs.to_kind(Kind::Float).to_device(device),
            })
        };
        let train = split("train", &data.train.examples)?;
        let validation = data.validation.as_ref().map(|v| split("validation", &v.examples)).transpose()?;
        Ok(TeacherCache { meta, train, validation })
    }

    /// The targets of the training examples `examples`, in that order: those of a micro-batch's
    /// rows, each row's examples in turn.
    pub fn train_targets(&self, examples: impl IntoIterator<Item = usize>) -> SoftTargets {
        self.train.targets(examples)
    }

    /// Attaches their targets to the validation `batches`, which hold the validation examples
    /// in order (see [`super::eval::eval_batches`]).
    pub fn attach_validation(&self, batches: &mut [Batch]) {
        let Some(split) = &self.validation else { return };
        let mut next = 0;
        for batch in batches {
            let rows = batch.input_ids.size()[0] as usize;
            batch.soft_targets = Some(split.targets(next..next + rows));
            next += rows;
        }
    }
}

fn read_meta(dir: &Path) -> Result<CacheMeta> {
    let path = dir.join(META_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "distill.cache {} is not a teacher cache (no readable {META_FILE}): re-run \
             `lorafit distill-cache CONFIG` to write it",
            dir.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| {
        format!("{} is not a teacher cache's metadata: re-run `lorafit distill-cache CONFIG`", path.display())
    })
}

/// Refuses a cache made for another run, naming the setting that differs.
fn check_meta(meta: &CacheMeta, dir: &Path, cfg: &Config, student: &ModelSpec, data: &RunData) -> Result<()> {
    let redo = "re-run `lorafit distill-cache CONFIG` with this run's config (or point distill.cache \
                at a cache made for it)";
    let d = dir.display();
    if meta.format_version != FORMAT_VERSION {
        bail!("distill.cache {d} was written by another version of lorafit; {redo}");
    }
    if meta.vocab_size != student.vocab_size {
        bail!(
            "distill.cache {d} holds token ids of a vocabulary of {} tokens and the student {} has {}; {redo}",
            meta.vocab_size,
            cfg.model.path.display(),
            student.vocab_size
        );
    }
    if meta.temperature != cfg.distill.temperature {
        bail!(
            "distill.cache {d} holds the teacher's log-probabilities at distill.temperature {} and \
             this run sets {}; {redo}",
            meta.temperature,
            cfg.distill.temperature
        );
    }
    let ours = data_identity(data);
    if meta.data != ours {
        bail!(
            "distill.cache {d} was made on other data (data.train / data.validation: its examples \
             are {}, this run's {ours}); {redo}",
            meta.data
        );
    }
    if let Some(teacher) = &cfg.distill.teacher {
        if teacher_fingerprint(teacher)? != meta.teacher_fingerprint {
            bail!(
                "distill.cache {d} was made from the teacher {} and distill.teacher names {}, whose \
                 files differ; {redo}, or remove distill.teacher to use the cache as it is",
                meta.teacher.display(),
                teacher.display()
            );
        }
    }
    Ok(())
}

/// Refuses a split whose tensors do not fit its examples (a damaged or hand-made file).
fn check_split(
    path: &Path,
    name: &str,
    examples: &[Example],
    offsets: &[i64],
    ids: &Tensor,
    logprobs: &Tensor,
    k: usize,
) -> Result<()> {
    let targets: Vec<i64> = std::iter::once(0)
        .chain(examples.iter().scan(0, |sum, e| {
            *sum += label_positions(e);
            Some(*sum)
        }))
        .collect();
    let rows = *targets.last().unwrap_or(&0);
    let (k, rows_of) = (k as i64, |t: &Tensor| t.size());
    if offsets != targets || rows_of(ids) != [rows, k] || rows_of(logprobs) != [rows, k + 1] {
        bail!(
            "{}: the {name} tensors do not fit the run's {} examples ({rows} label positions, k {k}); \
             the cache is damaged: re-run `lorafit distill-cache CONFIG`",
            path.display(),
            examples.len()
        );
    }
    Ok(())
}

/// The targets of one example, as [`Batch`] counts them: its labels after the first token.
fn label_positions(example: &Example) -> i64 {
    example.labels.iter().skip(1).filter(|&&l| l != IGNORE).count() as i64
}

/// What `lorafit distill-cache` wrote.
pub struct CacheReport {
    pub dir: PathBuf,
    pub top_k: usize,
    /// Label positions cached per split: training, validation.
    pub targets: (i64, i64),
    pub bytes: u64,
    pub seconds: f64,
}

/// `lorafit distill-cache CONFIG`: the teacher's top-`top_k` (at most the vocabulary) at every
/// label position of the config's training and validation examples, written to `out` (default
/// `distill.cache`).
pub fn distill_cache_command(
    config: &Path,
    overrides: &[String],
    top_k: usize,
    out: Option<&Path>,
    show_progress: bool,
) -> Result<CacheReport> {
    let started = Instant::now();
    let mut cfg = Config::load(config, overrides)?;
    resolve_format(&mut cfg.data)?;
    let Some(dir) = out.map(Path::to_path_buf).or_else(|| cfg.distill.cache.clone()) else {
        bail!("give --out DIR, or set distill.cache in the config, for where the cache goes")
    };
    let Some(teacher_dir) = cfg.distill.teacher.clone() else {
        bail!("distill-cache needs distill.teacher in the config: the teacher's model directory")
    };
    if top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    let device = resolve_device(&cfg.train.device)?;
    let (cfg, _) = precision::resolve(&cfg, device);
    if let Some(threads) = cfg.train.threads {
        tch::set_num_threads(threads as i32);
    }
    let spec = ModelSpec::from_dir(&cfg.model.path)?;
    let data = load_run_data(&cfg, &spec)?;
    let teacher = load_teacher(&cfg, &spec, &data.tokenizer, device)?;
    let k = top_k.min(spec.vocab_size as usize);
    let meta = CacheMeta {
        format_version: FORMAT_VERSION,
        teacher_fingerprint: teacher_fingerprint(&teacher_dir)?,
        teacher: teacher_dir,
        vocab_size: spec.vocab_size,
        temperature: cfg.distill.temperature,
        top_k: k,
        data: data_identity(&data),
    };
    let batches = data.train.examples.len() + data.validation.as_ref().map_or(0, |v| v.examples.len());
    let batches = batches.div_ceil(cfg.train.micro_batch_size);
    let bar = progress_bar(batches as u64, show_progress, "teacher batch");
    let mut tensors = Vec::new();
    let mut targets = (0, 0);
    let splits =
        std::iter::once(("train", &data.train)).chain(data.validation.as_ref().map(|v| ("validation", v)));
    for (name, split) in splits {
        let run = TeacherRun { teacher: &teacher, temperature: cfg.distill.temperature, k, device };
        let (offsets, ids, logprobs) =
            run.split(split, cfg.train.micro_batch_size, data.tokenizer.eos_id, &bar);
        let rows = ids.size()[0];
        if name == "train" {
            targets.0 = rows
        } else {
            targets.1 = rows
        }
        tensors.push((format!("{name}.offsets"), offsets));
        tensors.push((format!("{name}.ids"), ids.to_kind(Kind::Int)));
        tensors.push((format!("{name}.logprobs"), logprobs));
    }
    bar.finish_and_clear();
    let bytes = safetensors_bytes(&tensors, &[])?;
    let meta_json = serde_json::to_string_pretty(&meta)?;
    publish_dir(&dir, |staging| {
        std::fs::write(staging.join(TENSORS_FILE), &bytes)?;
        std::fs::write(staging.join(META_FILE), meta_json.as_bytes())?;
        Ok(())
    })
    .with_context(|| format!("cannot write the teacher cache {}", dir.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(CacheReport { dir, top_k: k, targets, bytes: bytes.len() as u64, seconds })
}

/// The teacher's top-k over examples.
struct TeacherRun<'a> {
    teacher: &'a Decoder,
    temperature: f64,
    k: usize,
    device: Device,
}

impl TeacherRun<'_> {
    /// `(offsets, ids, logprobs)` of a split's examples (see the module's layout), computed a
    /// micro-batch of examples at a time, advancing `bar` by one per batch.
    fn split(
        &self,
        split: &Prepared,
        micro_batch_size: usize,
        pad_id: i64,
        bar: &indicatif::ProgressBar,
    ) -> (Tensor, Tensor, Tensor) {
        let mut offsets = vec![0i64];
        let (mut ids, mut logprobs) = (Vec::new(), Vec::new());
        for chunk in split.examples.chunks(micro_batch_size) {
            for example in chunk {
                offsets.push(offsets.last().copied().unwrap_or(0) + label_positions(example));
            }
            let batch = Batch::collate(&chunk.iter().collect::<Vec<_>>(), pad_id, self.device);
            let (batch_ids, batch_logprobs) = self.batch_top_k(&batch);
            ids.push(batch_ids);
            logprobs.push(batch_logprobs);
            bar.inc(1);
        }
        let width = self.k as i64;
        let cat = |parts: &[Tensor], cols: i64, kind: Kind| match parts.is_empty() {
            true => Tensor::zeros([0, cols], (kind, Device::Cpu)),
            false => Tensor::cat(parts, 0).to_device(Device::Cpu),
        };
        (Tensor::from_slice(&offsets), cat(&ids, width, Kind::Int64), cat(&logprobs, width + 1, Kind::Float))
    }

    /// The top-k ids and log-probabilities (with the rest's) at each target of `batch`.
    fn batch_top_k(&self, batch: &Batch) -> (Tensor, Tensor) {
        tch::no_grad(|| {
            let hidden = target_hidden(self.teacher, batch);
            let targets = hidden.size()[0];
            let vocab = self.teacher.spec.vocab_size;
            // Two vocabulary-wide tensors per row: the logits and their log-probabilities.
            let rows_per_chunk = (LOGITS_PER_CHUNK / 2 / vocab).max(1);
            let (mut ids, mut logprobs) = (Vec::new(), Vec::new());
            for start in (0..targets).step_by(rows_per_chunk as usize) {
                let rows = rows_per_chunk.min(targets - start);
                let logits = self.teacher.logits(&hidden.narrow(0, start, rows), false);
                let logp = (logits.to_kind(Kind::Float) / self.temperature).log_softmax(-1, Kind::Float);
                let (top, top_ids) = logp.topk(self.k as i64, -1, true, true);
                let rest = logp.scatter_value(-1, &top_ids, f64::NEG_INFINITY).logsumexp([-1], true);
                ids.push(top_ids);
                logprobs.push(Tensor::cat(&[top, rest], -1));
            }
            let k = self.k as i64;
            match ids.is_empty() {
                true => (
                    Tensor::zeros([0, k], (Kind::Int64, self.device)),
                    Tensor::zeros([0, k + 1], (Kind::Float, self.device)),
                ),
                false => (Tensor::cat(&ids, 0), Tensor::cat(&logprobs, 0)),
            }
        })
    }
}
