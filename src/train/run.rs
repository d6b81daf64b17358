//! `lorafit train`: everything from a validated config to a run directory holding the adapter,
//! in four phases: [`prepare`] (every check and all loading, nothing written: a bad input leaves
//! nothing behind in `checkpoints/`) → [`create`] (the run directory) → the loop
//! ([`super::steps`]) → [`finish`] (the final adapter and checkpoint, samples, the summary).
//!
//! Steps are numbered from 1 everywhere: "step N" is the N-th optimizer update; its log records,
//! its checkpoint (`step-N/`) and the trainer state saved after it all say N.

use super::checkpoint::{self, TrainerState};
use super::distill::Distiller;
use super::eval::{eval_batches, validation_sums, Validation};
use super::memory::MemoryEstimate;
use super::preference::reference_logps;
use super::resume::{self, Change};
use super::steps::{save_checkpoint, train_loop, Trained};
use super::{precision, Trainer};
use crate::config::{Config, LoraConfig, Objective};
use crate::data::batch::MicroBatch;
use crate::data::format::{resolve_format, Example, Examples, PromptFormat};
use crate::data::{cache, load_data, Batch, EpochPlan, ModelFacts, RowLayout, RunData};
use crate::dist::{Backend, Group, Rendezvous};
use crate::files::{probe_writable, remove_staging, write_atomic, DirLock, LOCK_FILE};
use crate::generate::{generate, stop_tokens, Sampling};
use crate::lora::{self, peft, AttachedAdapters};
use crate::model::attention::AttentionPath;
use crate::model::load::{load_model_for, resolve_device, weight_kind};
use crate::model::{Decoder, ModelSpec};
use crate::observe::console::say;
use crate::observe::hparams::HParam;
use crate::observe::progress::{progress_bar, spinner};
pub use crate::observe::LogFormat;
use crate::observe::{Console, MetricsLog};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Device;

/// Options that belong to one invocation rather than to the run's config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Replace an existing run directory of the same name.
    pub overwrite: bool,
    /// Used to name the run when the config gives no `output.run_name`.
    pub config_stem: String,
    /// The config file and its `--set` overrides, for the command that resumes the run.
    pub config_path: PathBuf,
    pub overrides: Vec<String>,
    /// Continue from a checkpoint: `Some(None)` the newest of the run named by the config,
    /// `Some(Some(path))` a checkpoint or run directory.
    pub resume: Option<Option<PathBuf>>,
    /// Resume even when the config changes a setting exact resumption depends on.
    pub resume_anyway: bool,
    /// Set (e.g. by Ctrl-C, see [`super::interrupt`]) to stop after the current step with a
    /// checkpoint.
    pub stop: Option<Arc<AtomicBool>>,
    pub log_format: LogFormat,
    /// The group of a data-parallel run, and how many of its workers share this machine (they
    /// share its cores).
    pub group: Option<Arc<Group>>,
    pub local_workers: usize,
}

/// What a finished run reports.
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub adapter_dir: PathBuf,
    pub steps: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    pub val_loss_before: Option<f64>,
    pub val_loss_after: Option<f64>,
}

/// `lorafit train CONFIG`: the config file with its `--set` overrides, run; the run is named
/// after the file unless `output.run_name` names it (`opts.config_stem` is set here).
///
/// When the environment names a data-parallel run (see [`crate::dist::Rendezvous`]), this
/// process joins it first; its ranks but 0 report only errors.
pub fn train_command(config: &Path, overrides: &[String], mut opts: RunOptions) -> Result<RunSummary> {
    let mut cfg = Config::load(config, overrides)?;
    let detected = resolve_format(&mut cfg.data)?;
    if let Some(at) = Rendezvous::from_env()? {
        opts = join_group(&mut cfg, &at, opts)?;
    }
    for line in &detected {
        say!(Console(opts.log_format), "{line}");
    }
    let config_stem = config.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let overrides = overrides.to_vec();
    run(&cfg, &RunOptions { config_stem, config_path: config.to_path_buf(), overrides, ..opts })
}

/// Joins the data-parallel run `at` describes: Gloo on the CPU, NCCL with each rank on the GPU
/// of its local rank.
fn join_group(cfg: &mut Config, at: &Rendezvous, opts: RunOptions) -> Result<RunOptions> {
    let backend = Backend::for_device(resolve_device(&cfg.train.device)?);
    if backend == Backend::Nccl {
        // Each rank on the GPU of its local rank.
        cfg.train.device = format!("cuda:{}", at.local_rank);
    }
    let group = Group::join(at, backend, Duration::from_secs(cfg.train.dist_timeout))?;
    let log_format = if at.rank == 0 { opts.log_format } else { LogFormat::Quiet };
    Ok(RunOptions { group: Some(Arc::new(group)), local_workers: at.local_world, log_format, ..opts })
}

