//! `lorafit train`: everything from a validated config to a run directory holding the adapter.
//!
//! All checks of user input (config, model files, data files) happen before the run directory
//! is created, so a bad input leaves nothing behind in `checkpoints/`.

use super::checkpoint::{self, TrainerState};
use super::{evaluate, evaluate_with_progress, precision, schedule, StepStats, Trainer};
use crate::config::{Config, LoraConfig, OnNonFinite};
use crate::data::batch::MicroBatch;
use crate::data::format::{Example, Prepared, PromptFormat};
use crate::data::{cache, load_data, Batch, EpochPlan, RowLayout, RunData};
use crate::files::write_atomic;
use crate::generate::{generate, stop_tokens, Sampling};
use crate::lora::{self, peft, AttachedAdapters};
use crate::model::load::{load_model_for, resolve_device, weight_kind};
use crate::model::{Decoder, ModelSpec};
use crate::observe::MetricsLog;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::Device;

/// Options that belong to one invocation rather than to the run's config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Replace an existing run directory of the same name.
    pub overwrite: bool,
    /// Used to name the run when the config gives no `output.run_name`.
    pub config_stem: String,
    /// Continue from a checkpoint: `Some(None)` the newest of the run named by the config,
    /// `Some(Some(path))` a checkpoint or run directory.
    pub resume: Option<Option<PathBuf>>,
    /// Set (e.g. by Ctrl-C) to stop after the current step with a checkpoint.
    pub stop: Option<Arc<AtomicBool>>,
    pub log_format: LogFormat,
}

/// How progress is reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines on stdout, and a progress bar on a terminal.
    #[default]
    Text,
    /// One JSON object per logged step and evaluation on stdout (the records of
    /// metrics.jsonl, with an `"event"` field), for scripts; human-readable lines go to stderr.
    Json,
    /// Only errors.
    Quiet,
}

/// Where a run's messages go, by [`LogFormat`].
#[derive(Clone, Copy)]
struct Console(LogFormat);

impl Console {
    fn line(&self, text: &str) {
        match self.0 {
            LogFormat::Text => println!("{text}"),
            LogFormat::Json => eprintln!("{text}"),
            LogFormat::Quiet => {}
        }
    }

    fn record(&self, event: &str, step: usize, values: &[(&str, f64)]) {
        if self.0 == LogFormat::Json {
            let mut record = serde_json::Map::new();
            record.insert("event".into(), event.into());
            record.insert("step".into(), step.into());
            for (k, v) in values {
                record.insert(k.to_string(), serde_json::json!(v));
            }
            println!("{}", serde_json::Value::Object(record));
        }
    }
}

macro_rules! say {
    ($console:expr, $($arg:tt)*) => { $console.line(&format!($($arg)*)) };
}

/// The run stopped on request after saving a checkpoint (exit code 130).
#[derive(Debug)]
pub struct Interrupted {
    pub step: usize,
    pub checkpoint: PathBuf,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "interrupted after step {}; the checkpoint {} holds everything to continue: run the same \
             command with --resume",
            self.step,
            self.checkpoint.display()
        )
    }
}

impl std::error::Error for Interrupted {}

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

