//! The training loop of a run: for each step, `step → log → maybe eval → maybe checkpoint →
//! maybe stop`. Steps are numbered from 1: `step` is the number of the step being taken, which
//! is also `state.step` once it is done.

use super::checkpoint;
use super::interrupt::Interrupted;
use super::memory::MEMORY_SETTINGS;
use super::run::Run;
use super::{schedule, StepStats};
use crate::config::OnNonFinite;
use crate::data::batch::MicroBatch;
use crate::data::Batch;
use crate::lora::peft;
use crate::observe::console::say;
use crate::observe::progress::{duration_words, progress_bar};
use crate::torch_errors;
use anyhow::{anyhow, bail, Result};
use indicatif::ProgressBar;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// What the loop leaves for the run's summary.
pub(super) struct Trained {
    pub last_loss: f64,
    pub last_val_loss: Option<f64>,
    /// Seconds the loop ran, and the tokens seen before it (non-zero when resuming).
    pub seconds: f64,
    pub tokens_at_start: i64,
}

/// The loop's progress bar and throughput clock.
struct Progress {
    bar: ProgressBar,
    started: Instant,
    tokens_at_start: i64,
    /// Steps done before this process started (non-zero when resuming).
    steps_at_start: usize,
}

/// Phase 3: trains until `total_steps`, an early stop, or `stop` (then with [`Interrupted`]).
pub(super) fn train_loop(run: &mut Run, stop: Option<&AtomicBool>) -> Result<Trained> {
    let bar = progress_bar(run.plan.total_steps as u64, run.console.shows_progress(), "step");
    bar.set_position(run.plan.state.step as u64);
    let state = &run.plan.state;
    let progress = Progress {
        bar,
        started: Instant::now(),
        tokens_at_start: state.tokens_seen,
        steps_at_start: state.step,
    };
    let mut trained = Trained {
        last_loss: f64::NAN,
        last_val_loss: None,
        seconds: 0.0,
        tokens_at_start: progress.tokens_at_start,
    };
    let first_epoch = run.plan.state.epoch;
    'epochs: for epoch in first_epoch.. {
        let plan = run.plan.epoch_plan(epoch);
        let done_in_epoch = if epoch == first_epoch { run.plan.state.step_in_epoch } else { 0 };
        for (index, micro_batches) in plan.steps.iter().enumerate().skip(done_in_epoch) {
            if run.plan.state.step >= run.plan.total_steps {
                break 'epochs;
            }
            let step = run.plan.state.step + 1;
            let (lr, stats) = take_step(run, step, micro_batches)?;
            record_step(run, epoch, index, &stats);
            trained.last_loss = stats.loss;
            // Epochs done, counting this one's part: 0.16 after 16% of the first epoch.
            let epochs_done = epoch as f64 + (index + 1) as f64 / plan.steps.len() as f64;
            log_step(run, &progress, step, epochs_done, lr, &stats)?;
            let stop_early = match maybe_eval(run, &progress, step)? {
                Some(loss) => {
                    trained.last_val_loss = Some(loss);
                    after_eval(run, loss)?
                }
                None => false,
            };
            maybe_checkpoint(run, &progress, step, stop)?;
            if stop_early {
                let evals = run.plan.state.evals_since_best;
                say!(run.console, "  early stop: no better validation loss in {evals} evaluations");
                break 'epochs;
            }
        }
    }
    progress.bar.finish_and_clear();
    trained.seconds = progress.started.elapsed().as_secs_f64();
    Ok(trained)
}