/// Runs `lorafit train` for a loaded, validated config.
pub fn run(cfg: &Config, opts: &RunOptions) -> Result<RunSummary> {
    let console = Console(opts.log_format);
    let plan = prepare(cfg, opts, console)?;
    let mut run = create(plan, opts, console)?;
    let run_dir = run.dir.clone();
    let outcome = before_training(&run).and_then(|val_loss_before| {
        let trained = train_loop(&mut run, opts.stop.as_deref())?;
        finish(run, trained, val_loss_before)
    });
    outcome.map_err(|e| with_way_back(e, &run_dir, opts))
}

/// A failure (or interrupt) of a run that has its directory, saying where the run is and the
/// command that continues it from its last checkpoint.
fn with_way_back(mut err: anyhow::Error, run_dir: &Path, opts: &RunOptions) -> anyhow::Error {
    let command = resume_command(run_dir, opts);
    if let Some(interrupted) = err.downcast_mut::<super::interrupt::Interrupted>() {
        interrupted.resume_command = command;
        return err;
    }
    let next = if checkpoint::list(run_dir).is_empty() {
        "it has no checkpoint to continue from (train.save_every saves them)".to_string()
    } else {
        format!("continue it from its last checkpoint with:\n  {command}")
    };
    anyhow::anyhow!("{err:#}\nThe run is in {}; {next}", run_dir.display())
}

/// `lorafit train CONFIG [--set ...] --resume RUN_DIR`, quoted for a POSIX shell.
fn resume_command(run_dir: &Path, opts: &RunOptions) -> String {
    let config = opts.config_path.display().to_string();
    let mut words = vec!["lorafit", "train", if config.is_empty() { "CONFIG" } else { &config }];
    for set in &opts.overrides {
        words.extend(["--set", set]);
    }
    let run_dir = run_dir.display().to_string();
    words.extend(["--resume", &run_dir]);
    if opts.resume_anyway {
        words.push("--resume-anyway");
    }
    words.iter().map(|w| shell_word(w)).collect::<Vec<_>>().join(" ")
}

/// `word` as one shell word: as it is when that is safe, else in single quotes.
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Everything a run needs, read and checked before anything is written.
pub(super) struct RunPlan {
    /// The config as given: what the run directory records.
    requested: Config,
    /// The config with the precision resolved for this machine: what the run uses.
    pub cfg: Config,
    precision: precision::Choice,
    pub device: Device,
    threads: usize,
    pub spec: ModelSpec,
    pub data: RunData,
    /// Seconds spent preparing (or reading from the cache) the data.
    prep_secs: f64,
    /// Seconds spent loading (with `model.quantize`, quantizing) the base model and its adapter.
    load_secs: f64,
    pub model: Decoder,
    pub lora_cfg: LoraConfig,
    pub injected: AttachedAdapters,
    /// What the run should take, and a warning when that is close to what it can get.
    memory: MemoryEstimate,
    /// What it would take with the other `train.gradient_checkpointing` setting.
    memory_alternative: MemoryEstimate,
    memory_warning: Option<String>,
    pub layout: RowLayout,
    /// Token count of each training example, in order.
    lengths: Vec<usize>,
    pub total_steps: usize,
    /// Tokens that end a generated sample.
    stop_tokens: Vec<i64>,
    pub val_batches: Option<Vec<Batch>>,
    /// With `train.precompute_ref`: each training example's reference log-probability.
    reference: Option<tch::Tensor>,
    pub trainer: Trainer,
    /// Where training stands: the start, or the checkpoint resumed from.
    pub state: TrainerState,
    /// The checkpoint resumed from, and its run directory.
    resume: Option<(PathBuf, PathBuf)>,
    /// The settings a resume changes (accepted by `--resume-anyway`).
    changes: Vec<Change>,
    /// The run directory's lock, once taken: early for a directory that already exists.
    lock: Option<DirLock>,
}

impl RunPlan {
    /// Which examples each step of `epoch` uses: with W data-parallel ranks, a step has W times
    /// the micro-batches of one process, the same sequence of examples whatever W.
    pub fn epoch_plan(&self, epoch: usize) -> EpochPlan {
        let train = &self.cfg.train;
        EpochPlan::new(
            &self.lengths,
            train.micro_batch_size,
            train.grad_accum_steps * self.trainer.rank_world().1,
            self.layout,
            self.cfg.data.shuffle,
            train.seed,
            epoch,
        )
    }

    /// The validation loss (mean over every label token, or for a preference objective over
    /// every pair (KTO: answer), with its objective's metric means named `eval/rewards/chosen`,
    /// ..., or distillation's `eval/kl` and `eval/ce`), this rank's
    /// share of the batches summed with the others'; `None` without validation data.
    pub fn validation_loss(&self, console: Console) -> Result<Option<Validation>> {
        let Some(batches) = &self.val_batches else { return Ok(None) };
        let bar = progress_bar(batches.len() as u64, console.shows_progress(), "eval batch");
        let mut sums = validation_sums(&self.model, batches, self.trainer.eval_loss(), &bar);
        if let Some(group) = &self.trainer.group {
            let summed = tch::Tensor::from_slice(&sums);
            group.all_reduce_sum(std::slice::from_ref(&summed))?;
            sums = Vec::<f64>::try_from(&summed)?;
        }
        Ok(Some(Validation::from_sums(&sums, self.trainer.eval_loss())))
    }