/// Micro-batches of `examples`, in order, for evaluation.
fn eval_batches(data: &Prepared, micro_batch_size: usize, pad_id: i64, device: Device) -> Vec<Batch> {
    data.examples
        .chunks(micro_batch_size)
        .map(|chunk| Batch::collate(&chunk.iter().collect::<Vec<_>>(), pad_id, device))
        .collect()
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

/// Creates the run directory, refusing to mix a new run into an old one.
fn create_run_dir(cfg: &Config, opts: &RunOptions) -> Result<PathBuf> {
    let name = cfg.output.run_name.clone().unwrap_or_else(|| generated_run_name(&opts.config_stem, cfg));
    let dir = cfg.output.dir.join(name);
    // A probe write, so a read-only or full output directory fails before any training.
    let probe = |dir: &Path| {
        write_atomic(&dir.join(".write-test"), b"ok")
            .and_then(|_| Ok(std::fs::remove_file(dir.join(".write-test"))?))
            .with_context(|| format!("the run directory {} is not writable", dir.display()))
    };
    if opts.resume.is_some() {
        probe(&dir)?;
        return Ok(dir);
    }
    if dir.exists() {
        if !opts.overwrite {
            bail!(
                "run directory {} already exists; choose another name with --set output.run_name=NAME \
                 or pass --overwrite to replace it",
                dir.display()
            );
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create run directory {}", dir.display()))?;
    probe(&dir)?;
    Ok(dir)
}

/// The checkpoint `--resume` names, and the run directory it belongs to.
fn resume_point(cfg: &Config, resume: &Option<PathBuf>) -> Result<(PathBuf, PathBuf)> {
    let given = match resume {
        Some(path) => path.clone(),
        None => match &cfg.output.run_name {
            Some(name) => cfg.output.dir.join(name),
            None => {
                bail!("--resume needs the run: set output.run_name in the config, or pass --resume RUN_DIR")
            }
        },
    };
    let checkpoint = checkpoint::resolve(&given)?;
    let run_dir = checkpoint.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((checkpoint, run_dir))
}

/// A bar counting `unit`s on a terminal (hidden otherwise, or when not `wanted`).
fn progress_bar(total: u64, wanted: bool, unit: &str) -> ProgressBar {
    if !wanted || !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::new(total);
    let template = format!("{{spinner}} {unit} {{pos}}/{{len}} [{{bar:30}}] {{msg}} eta {{eta}}");
    bar.set_style(ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> "));
    bar
}

/// A spinner with `message` on a terminal while something of unknown length runs.
fn spinner(message: &str, wanted: bool) -> ProgressBar {
    if !wanted || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner().with_message(message.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// Prints greedy continuations of the sample prompts under `heading`, each prompt put to the
/// model as the training data put its examples (see [`PromptFormat`]).
fn print_samples(
    console: Console,
    cfg: &Config,
    model: &Decoder,
    data: &RunData,
    stop: &[i64],
    device: Device,
    heading: &str,
) -> Result<()> {
    let format = PromptFormat::of_data(&cfg.data, data.chat.as_ref());
    for prompt in &cfg.output.sample_prompts {
        let ids = format.ids(&data.tokenizer, prompt)?;
        let new =
            generate(model, &ids, cfg.output.sample_max_new_tokens, stop, &Sampling::GREEDY, device, |_| {});
        say!(console, "  [{heading}] {prompt:?} → {:?}", data.tokenizer.decode(&new)?.trim());
    }
    Ok(())
}

/// How the run lays examples into rows.
pub fn row_layout(cfg: &Config) -> RowLayout {
    if cfg.data.packing {
        RowLayout::Packed(cfg.data.max_seq_len)
    } else {
        RowLayout::ByLength
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
    }
}

/// `lorafit train CONFIG`: the config file with its `--set` overrides, run; the run is named
/// after the file unless `output.run_name` names it (`opts.config_stem` is set here).
pub fn train_command(config: &Path, overrides: &[String], opts: RunOptions) -> Result<RunSummary> {
    let cfg = Config::load(config, overrides)?;
    let config_stem = config.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    run(&cfg, &RunOptions { config_stem, ..opts })
}

/// Runs `lorafit train` for a loaded, validated config.
pub fn run(cfg: &Config, opts: &RunOptions) -> Result<RunSummary> {
    let console = Console(opts.log_format);
    let device = resolve_device(&cfg.train.device)?;
    // The run works with the resolved precision; the run directory records the config as given.
    let (resolved, precision) = precision::resolve(cfg, device);
    let (requested, cfg) = (cfg, &resolved);
    let threads = cfg
        .train
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    tch::set_num_threads(threads as i32);
    tch::manual_seed(cfg.train.seed as i64);

    // Everything a user supplies is read and checked before the run directory exists.
    let spec = ModelSpec::from_dir(&cfg.model.path)?;
    let prep_started = Instant::now();
    let spinner = spinner("preparing data", opts.log_format == LogFormat::Text);
    let data = load_data(cfg, &spec.eos_token_ids, spec.vocab_size);
    spinner.finish_and_clear();
    let data = data?;
    let prep_secs = prep_started.elapsed().as_secs_f64();
    let mut model = load_model_for(cfg, device)?;
    let lora_cfg = match &cfg.lora.init_from {
        Some(dir) => LoraConfig { dropout: cfg.lora.dropout, ..peft::read_config(dir)? },
        None => cfg.lora.clone(),
    };
    let injected: AttachedAdapters = lora::inject(&mut model, &lora_cfg, device)?;
    if let Some(dir) = &cfg.lora.init_from {
        peft::copy_weights(dir, &injected)?;
    }

    // The plan of every epoch up front: with packing, the number of rows varies by epoch.
    let lengths: Vec<usize> = data.train.examples.iter().map(|e| e.input_ids.len()).collect();
    let layout = row_layout(cfg);
    let plan_for = |epoch: usize| {
        EpochPlan::new(
            &lengths,
            cfg.train.micro_batch_size,
            cfg.train.grad_accum_steps,
            layout,
            cfg.data.shuffle,
            cfg.train.seed,
            epoch,
        )
    };
    let total_steps = match cfg.train.max_steps {
        Some(n) => n,
        None => (0..cfg.train.epochs).map(|e| plan_for(e).steps.len()).sum(),
    };
    let resume = opts.resume.as_ref().map(|r| resume_point(cfg, r)).transpose()?;
    let run_dir = match &resume {
        Some((_, dir)) => {
            create_run_dir(&Config { output: run_output(cfg, dir), ..requested.clone() }, opts)?
        }
        None => create_run_dir(requested, opts)?,
    };
    // `auto` stays `auto`, so the file runs (or resumes: adapter and optimizer state are fp32
    // either way) with the precision that suits the machine it runs on; the comment keeps what
    // this run used.
    let config_yaml = format!("# precision used: {}\n{}", precision.describe(), requested.to_yaml());
    write_atomic(&run_dir.join("config.yaml"), config_yaml.as_bytes())?;
    data.store_in_cache();
    let (tok, train_data, val_data, cached) = (&data.tokenizer, &data.train, &data.validation, data.cached);
    let stop = stop_tokens(&cfg.model.path, &spec.eos_token_ids, data.chat.as_ref(), tok)?;

    say!(
        console,
        "lorafit: {} ({:?}, {} layers, {:.2}M parameters, {:?} weights) on {device:?}, {threads} threads",
        cfg.model.path.display(),
        spec.family,
        spec.num_layers,
        spec.parameter_count() as f64 / 1e6,
        weight_kind(cfg.model.dtype, cfg.train.precision)
    );
    say!(console, "  precision {}", precision.describe());
    say!(
        console,
        "  LoRA r={} alpha={} on {} modules ({}): {} trainable parameters ({:.3}% of the base){}",
        lora_cfg.r,
        lora_cfg.alpha,
        injected.module_paths.len(),
        injected.target_leaf_names().join(","),
        injected.parameter_count(),
        100.0 * injected.parameter_count() as f64 / spec.parameter_count() as f64,
        cfg.lora.init_from.as_ref().map(|d| format!(", starting from {}", d.display())).unwrap_or_default()
    );
    let train_tokens: usize = lengths.iter().sum();
    say!(
        console,
        "  training data: {} ({train_tokens} tokens, {} in {prep_secs:.2} s)",
        train_data.report(),
        if cached { "from the data cache" } else { "prepared" }
    );
    if let Some(v) = val_data {
        say!(console, "  validation data: {}", v.report());
    }
    for note in train_data.notes.iter().chain(val_data.iter().flat_map(|v| &v.notes)) {
        say!(console, "  note: {note}");
    }
    if let Some(chat) = &data.chat {
        say!(console, "  chat template: {}", chat.described);
    }
    say!(
        console,
        "  {total_steps} steps of {} micro-batches × {} {} → {}",
        cfg.train.grad_accum_steps,
        cfg.train.micro_batch_size,
        match layout {
            RowLayout::Packed(n) => format!("packed rows of up to {n} tokens"),
            RowLayout::ByLength => "examples (grouped by length)".to_string(),
        },
        run_dir.display()
    );

    let pad_id = tok.eos_id;
    let val_batches = val_data.as_ref().map(|v| eval_batches(v, cfg.train.micro_batch_size, pad_id, device));
    let params: Vec<tch::Tensor> = injected.trainables.iter().map(|t| t.tensor.shallow_clone()).collect();
    let mut trainer = Trainer::new(params, &cfg.train);
    let mut state = TrainerState::default();
    if let Some((point, _)) = &resume {
        state = checkpoint::load(point, &injected, &mut trainer.optimizer)?;
        checkpoint::forget_after(&run_dir, state.step)?;
        say!(console, "  resuming from {} (step {}, epoch {})", point.display(), state.step, state.epoch + 1);
    }
    let show_bars = opts.log_format == LogFormat::Text;
    let eval_bar = |n: usize| progress_bar(n as u64, show_bars, "eval batch");
    let val_loss_before = val_batches
        .as_ref()
        .filter(|_| resume.is_none())
        .map(|b| evaluate_with_progress(&model, b, &eval_bar(b.len())).0);
    if let Some(loss) = val_loss_before {
        say!(console, "  validation loss before training: {loss:.4} (perplexity {:.2})", loss.exp());
    }
    if resume.is_none() {
        print_samples(console, cfg, &model, &data, &stop, device, "before")?;
    }

    let base_model = cfg.model.path.display().to_string();
    let mut metrics =
        if resume.is_some() { MetricsLog::open_append(&run_dir)? } else { MetricsLog::create(&run_dir)? };
    if resume.is_none() {
        metrics.text("hparams", &format!("```yaml\n{config_yaml}```"))?;
    }
    let save_checkpoint = |state: &TrainerState, trainer: &Trainer| -> Result<PathBuf> {
        let dir = checkpoint::dir_for(&run_dir, state.step);
        let started = Instant::now();
        checkpoint::save(&dir, state, &lora_cfg, &injected, &trainer.optimizer, &base_model)?;
        let bytes: u64 =
            std::fs::read_dir(&dir)?.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum();
        say!(
            console,
            "  checkpoint {} ({:.1} MB) written in {:.0} ms",
            dir.display(),
            bytes as f64 / 1e6,
            started.elapsed().as_secs_f64() * 1e3
        );
        if let Some(keep) = cfg.train.keep_last {
            checkpoint::prune(&run_dir, keep)?;
        }
        Ok(dir)
    };
    let bar = progress_bar(total_steps as u64, show_bars, "step");
    bar.set_position(state.step as u64);
    let started = Instant::now();
    let tokens_at_start = state.tokens_seen;
    let mut last_loss = f64::NAN;
    let mut last_val_loss = None;
    'epochs: for epoch in state.epoch.. {
        let plan = plan_for(epoch);
        let done_in_epoch = if epoch == state.epoch { state.step_in_epoch } else { 0 };
        for (index, micro_batches) in plan.steps.iter().enumerate().skip(done_in_epoch) {
            if state.step >= total_steps {
                break 'epochs;
            }
            let step = state.step;
            // Dropout draws from a stream that depends only on the seed and the step, so a
            // resumed run draws exactly what an uninterrupted one would.
            tch::manual_seed(cfg.train.seed.wrapping_mul(1_000_003).wrapping_add(step as u64) as i64);
            let batches: Vec<Batch> = micro_batches
                .iter()
                .map(|mb| collate(&train_data.examples, mb, layout, pad_id, device))
                .collect();
            let lr = schedule::learning_rate(
                cfg.train.lr_scheduler,
                cfg.train.lr,
                step,
                cfg.train.warmup_steps,
                total_steps,
            );
            let stats: StepStats = trainer.step(&model, &batches, lr);
            if !stats.applied {
                if cfg.train.on_nonfinite == OnNonFinite::Stop {
                    let last_good = checkpoint::list(&run_dir).pop().map(|(_, d)| d.display().to_string());
                    bail!(
                        "the loss or gradient became non-finite (loss {}) at step {}; the adapter was not \
                         updated. Last good checkpoint: {}. Lower train.lr, check the data, or set \
                         train.on_nonfinite: skip",
                        stats.loss,
                        step + 1,
                        last_good.unwrap_or_else(|| "none (set train.save_every)".into())
                    );
                }
                state.skipped_steps += 1;
            }
            state.step += 1;
            state.epoch = epoch;
            state.step_in_epoch = index + 1;
            state.tokens_seen += stats.real_tokens;
            state.padded_seen += stats.padded_tokens;
            state.first_loss.get_or_insert(stats.loss);
            last_loss = stats.loss;
            let step = state.step;
            let tokens_per_s = (state.tokens_seen - tokens_at_start) as f64 / started.elapsed().as_secs_f64();
            let real_share = stats.real_tokens as f64 / stats.padded_tokens.max(1) as f64;
            bar.set_position(step as u64);
            bar.set_message(format!("loss {:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s", stats.loss));
            if step % cfg.train.log_every == 0 || step == total_steps {
                let values = [
                    ("train/loss", stats.loss),
                    ("train/lr", lr),
                    ("train/grad_norm", stats.grad_norm),
                    ("train/tokens_per_s", tokens_per_s),
                    ("train/real_token_share", real_share),
                    ("train/epoch", (epoch + 1) as f64),
                ];
                metrics.log(step as u64, &values)?;
                console.record("train", step, &values);
                if bar.is_hidden() {
                    say!(
                        console,
                        "  step {step}/{total_steps} loss {:.4} lr {lr:.2e} grad_norm {:.3} {tokens_per_s:.0} tok/s, {:.0}% real tokens",
                        stats.loss,
                        stats.grad_norm,
                        100.0 * real_share
                    );
                }
            }
            let eval_now = cfg.train.eval_every.is_some_and(|n| step % n == 0) || step == total_steps;
            let mut stop_early = false;
            if let (Some(batches), true) = (&val_batches, eval_now) {
                let loss =
                    bar.suspend(|| evaluate_with_progress(&model, batches, &eval_bar(batches.len())).0);
                last_val_loss = Some(loss);
                let values = [("eval/loss", loss), ("eval/perplexity", loss.exp())];
                metrics.log(step as u64, &values)?;
                console.record("eval", step, &values);
                bar.suspend(|| {
                    say!(console, "  eval at step {step}: loss {loss:.4} (perplexity {:.2})", loss.exp())
                });
                if state.best_eval_loss.is_none_or(|best| loss < best) {
                    state.best_eval_loss = Some(loss);
                    state.evals_since_best = 0;
                    if cfg.train.save_best {
                        peft::save(&run_dir.join("best"), &lora_cfg, &injected, &base_model)?;
                    }
                } else {
                    state.evals_since_best += 1;
                    stop_early =
                        cfg.train.early_stopping_patience.is_some_and(|p| state.evals_since_best >= p);
                }
            }
            let interrupted = opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
            if interrupted
                || cfg.train.save_every.is_some_and(|every| step % every == 0 && step < total_steps)
            {
                let dir = save_checkpoint(&state, &trainer)?;
                if interrupted {
                    bar.finish_and_clear();
                    return Err(Interrupted { step, checkpoint: dir }.into());
                }
            }
            if stop_early {
                say!(
                    console,
                    "  early stop: no better validation loss in {} evaluations",
                    state.evals_since_best
                );
                break 'epochs;
            }
        }
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    let adapter_dir = run_dir.join("adapter");
    peft::save(&adapter_dir, &lora_cfg, &injected, &base_model)?;
    // The final state too, so a finished run can be extended with a larger max_steps.
    save_checkpoint(&state, &trainer)?;

    let first_loss = state.first_loss.unwrap_or(f64::NAN);
    say!(
                        console,
        "  trained {} steps in {elapsed:.1} s ({:.0} tokens/s, {:.0}% of batch tokens real): loss {first_loss:.4} → {last_loss:.4}{}",
        state.step,
        (state.tokens_seen - tokens_at_start) as f64 / elapsed,
        100.0 * state.tokens_seen as f64 / state.padded_seen.max(1) as f64,
        if state.skipped_steps > 0 { format!(", {} non-finite steps skipped", state.skipped_steps) } else { String::new() }
    );
    if let (Some(before), Some(after)) = (val_loss_before, last_val_loss) {
        say!(
            console,
            "  validation loss {before:.4} → {after:.4} (perplexity {:.2} → {:.2})",
            before.exp(),
            after.exp()
        );
    }
    print_samples(console, cfg, &model, &data, &stop, device, "after")?;
    say!(console, "  adapter (PEFT format): {}", adapter_dir.display());
    say!(console, "  {}", crate::export::compat::check(&adapter_dir)?.describe());
    Ok(RunSummary {
        run_dir,
        adapter_dir,
        steps: state.step,
        first_loss,
        last_loss,
        val_loss_before,
        val_loss_after: last_val_loss,
    })
}

/// The output section that puts the run in `run_dir` (for a resumed run found by path).
fn run_output(cfg: &Config, run_dir: &Path) -> crate::config::OutputConfig {
    crate::config::OutputConfig {
        dir: run_dir.parent().map(Path::to_path_buf).unwrap_or_default(),
        run_name: run_dir.file_name().map(|n| n.to_string_lossy().into_owned()),
        ..cfg.output.clone()
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

/// `lorafit eval`: [`eval`] of the config and adapter `opts` give. Returns (mean token loss,
/// label tokens).
pub fn eval_command(opts: &EvalOptions) -> Result<(f64, i64)> {
    let cfg = match (&opts.config, &opts.model, &opts.data) {
        (Some(config), _, _) => Config::load(config, &opts.overrides)?,
        (None, Some(model), Some(data)) => Config::for_model_and_data(model, data, &opts.overrides)?,
        _ => bail!("give a CONFIG, or both --model and --data"),
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

/// `lorafit eval`: the validation loss of the base model with `adapter` (none: the base
/// alone), computed exactly as during training. Returns (mean token loss, label tokens).
pub fn eval(cfg: &Config, adapter: Option<&Path>) -> Result<(f64, i64)> {
    let device = resolve_device(&cfg.train.device)?;
    let (resolved, _) = precision::resolve(cfg, device);
    let cfg = &resolved;
    if let Some(threads) = cfg.train.threads {
        tch::set_num_threads(threads as i32);
    }
    let spec = ModelSpec::from_dir(&cfg.model.path)?;
    let data = load_data(cfg, &spec.eos_token_ids, spec.vocab_size)?;
    let Some(validation) = &data.validation else {
        bail!("there is no validation data: set data.validation (a file) or data.val_split in the config");
    };
    let mut model = load_model_for(cfg, device)?;
    if let Some(dir) = adapter {
        peft::load(dir, &mut model, device)?;
    }
    let batches = eval_batches(validation, cfg.train.micro_batch_size, data.tokenizer.eos_id, device);
    Ok(evaluate(&model, &batches))
}