/// One optimizer update over `micro_batches` (the whole step's, of every rank) at its scheduled
/// learning rate. A non-finite loss or gradient stops the run, or with `on_nonfinite: skip`
/// leaves the adapter as it was.
fn take_step(run: &mut Run, step: usize, micro_batches: &[MicroBatch]) -> Result<(f64, StepStats)> {
    let plan = &mut run.plan;
    let train = &plan.cfg.train;
    // Each rank takes its own consecutive share of the step's micro-batches.
    let (rank, world) = plan.trainer.rank_world();
    let share = micro_batches.len() / world;
    let mine = rank * share..(rank + 1) * share;
    let seeds: Vec<i64> = mine.clone().map(|i| dropout_seed(train.seed, step, i)).collect();
    let batches: Vec<Batch> = micro_batches[mine].iter().map(|mb| plan.batch(mb)).collect();
    let lr = schedule::learning_rate(
        train.lr_scheduler,
        train.lr,
        step,
        train.warmup_steps_of(plan.total_steps),
        plan.total_steps,
    );
    let stats = torch_errors::catch(&format!("training step {step}"), MEMORY_SETTINGS, || {
        plan.trainer.step(&plan.model, &batches, Some(&seeds), lr)
    })
    .and_then(|stats| stats)
    .map_err(|e| anyhow!("{e:#}. {}", last_checkpoint(&run.dir)))?;
    // An overflow the loss scaler absorbs (fp16-mixed) is routine: the scale backs off.
    if !stats.applied && !stats.overflow && train.on_nonfinite == OnNonFinite::Stop {
        bail!(
            "the loss or gradient became non-finite (loss {}) at step {step}; the adapter was not \
             updated. {}. Lower train.lr, check the data, or set train.on_nonfinite: skip",
            stats.loss,
            last_checkpoint(&run.dir)
        );
    }
    Ok((lr, stats))
}