    /// The tensors of one training micro-batch, with its rows' precomputed reference
    /// log-probabilities when there are.
    pub fn batch(&self, micro_batch: &MicroBatch) -> Batch {
        let (examples, pad_id) = (&self.data.train.examples, self.data.tokenizer.eos_id);
        let mut batch = collate(examples, micro_batch, self.layout, pad_id, self.device);
        if let Some(reference) = &self.reference {
            let rows = example_rows(micro_batch, self.layout, self.device);
            batch.reference_logps = Some(reference.index_select(0, &rows));
        }
        if let Some(cache) = self.trainer.distiller().and_then(Distiller::cache) {
            // The targets' order: the rows', each row's examples in turn.
            batch.soft_targets = Some(cache.train_targets(micro_batch.iter().flatten().copied()));
        }
        batch
    }

    /// `train.precompute_ref`: the reference log-probabilities of every training example, computed
    /// once with the micro-batches of the first epoch (so that a one-epoch run uses the very values
    /// a reference pass per step computes), and of every validation batch.
    fn precompute_reference(&mut self, console: Console) {
        if !(self.cfg.train.precompute_ref && self.trainer.preference.is_some_and(|p| p.uses_reference())) {
            return;
        }
        let micro_batches: Vec<MicroBatch> = self.epoch_plan(0).steps.into_iter().flatten().collect();
        let validation = self.val_batches.as_ref().map_or(0, Vec::len);
        let bar = progress_bar(
            (micro_batches.len() + validation) as u64,
            console.shows_progress(),
            "reference batch",
        );
        let examples = self.data.train.examples.len() as i64;
        let mut reference = tch::Tensor::zeros([examples], (tch::Kind::Float, self.device));
        for micro_batch in &micro_batches {
            let logps = reference_logps(&self.model, &self.batch(micro_batch));
            reference = reference.index_copy(0, &example_rows(micro_batch, self.layout, self.device), &logps);
            bar.inc(1);
        }
        for batch in self.val_batches.iter_mut().flatten() {
            batch.reference_logps = Some(reference_logps(&self.model, batch));
            bar.inc(1);
        }
        bar.finish_and_clear();
        self.reference = Some(reference);
    }

    /// Whether this process writes the run's files: rank 0 of a data-parallel run, or the only one.
    pub fn writes(&self) -> bool {
        self.trainer.rank_world().0 == 0
    }

    /// Prints greedy continuations of the sample prompts under `heading`, each prompt put to the
    /// model as the training data put its examples (see [`PromptFormat`]).
    fn print_samples(&self, console: Console, heading: &str) -> Result<()> {
        let (cfg, data) = (&self.cfg, &self.data);
        let format = PromptFormat::of_data(&cfg.data, data.chat.as_ref());
        for prompt in &cfg.output.sample_prompts {
            let ids = format.ids(&data.tokenizer, prompt)?;
            let max_new = cfg.output.sample_max_new_tokens;
            let new = generate(
                &self.model,
                &ids,
                max_new,
                &self.stop_tokens,
                &Sampling::GREEDY,
                self.device,
                |_| {},
            );
            say!(console, "  [{heading}] {prompt:?} → {:?}", data.tokenizer.decode(&new)?.trim());
        }
        Ok(())
    }
}

/// The scalars whose last values are a run's metrics in TensorBoard's HParams dashboard: the
/// final and the best validation loss, and the throughput.
const HPARAMS_METRICS: &[&str] = &["eval/loss", "eval/best_loss", "train/tokens_per_s"];

impl RunPlan {
    /// The settings a user compares runs by, as TensorBoard's HParams dashboard shows them.
    fn hparams(&self) -> Vec<(&'static str, HParam)> {
        let (cfg, lora) = (&self.cfg, &self.lora_cfg);
        let number = |n: usize| HParam::Number(n as f64);
        let validation = cfg.data.validation.as_ref().map(|p| p.display().to_string());
        vec![
            ("lr", HParam::Number(cfg.train.lr)),
            ("lora.r", number(lora.r)),
            ("lora.alpha", HParam::Number(lora.alpha)),
            ("lora.target_modules", HParam::Text(lora.target_modules.to_string())),
            ("lora.dropout", HParam::Number(lora.dropout)),
            ("train.micro_batch_size", number(cfg.train.micro_batch_size)),
            ("train.grad_accum_steps", number(cfg.train.grad_accum_steps)),
            ("batch_size", number(cfg.train.micro_batch_size * cfg.train.grad_accum_steps)),
            ("data.max_seq_len", number(cfg.data.max_seq_len)),
            ("precision", HParam::Text(precision::name(self.precision.precision).to_string())),
            (
                "data.train",
                HParam::Text(
                    cfg.data
                        .train
                        .paths()
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
            ),
            ("data.validation", HParam::Text(validation.unwrap_or_default())),
            ("seed", HParam::Number(cfg.train.seed as f64)),
        ]
    }
}

/// A run that has its directory: the plan, and where its outputs go.
pub(super) struct Run {
    pub plan: RunPlan,
    pub dir: PathBuf,
    /// `None` on the ranks of a data-parallel run but rank 0, which alone writes.
    pub metrics: Option<MetricsLog>,
    pub console: Console,
}

impl Run {
    /// Logs `values` at `step` (on the process that writes the run's files).
    pub fn log(&mut self, step: usize, values: &[(&str, f64)]) -> Result<()> {
        match &mut self.metrics {
            Some(metrics) => metrics.log(step as u64, values),
            None => Ok(()),
        }
    }

