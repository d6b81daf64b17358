//! Records → text segments (each trainable or not) → token ids with loss labels.

use super::source::{read_records, string_field, Record};
use crate::config::{DataConfig, DataFormat};
use crate::model::ModelSpec;
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use tokenizers::Tokenizer;

/// Labels of tokens that carry no loss (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// The Stanford Alpaca prompt, used when a row has a non-empty `input`.
const ALPACA_WITH_INPUT: &str =
    "Below is an instruction that describes a task, paired with an input that provides \
further context. Write a response that appropriately completes the request.\n\n\
### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
/// The Stanford Alpaca prompt for rows without `input`.
const ALPACA_NO_INPUT: &str =
    "Below is an instruction that describes a task. Write a response that appropriately \
completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

/// The model's tokenizer plus the ids the data pipeline needs.
pub struct TextTokenizer {
    inner: Tokenizer,
    pub eos_id: i64,
}

impl TextTokenizer {
    /// Loads `<dir>/tokenizer.json`; EOS comes from `config.json`.
    pub fn from_model_dir(dir: &Path, spec: &ModelSpec) -> Result<TextTokenizer> {
        let eos_id = match spec.eos_token_ids.first() {
            Some(&id) => id,
            None => bail!(
                "{}/config.json has no eos_token_id; it is needed to end training examples",
                dir.display()
            ),
        };
        Self::from_file(&dir.join("tokenizer.json"), eos_id)
    }

    /// Loads a `tokenizer.json`. Padding and truncation settings stored in the file are
    /// dropped: batching pads and `max_seq_len` truncates, each with its own accounting.
    pub fn from_file(path: &Path, eos_id: i64) -> Result<TextTokenizer> {
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| anyhow!("cannot configure tokenizer {}: {e}", path.display()))?;
        Ok(TextTokenizer { inner, eos_id })
    }

    /// Token ids of `text`; `add_special_tokens` adds what the tokenizer's post-processor adds (BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("tokenizer failed: {e}"))?;
        Ok(enc.get_ids().iter().map(|&id| id as i64).collect())
    }

    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
        self.inner
            .decode(&ids, true)
            .map_err(|e| anyhow!("tokenizer failed to decode: {e}"))
    }
}

/// One tokenized training example; `labels[i]` is `input_ids[i]` or [`IGNORE`] (the shift to
/// next-token targets happens in the loss).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
}

/// A tokenized data file with what was cut to make it fit.
pub struct Prepared {
    pub examples: Vec<Example>,
    /// Examples longer than `max_seq_len`, cut at the end.
    pub truncated: usize,
    /// Examples dropped because truncation left them no trainable token.
    pub dropped_no_labels: usize,
}

/// The prompt text for `prompt` as a user would give it: an instruction in alpaca format, a
/// plain text prefix in completion format.
pub fn render_prompt(format: DataFormat, prompt: &str) -> String {
    match format {
        DataFormat::Completion => prompt.to_string(),
        DataFormat::Alpaca => ALPACA_NO_INPUT.replace("{instruction}", prompt),
    }
}

/// The record as `(text, trainable)` segments in order.
fn segments(path: &Path, record: &Record, cfg: &DataConfig) -> Result<Vec<(String, bool)>> {
    Ok(match cfg.format {
        DataFormat::Completion => {
            let text = string_field(path, record, "text", true)?.unwrap_or_default();
            vec![(text.to_string(), true)]
        }
        DataFormat::Alpaca => {
            let instruction = string_field(path, record, "instruction", true)?.unwrap_or_default();
            let input = string_field(path, record, "input", false)?.unwrap_or_default();
            let output = string_field(path, record, "output", true)?.unwrap_or_default();
            let prompt = if input.trim().is_empty() {
                ALPACA_NO_INPUT.replace("{instruction}", instruction)
            } else {
                ALPACA_WITH_INPUT
                    .replace("{instruction}", instruction)
                    .replace("{input}", input)
            };
            vec![(prompt, cfg.train_on_inputs), (output.to_string(), true)]
        }
    })
}

/// Tokenizes segments: the first with the tokenizer's special tokens (BOS), the rest without,
/// then EOS, which is trained so the model learns to stop.
fn tokenize(tok: &TextTokenizer, segments: &[(String, bool)]) -> Result<Example> {
    let mut ex = Example {
        input_ids: vec![],
        labels: vec![],
    };
    for (i, (text, trainable)) in segments.iter().enumerate() {
        let ids = tok.encode(text, i == 0)?;
        ex.labels
            .extend(ids.iter().map(|&id| if *trainable { id } else { IGNORE }));
        ex.input_ids.extend(ids);
    }
    ex.input_ids.push(tok.eos_id);
    ex.labels.push(tok.eos_id);
    Ok(ex)
}

/// Reads, renders and tokenizes one data file.
pub fn prepare(path: &Path, cfg: &DataConfig, tok: &TextTokenizer) -> Result<Prepared> {
    let records = read_records(path)?;
    let mut out = Prepared {
        examples: Vec::with_capacity(records.len()),
        truncated: 0,
        dropped_no_labels: 0,
    };
    for record in &records {
        let segs = segments(path, record, cfg)?;
        let mut ex =
            tokenize(tok, &segs).with_context(|| format!("{}:{}", path.display(), record.row))?;
        if ex.input_ids.len() > cfg.max_seq_len {
            ex.input_ids.truncate(cfg.max_seq_len);
            ex.labels.truncate(cfg.max_seq_len);
            out.truncated += 1;
        }
        // The first label never counts (nothing predicts it), so a row needs one after it.
        if ex.labels.iter().skip(1).all(|&l| l == IGNORE) {
            out.dropped_no_labels += 1;
            continue;
        }
        out.examples.push(ex);
    }
    if out.examples.is_empty() {
        bail!(
            "{}: no example has a trainable token left (max_seq_len {} cuts every response); \
             raise data.max_seq_len",
            path.display(),
            cfg.max_seq_len
        );
    }
    Ok(out)
}