/// The dropout seed of the `index`-th micro-batch of `step`: it depends only on the seed, the
/// step and the micro-batch's place in the step, so whichever rank takes a micro-batch, and a
/// resumed run, draw exactly what an uninterrupted single process would.
fn dropout_seed(seed: u64, step: usize, index: usize) -> i64 {
    let first = seed.wrapping_mul(1_000_003).wrapping_add(step as u64 - 1);
    first.wrapping_add((index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) as i64
}

/// Where a failed run can resume from: "Last good checkpoint: <dir>".
fn last_checkpoint(run_dir: &Path) -> String {
    let last_good = checkpoint::list(run_dir).pop().map(|(_, d)| d.display().to_string());
    format!("Last good checkpoint: {}", last_good.unwrap_or_else(|| "none (set train.save_every)".into()))
}

/// Counts the step just taken (the `index`-th of `epoch`) into the trainer state.
fn record_step(run: &mut Run, epoch: usize, index: usize, stats: &StepStats) {
    let state = &mut run.plan.state;
    if !stats.applied {
        state.skipped_steps += 1;
    }
    state.step += 1;
    state.epoch = epoch;
    state.step_in_epoch = index + 1;
    state.tokens_seen += stats.real_tokens;
    state.padded_seen += stats.padded_tokens;
    state.first_loss.get_or_insert(stats.loss);
}

/// The progress bar after every step; metrics, JSON record and a line every `log_every` steps
/// and after the last.
fn log_step(
    run: &mut Run,
    progress: &Progress,
    step: usize,
    epochs_done: f64,
    lr: f64,
    stats: &StepStats,
) -> Result<()> {
    let total_steps = run.plan.total_steps;
    let tokens = run.plan.state.tokens_seen - progress.tokens_at_start;
    let elapsed = progress.started.elapsed().as_secs_f64();
    let tokens_per_s = tokens as f64 / elapsed;
    let real_share = stats.real_tokens as f64 / stats.padded_tokens.max(1) as f64;
    progress.bar.set_position(step as u64);
    progress.bar.set_message(format!("loss {:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s", stats.loss));
    if !step.is_multiple_of(run.plan.cfg.train.log_every) && step != total_steps {
        return Ok(());
    }
    let mut values = vec![
        ("train/loss", stats.loss),
        ("train/lr", lr),
        ("train/grad_norm", stats.grad_norm),
        ("train/tokens_per_s", tokens_per_s),
        ("train/real_token_share", real_share),
        ("train/epoch", epochs_done),
    ];
    values.extend(stats.loss_scale.map(|scale| ("train/loss_scale", scale)));
    // The objective's metrics: TRL's names for preferences (`rewards/chosen`, ...),
    // `train/kl` and `train/ce` for distillation.
    values.extend(stats.metrics.iter().copied());
    run.log(step, &values)?;
    run.console.record("train", step, &values);
    if progress.bar.is_hidden() {
        // Without a bar to show it, the line says the time left, from this process's pace.
        let steps_here = (step - progress.steps_at_start).max(1) as f64;
        let left = elapsed / steps_here * (total_steps - step) as f64;
        say!(
            run.console,
            "  step {step}/{total_steps} loss {:.4} lr {lr:.2e} grad_norm {:.3} {tokens_per_s:.0} tok/s, {:.0}% real tokens, {} left",
            stats.loss,
            stats.grad_norm,
            100.0 * real_share,
            duration_words(left)
        );
    }
    Ok(())
}

/// The validation loss every `eval_every` steps and after the last, when there is validation
/// data; logged and printed.
fn maybe_eval(run: &mut Run, progress: &Progress, step: usize) -> Result<Option<f64>> {
    let plan = &run.plan;
    let due = plan.cfg.train.eval_every.is_some_and(|n| step.is_multiple_of(n)) || step == plan.total_steps;
    if !due {
        return Ok(None);
    }
    let Some(validation) = progress.bar.suspend(|| plan.validation_loss(run.console))? else {
        return Ok(None);
    };
    let loss = validation.loss;
    let best = plan.state.best_eval_loss.map_or(loss, |best| best.min(loss));
    let mut values = vec![("eval/loss", loss), ("eval/perplexity", loss.exp()), ("eval/best_loss", best)];
    if !validation.metrics.is_empty() {
        // A preference or distillation loss has no perplexity; its own metrics instead.
        values.remove(1);
        values.extend(validation.metrics.iter().copied());
    }
    run.log(step, &values)?;
    run.console.record("eval", step, &values);
    let console = run.console;
    progress
        .bar
        .suspend(|| say!(console, "  eval at step {step}: loss {loss:.4} ({})", validation.summary()));
    Ok(Some(loss))
}

/// Keeps the best validation loss (and with `save_best` its adapter in `best/`); true when
/// early stopping's patience has run out.
fn after_eval(run: &mut Run, loss: f64) -> Result<bool> {
    let base_model = run.base_model();
    let plan = &mut run.plan;
    let state = &mut plan.state;
    if state.best_eval_loss.is_none_or(|best| loss < best) {
        state.best_eval_loss = Some(loss);
        state.evals_since_best = 0;
        if plan.cfg.train.save_best && plan.writes() {
            peft::save(&run.dir.join("best"), &plan.lora_cfg, &plan.injected, &base_model)?;
        }
        return Ok(false);
    }
    state.evals_since_best += 1;
    Ok(plan.cfg.train.early_stopping_patience.is_some_and(|p| state.evals_since_best >= p))
}

/// A checkpoint every `save_every` steps (the last step's comes with the final adapter), or
/// when asked to stop, which then ends the run with [`Interrupted`].
fn maybe_checkpoint(run: &Run, progress: &Progress, step: usize, stop: Option<&AtomicBool>) -> Result<()> {
    let interrupted = agreed_stop(run, stop.is_some_and(|s| s.load(Ordering::SeqCst)))?;
    let total = run.plan.total_steps;
    let due = run.plan.cfg.train.save_every.is_some_and(|every| step.is_multiple_of(every) && step < total);
    if !(interrupted || due) {
        return Ok(());
    }
    let checkpoint = save_checkpoint(run)?;
    if interrupted {
        progress.bar.finish_and_clear();
        return Err(Interrupted { step, checkpoint, resume_command: String::new() }.into());
    }
    Ok(())
}

/// Whether to stop now: in a data-parallel run, when any rank was asked to (a signal reaches
/// the workers at slightly different times), so that all stop after the same step.
fn agreed_stop(run: &Run, asked: bool) -> Result<bool> {
    let Some(group) = &run.plan.trainer.group else { return Ok(asked) };
    let flag = tch::Tensor::from_slice(&[asked as i64]);
    group.all_reduce_sum(std::slice::from_ref(&flag))?;
    Ok(flag.int64_value(&[0]) > 0)
}

/// Saves the checkpoint of the steps done so far, keeping only the newest `keep_last` (on the
/// process that writes the run's files; the others only return its path).
pub(super) fn save_checkpoint(run: &Run) -> Result<PathBuf> {
    let plan = &run.plan;
    let dir = checkpoint::dir_for(&run.dir, plan.state.step);
    if !plan.writes() {
        return Ok(dir);
    }
    let started = Instant::now();
    checkpoint::save(&dir, &plan.state, &plan.lora_cfg, &plan.injected, &plan.trainer, &run.base_model())?;
    let bytes: u64 =
        std::fs::read_dir(&dir)?.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum();
    let (mb, ms) = (bytes as f64 / 1e6, started.elapsed().as_secs_f64() * 1e3);
    say!(run.console, "  checkpoint {} ({mb:.1} MB) written in {ms:.0} ms", dir.display());
    if let Some(keep) = plan.cfg.train.keep_last {
        checkpoint::prune(&run.dir, keep)?;
    }
    Ok(dir)
}