    /// The base model as adapter files record it.
    pub fn base_model(&self) -> String {
        self.plan.cfg.model.path.display().to_string()
    }
}

/// The data `cfg` names, prepared for (and checked against) the model `spec` describes.
pub fn load_run_data(cfg: &Config, spec: &ModelSpec) -> Result<RunData> {
    let model = ModelFacts {
        eos_token_ids: &spec.eos_token_ids,
        embedding_rows: spec.vocab_size,
        positions: spec.positions(),
    };
    load_data(cfg, &model)
}

/// Phase 1: reads and checks everything the run needs — config, device and precision, data,
/// model and adapter, the checkpoint to resume — and writes nothing.
fn prepare(cfg: &Config, opts: &RunOptions, console: Console) -> Result<RunPlan> {
    let resume = opts.resume.as_ref().map(|r| resume::resume_point(cfg, r)).transpose()?;
    // Another process's run is refused before any loading.
    let existing = match &resume {
        Some((_, dir)) => Some(dir.clone()),
        None => cfg.output.run_name.as_ref().map(|name| cfg.output.dir.join(name)),
    };
    let writes = opts.group.as_ref().is_none_or(|g| g.rank == 0);
    let lock = existing.filter(|dir| writes && dir.is_dir()).map(|dir| DirLock::acquire(&dir)).transpose()?;
    let device = resolve_device(&cfg.train.device)?;
    let (resolved, precision) = precision::resolve(cfg, device);
    let (requested, cfg) = (cfg.clone(), resolved);
    let threads = threads(&cfg, opts);
    tch::set_num_threads(threads as i32);
    tch::manual_seed(cfg.train.seed as i64);

    let spec = ModelSpec::from_dir(&cfg.model.path)?;
    let prep_started = Instant::now();
    let spinner = spinner("preparing data", console.shows_progress());
    let data = load_run_data(&cfg, &spec);
    spinner.finish_and_clear();
    let data = data?;
    let prep_secs = prep_started.elapsed().as_secs_f64();
    // Checked before the model and adapters are allocated.
    let lora_cfg = lora_config(&cfg)?;
    let layout = row_layout(&cfg);
    let lengths = unit_lengths(&data.train.examples, layout);
    let row_tokens = longest_row(layout, &lengths);
    let memory = MemoryEstimate::of(&cfg, &spec, &lora_cfg, row_tokens)?;
    let mut toggled = cfg.clone();
    toggled.train.gradient_checkpointing = !cfg.train.gradient_checkpointing;
    let memory_alternative = MemoryEstimate::of(&toggled, &spec, &lora_cfg, row_tokens)?;
    let memory_warning = memory.check_host(device)?;
    let (model, injected, load_secs) = load_model_with_adapter(&cfg, &lora_cfg, device)?;
    let stop_tokens = stop_tokens(&cfg.model.path, &spec.eos_token_ids, data.chat.as_ref(), &data.tokenizer)?;
    let (trainer, val_batches) = trainer_and_validation(&cfg, &spec, &data, &injected, layout, device, opts)?;
    let mut plan = RunPlan {
        lengths,
        layout,
        total_steps: 0,
        state: TrainerState::default(),
        requested,
        cfg,
        precision,
        device,
        threads,
        spec,
        data,
        prep_secs,
        load_secs,
        model,
        lora_cfg,
        injected,
        memory,
        memory_alternative,
        memory_warning,
        stop_tokens,
        val_batches,
        reference: None,
        trainer,
        resume,
        changes: Vec::new(),
        lock,
    };
    // The plan of every epoch up front: with packing, the number of rows varies by epoch.
    plan.total_steps = match plan.cfg.train.max_steps {
        Some(n) => n,
        None => (0..plan.cfg.train.epochs).map(|e| plan.epoch_plan(e).steps.len()).sum(),
    };
    restore(&mut plan, opts.resume_anyway)?;
    // After restoring: a resumed run computes them again, as they were.
    plan.precompute_reference(console);
    Ok(plan)
}

/// The trainer of the run's objective (with its teacher when it distills), and this rank's
/// share of the validation batches.
fn trainer_and_validation(
    cfg: &Config,
    spec: &ModelSpec,
    data: &RunData,
    injected: &AttachedAdapters,
    layout: RowLayout,
    device: Device,
    opts: &RunOptions,
) -> Result<(Trainer, Option<Vec<Batch>>)> {
    let params = injected.trainables.iter().map(|t| t.tensor.shallow_clone()).collect();
    let mut trainer = Trainer::new(params, &cfg.train);
    trainer.group = opts.group.clone();
    if cfg.train.objective == Objective::Distill {
        trainer.distill_from(Distiller::load(cfg, spec, data, device)?);
    }
    let val_batches = (data.validation.as_ref())
        .map(|v| eval_batches(v, cfg.train.micro_batch_size, data.tokenizer.eos_id, device, layout))
        .map(|mut batches| {
            if let Some(cache) = trainer.distiller().and_then(Distiller::cache) {
                cache.attach_validation(&mut batches);
            }
            rank_share(batches, opts.group.as_deref())
        });
    Ok((trainer, val_batches))
}

/// CPU threads: the config's, else the cores shared among the workers on this machine.
fn threads(cfg: &Config, opts: &RunOptions) -> usize {
    cfg.train.threads.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        (cores / opts.local_workers.max(1)).max(1)
    })
}

