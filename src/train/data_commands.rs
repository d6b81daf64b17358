//! `lorafit data preview` and `lorafit data export`: the run's data prepared exactly as `train`
//! prepares it, shown or written out.

use super::run::load_run_data;
use crate::config::Config;
use crate::data::format::{resolve_format, Examples};
use crate::data::{export, preview, RunData};
use crate::model::ModelSpec;
use anyhow::{anyhow, Result};
use std::fmt::Write;
use std::io::IsTerminal;
use std::path::Path;

/// Which examples `data export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Validation,
}

/// The data of the config file with its overrides, checked against the model's vocabulary,
/// with a line per record layout detected for it.
fn run_data(config: &Path, overrides: &[String]) -> Result<(Config, RunData, Vec<String>)> {
    let mut cfg = Config::load(config, overrides)?;
    let detected = resolve_format(&mut cfg.data)?;
    let spec = ModelSpec::from_dir(&cfg.model.path)?;
    let data = load_run_data(&cfg, &spec)?;
    Ok((cfg, data, detected))
}

/// `lorafit data preview`: the first `n` training examples (or preference pairs) with the trained tokens marked
/// (coloured on a terminal), and the statistics of the set, as text for stdout.
pub fn preview_command(config: &Path, overrides: &[String], n: usize) -> Result<String> {
    let (cfg, data, detected) = run_data(config, overrides)?;
    let mut out = String::new();
    for line in &detected {
        writeln!(out, "{line}")?;
    }
    if let Some(chat) = &data.chat {
        writeln!(out, "chat template: {}", chat.described)?;
    }
    for note in &data.train.notes {
        writeln!(out, "note: {note}")?;
    }
    let marks = if std::io::stdout().is_terminal() { &preview::COLOURS } else { &preview::BRACKETS };
    out += &preview::preview(
        &data.train,
        &data.tokenizer,
        n,
        cfg.data.max_seq_len,
        cfg.train.micro_batch_size,
        marks,
        Examples::of(cfg.train.objective) == Examples::Pairs,
    )?;
    Ok(out)
}

/// `lorafit data export`: writes the examples (or preference pairs) of `split` as JSON Lines to `out` (notes about
/// the data go to stderr) and returns the one-line summary.
pub fn export_command(config: &Path, overrides: &[String], out: &Path, split: Split) -> Result<String> {
    let (cfg, data, detected) = run_data(config, overrides)?;
    let examples = match split {
        Split::Train => &data.train,
        Split::Validation => data
            .validation
            .as_ref()
            .ok_or_else(|| anyhow!("there is no validation data: set data.validation or data.val_split"))?,
    };
    for line in &detected {
        eprintln!("{line}");
    }
    for note in &examples.notes {
        eprintln!("note: {note}");
    }
    let pairs = Examples::of(cfg.train.objective) == Examples::Pairs;
    let n = export::write_jsonl(examples, &data.tokenizer, pairs, out)?;
    let what = if pairs { "preference pairs" } else { "examples" };
    Ok(format!("wrote {n} {what} to {} ({})", out.display(), examples.report()))
}