/// This rank's evaluation batches: every W-th, from its rank on.
fn rank_share(batches: Vec<Batch>, group: Option<&Group>) -> Vec<Batch> {
    let Some(g) = group else { return batches };
    batches.into_iter().skip(g.rank).step_by(g.world).collect()
}

/// Records the settings the run depends on in its state, and when resuming, checks them
/// against the checkpoint's (refusing a change unless `anyway`) before restoring it; in a
/// data-parallel run every rank then takes rank 0's adapter.
fn restore(plan: &mut RunPlan, anyway: bool) -> Result<()> {
    let settings = resume::settings(&plan.requested, &plan.data, plan.trainer.rank_world().1)?;
    if let Some((point, _)) = &plan.resume {
        let changes = resume::changes(&checkpoint::read_state(point)?.settings, &settings);
        resume::check(&changes, point, anyway)?;
        plan.state = checkpoint::load(point, &plan.injected, &mut plan.trainer)?;
        plan.changes = changes;
    }
    plan.state.settings = settings;
    if let Some(group) = &plan.trainer.group {
        // Every rank starts from rank 0's adapter (the same seed makes them equal anyway).
        group.broadcast(&plan.trainer.params, 0)?;
    }
    Ok(())
}

/// The adapter the run trains: the config's, or the shape of `lora.init_from`'s.
fn lora_config(cfg: &Config) -> Result<LoraConfig> {
    Ok(match &cfg.lora.init_from {
        Some(dir) => LoraConfig { dropout: cfg.lora.dropout, ..peft::read_config(dir)? },
        None => cfg.lora.clone(),
    })
}

/// The frozen model with the adapter `lora_cfg` injected: fresh, or starting from `lora.init_from`;
/// and the seconds that took.
fn load_model_with_adapter(
    cfg: &Config,
    lora_cfg: &LoraConfig,
    device: Device,
) -> Result<(Decoder, AttachedAdapters, f64)> {
    let started = Instant::now();
    let mut model = load_model_for(cfg, device)?;
    let injected = lora::inject(&mut model, lora_cfg, device)?;
    if let Some(dir) = &cfg.lora.init_from {
        peft::copy_weights(dir, &injected)?;
    }
    Ok((model, injected, started.elapsed().as_secs_f64()))
}

/// How the run lays examples into rows.
pub fn row_layout(cfg: &Config) -> RowLayout {
    match Examples::of(cfg.train.objective) {
        Examples::Pairs => RowLayout::Pairs,
        // KTO's answers stand alone, a row each (never packed: each has its own loss).
        Examples::Unpaired => RowLayout::ByLength,
        Examples::Single if cfg.data.packing => RowLayout::Packed(cfg.data.max_seq_len),
        Examples::Single => RowLayout::ByLength,
    }
}

/// The tensors of one micro-batch.
pub fn collate(
    examples: &[Example],
    micro_batch: &MicroBatch,
    layout: RowLayout,
    pad_id: i64,
    device: Device,
) -> Batch {
    let rows: Vec<Vec<&Example>> =
        micro_batch.iter().map(|row| row.iter().map(|&i| &examples[i]).collect()).collect();
    match layout {
        RowLayout::Packed(_) => Batch::pack(&rows, pad_id, device),
        RowLayout::ByLength => {
            Batch::collate(&rows.into_iter().flatten().collect::<Vec<_>>(), pad_id, device)
        }
        RowLayout::Pairs => {
            let pairs: Vec<_> =
                micro_batch.iter().flatten().map(|&i| (&examples[2 * i], &examples[2 * i + 1])).collect();
            Batch::collate_pairs(&pairs, pad_id, device)
        }
    }
}

/// The example indices of the rows of a micro-batch of one example per row, in [`collate`]'s
/// order; for pairs, [`Batch::collate_pairs`]'s: the chosen answers (examples `2p`), then the
/// rejected ones (`2p + 1`).
fn example_rows(micro_batch: &MicroBatch, layout: RowLayout, device: Device) -> tch::Tensor {
    let units: Vec<i64> = micro_batch.iter().flatten().map(|&p| p as i64).collect();
    let rows: Vec<i64> = match layout {
        RowLayout::Pairs => units.iter().map(|p| 2 * p).chain(units.iter().map(|p| 2 * p + 1)).collect(),
        _ => units,
    };
    tch::Tensor::from_slice(&rows).to_device(device)
}

/// The tokens of each unit the epoch plan orders: an example, or a pair's longer answer.
fn unit_lengths(examples: &[Example], layout: RowLayout) -> Vec<usize> {
    let unit = if layout == RowLayout::Pairs { 2 } else { 1 };
    examples.chunks(unit).map(|u| u.iter().map(|e| e.input_ids.len()).max().unwrap_or(0)).collect()
}

/// The tokens of the longest row: the packed length, or the longest example.
fn longest_row(layout: RowLayout, lengths: &[usize]) -> usize {
    match layout {
        RowLayout::Packed(n) => n,
        RowLayout::ByLength | RowLayout::Pairs => lengths.iter().copied().max().unwrap_or(0),
    }
}

/// Phase 2: the run directory with the config it runs (`config.yaml`) and its metrics; the
/// prepared data goes to the cache now that every check has passed.
fn create(mut plan: RunPlan, opts: &RunOptions, console: Console) -> Result<Run> {
    if !plan.writes() {
        // The other ranks of a data-parallel run write nothing; rank 0 names the run directory.
        let dir = run_dir_of_rank_0(&plan, None)?;
        return Ok(Run { plan, dir, metrics: None, console });
    }
    let dir = match &plan.resume {
        Some((_, dir)) => create_run_dir(
            &Config { output: run_output(&plan.requested, dir), ..plan.requested.clone() },
            opts,
            &mut plan.lock,
        )?,
        None => create_run_dir(&plan.requested, opts, &mut plan.lock)?,
    };
    let dir = run_dir_of_rank_0(&plan, Some(dir))?;
    // The lock is held: whatever staging files are here were left by killed processes.
    remove_staging(&dir)?;
    // `auto` stays `auto`, so the file runs (or resumes: adapter and optimizer state are fp32
    // either way) with the precision that suits the machine it runs on; the comment keeps what
    // this run used.
    let config_yaml =
        format!("# precision used: {}\n{}", plan.precision.describe(), plan.requested.to_yaml());
    write_atomic(&dir.join("config.yaml"), config_yaml.as_bytes())?;
    plan.data.store_in_cache();
    describe(&plan, Some(&dir), console);
    let metrics = match &plan.resume {
        Some((point, _)) => {
            checkpoint::forget_after(&dir, plan.state.step)?;
            let (step, epoch) = (plan.state.step, plan.state.epoch + 1);
            say!(console, "  resuming from {} (step {step}, epoch {epoch})", point.display());
            if !plan.changes.is_empty() {
                resume::record(&dir, step, &plan.changes)?;
                let list: Vec<String> = plan.changes.iter().map(|c| c.to_string()).collect();
                say!(console, "  resuming with changed settings (--resume-anyway): {}", list.join("; "));
            }
            Some(MetricsLog::open_append(&dir, plan.state.step as u64)?)
        }
        None => {
            let mut metrics = MetricsLog::create(&dir)?;
            metrics.text("hparams", &format!("```yaml\n{config_yaml}```"))?;
            metrics.hparams_start(&plan.hparams(), HPARAMS_METRICS)?;
            Some(metrics)
        }
    };
    Ok(Run { plan, dir, metrics, console })
}

/// The run directory rank 0 created (`dir` there), on every rank of a data-parallel run: a
/// generated name holds the time, which the ranks would not agree on.
fn run_dir_of_rank_0(plan: &RunPlan, dir: Option<PathBuf>) -> Result<PathBuf> {
    let Some(group) = &plan.trainer.group else { return Ok(dir.unwrap_or_default()) };
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let ours = dir.map(PathBuf::into_os_string).unwrap_or_default();
    let shared = group.broadcast_bytes(ours.as_bytes(), 0)?;
    Ok(PathBuf::from(std::ffi::OsString::from_vec(shared)))
}

/// `lorafit train CONFIG --dry-run`: the prepare phase alone (every check and all loading) and
/// the figures of the run's opening lines; nothing is written: no run directory, no data cache
/// entry.
pub fn dry_run_command(config: &Path, overrides: &[String], opts: RunOptions) -> Result<()> {
    let mut cfg = Config::load(config, overrides)?;
    let detected = resolve_format(&mut cfg.data)?;
    let console = Console(opts.log_format);
    for line in &detected {
        say!(console, "{line}");
    }
    let plan = prepare(&cfg, &opts, console)?;
    describe(&plan, None, console);
    Ok(())
}

/// Prints what is about to run: model, precision, memory, adapter, data and steps, and where
/// the run goes (`None`: nowhere, a dry run).
fn describe(plan: &RunPlan, run_dir: Option<&Path>, console: Console) {
    let (cfg, spec, injected) = (&plan.cfg, &plan.spec, &plan.injected);
    say!(
        console,
        "lorafit: {} ({:?}, {} layers, {:.2}M parameters, {} weights) on {}, {} threads",
        cfg.model.path.display(),
        spec.family,
        spec.num_layers,
        spec.parameter_count() as f64 / 1e6,
        kind_name(weight_kind(cfg.model.dtype, cfg.train.precision)),
        device_name(plan.device),
        plan.threads
    );
    say!(console, "  precision {}", plan.precision.describe());
    say!(console, "  base model loaded in {:.1} s", plan.load_secs);
    let row_tokens = longest_row(plan.layout, &plan.lengths);
    let packed = matches!(plan.layout, RowLayout::Packed(_));
    let attention =
        AttentionPath::choose(plan.device, plan.model.activations, row_tokens as i64, false, packed);
    say!(console, "  attention {}", attention.name());
    say!(console, "  {}", plan.memory.describe());
    say!(console, "    {}", plan.memory_alternative.describe_alternative(!cfg.train.gradient_checkpointing));
    if let Some(warning) = &plan.memory_warning {
        say!(console, "  warning: {warning}");
    }
    say!(
        console,
        "  LoRA r={} alpha={} on {} modules ({}): {} trainable parameters ({:.3}% of the base){}",
        plan.lora_cfg.r,
        plan.lora_cfg.alpha,
        injected.module_paths.len(),
        injected.target_leaf_names().join(","),
        injected.parameter_count(),
        100.0 * injected.parameter_count() as f64 / spec.parameter_count() as f64,
        cfg.lora.init_from.as_ref().map(|d| format!(", starting from {}", d.display())).unwrap_or_default()
    );
    let data = &plan.data;
    let train_tokens: usize = plan.lengths.iter().sum();
    let epoch = plan.epoch_plan(0);
    let (real, padded) = epoch.tokens(&plan.lengths);
    say!(
        console,
        "  training data: {} ({train_tokens} tokens, {} in {:.2} s)",
        data.train.report(),
        if data.cached { "from the data cache" } else { "prepared" },
        plan.prep_secs
    );
    say!(
        console,
        "  per epoch: {} steps, {padded} batch tokens of which {real} real ({:.1}%)",
        epoch.steps.len(),
        100.0 * real as f64 / padded.max(1) as f64
    );
    if let Some(v) = &data.validation {
        say!(console, "  validation data: {}", v.report());
    }
    for note in data.train.notes.iter().chain(data.validation.iter().flat_map(|v| &v.notes)) {
        say!(console, "  note: {note}");
    }
    if let Some(chat) = &data.chat {
        say!(console, "  chat template: {}", chat.described);
    }
    let rows = match plan.layout {
        RowLayout::Packed(n) => format!("packed rows of up to {n} tokens"),
        RowLayout::ByLength => "examples (grouped by length)".to_string(),
        RowLayout::Pairs => "preference pairs (grouped by length)".to_string(),
    };
    let (accum, micro) = (cfg.train.grad_accum_steps, cfg.train.micro_batch_size);
    let workers = match plan.trainer.rank_world().1 {
        1 => String::new(),
        world => format!(" on each of {world} workers"),
    };
    say!(
        console,
        "  {} steps of {accum} micro-batches × {micro} {rows}{workers} → {}",
        plan.total_steps,
        run_dir.map_or("nothing written (--dry-run)".to_string(), |dir| dir.display().to_string())
    );
}

/// A weight dtype as users write it: "fp32", "bf16".
fn kind_name(kind: tch::Kind) -> String {
    match kind {
        tch::Kind::Float => "fp32".to_string(),
        tch::Kind::BFloat16 => "bf16".to_string(),
        tch::Kind::Half => "fp16".to_string(),
        other => format!("{other:?}"),
    }
}

/// A device as users say it: "the CPU", "CUDA GPU 0".
fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "the CPU".to_string(),
        Device::Cuda(n) => format!("CUDA GPU {n}"),
        Device::Mps => "the Apple GPU (MPS)".to_string(),
        Device::Vulkan => "Vulkan".to_string(),
    }
}

/// A fresh run's validation loss and samples before training (none when resuming).
fn before_training(run: &Run) -> Result<Option<f64>> {
    let (plan, console) = (&run.plan, run.console);
    if plan.resume.is_some() {
        return Ok(None);
    }
    let validation = plan.validation_loss(console)?;
    if let Some(v) = &validation {
        say!(console, "  validation loss before training: {:.4} ({})", v.loss, v.summary());
    }
    let val_loss_before = validation.map(|v| v.loss);
    if plan.writes() {
        plan.print_samples(console, "before")?;
    }
    Ok(val_loss_before)
}

/// Phase 4: the final adapter and checkpoint, the summary and the samples after training.
fn finish(mut run: Run, trained: Trained, val_loss_before: Option<f64>) -> Result<RunSummary> {
    let adapter_dir = run.dir.join("adapter");
    let plan = &run.plan;
    let summary = RunSummary {
        steps: plan.state.step,
        first_loss: plan.state.first_loss.unwrap_or(f64::NAN),
        last_loss: trained.last_loss,
        val_loss_before,
        val_loss_after: trained.last_val_loss,
        adapter_dir: adapter_dir.clone(),
        run_dir: run.dir.clone(),
    };
    if !plan.writes() {
        return Ok(summary);
    }
    peft::save(&adapter_dir, &plan.lora_cfg, &plan.injected, &run.base_model())?;
    // The final state too, so a finished run can be extended with a larger max_steps.
    save_checkpoint(&run)?;
    if let Some(metrics) = run.metrics.as_mut() {
        metrics.hparams_end()?;
    }
    let plan = &run.plan;

    let (console, state) = (run.console, &plan.state);
    let (first_loss, last_loss) = (summary.first_loss, summary.last_loss);
    say!(
        console,
        "  trained {} steps in {:.1} s ({:.0} tokens/s, {:.0}% of batch tokens real): loss {first_loss:.4} → {last_loss:.4}{}",
        state.step,
        trained.seconds,
        (state.tokens_seen - trained.tokens_at_start) as f64 / trained.seconds,
        100.0 * state.tokens_seen as f64 / state.padded_seen.max(1) as f64,
        if state.skipped_steps > 0 { format!(", {} non-finite steps skipped", state.skipped_steps) } else { String::new() }
    );
    if let (Some(before), Some(after)) = (val_loss_before, trained.last_val_loss) {
        // Only the SFT loss is a token NLL, whose exponential is a perplexity.
        let perplexity = match plan.cfg.train.objective {
            Objective::Sft => format!(" (perplexity {:.2} → {:.2})", before.exp(), after.exp()),
            _ => String::new(),
        };
        say!(console, "  validation loss {before:.4} → {after:.4}{perplexity}");
    }
    plan.print_samples(console, "after")?;
    say!(console, "  adapter (PEFT format): {}", adapter_dir.display());
    say!(console, "  {}", crate::export::compat::check(&adapter_dir)?.describe());
    Ok(summary)
}

/// A run name from the config file name, the time (UTC) and a short hash of the resolved
/// config, so runs sort by time and differently configured runs never collide:
/// `default-20261123-171502-3fa9c1`.
fn generated_run_name(stem: &str, cfg: &Config) -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = crate::clock::civil_from_days(days as i64);
    let stem = if stem.is_empty() { "run" } else { stem };
    let hash = cache::CacheKey::default().add_bytes(cfg.to_yaml().as_bytes()).hex();
    format!(
        "{stem}-{year:04}{month:02}{day:02}-{:02}{:02}{:02}-{}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        &hash[..6]
    )
}

/// Creates the run directory and takes its lock (unless `lock` already holds it), refusing to mix
/// a new run into an old one; `--overwrite` empties an existing directory under its lock.
fn create_run_dir(cfg: &Config, opts: &RunOptions, lock: &mut Option<DirLock>) -> Result<PathBuf> {
    let name = cfg.output.run_name.clone().unwrap_or_else(|| generated_run_name(&opts.config_stem, cfg));
    let dir = cfg.output.dir.join(name);
    let existed = dir.exists();
    if opts.resume.is_none() && !existed {
        std::fs::create_dir_all(&cfg.output.dir)
            .and_then(|_| std::fs::create_dir(&dir))
            .with_context(|| format!("cannot create run directory {}", dir.display()))?;
    }
    if lock.is_none() {
        *lock = Some(DirLock::acquire(&dir)?);
    }
    if opts.resume.is_none() && existed {
        if !opts.overwrite {
            bail!(
                "run directory {} already exists; choose another name with --set output.run_name=NAME \
                 or pass --overwrite to replace it",
                dir.display()
            );
        }
        empty_dir(&dir)?;
    }
    // A read-only or full output directory fails before any training.
    probe_writable(&dir).with_context(|| format!("the run directory {} is not writable", dir.display()))?;
    Ok(dir)
}

/// Removes everything in `dir` but its lock file.
fn empty_dir(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        if entry.file_name() != LOCK_FILE {
            let removed =
                if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            removed.with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// The output section that puts the run in `run_dir` (for a resumed run found by path).
fn run_output(cfg: &Config, run_dir: &Path) -> crate::config::OutputConfig {
    crate::config::OutputConfig {
        dir: run_dir.parent().map(Path::to_path_buf).unwrap_or_default(),
        run_name: run_dir.file_name().map(|n| n.to_string_lossy().into_owned()),
        ..cfg.output.clone()
    }
}
