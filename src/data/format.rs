//! Records → text segments (each trainable or not) → token ids with loss labels.
//!
//! Every format becomes `(text, trainable)` segments; tokenizing them one by one (the first
//! with the tokenizer's special tokens, i.e. BOS) and appending a trained EOS gives the labels,
//! so masking rules live in one place whatever the format.

use super::chat::{self, ChatTemplate};
use super::source::{expand_paths, read_split, Record};
use crate::config::{DataConfig, DataFormat, OnBadRow, TooLong, TrainOn};
use crate::model::ModelSpec;
use anyhow::{anyhow, bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;
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
        Ok(self.encode_batch(&[text], add_special_tokens)?.remove(0))
    }

    /// [`TextTokenizer::encode`] for many texts, in parallel.
    pub fn encode_batch(&self, texts: &[&str], add_special_tokens: bool) -> Result<Vec<Vec<i64>>> {
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), add_special_tokens)
            .map_err(|e| anyhow!("tokenizer failed: {e}"))?;
        Ok(encodings.iter().map(|e| e.get_ids().iter().map(|&id| id as i64).collect()).collect())
    }

    /// Text of `ids` without special tokens (BOS, EOS, ...).
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        self.decode_with(ids, true)
    }

    /// Text of `ids`, special tokens included.
    pub fn decode_all(&self, ids: &[i64]) -> Result<String> {
        self.decode_with(ids, false)
    }

    fn decode_with(&self, ids: &[i64], skip_special: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
        self.inner.decode(&ids, skip_special).map_err(|e| anyhow!("tokenizer failed to decode: {e}"))
    }
}

/// How chats are rendered for one tokenizer.
pub struct ChatFormat {
    pub template: ChatTemplate,
    /// The tokenizer's post-processor adds BOS to the first segment.
    pub tokenizer_adds_bos: bool,
}

impl ChatFormat {
    /// `data.chat_template`: `auto` (the model's own template, else ChatML), `chatml`,
    /// `llama3`, or the text of a Jinja template.
    pub fn resolve(name: &str, model_dir: &Path, tok: &TextTokenizer) -> Result<ChatFormat> {
        let template = match name {
            "auto" => match ChatTemplate::from_model_dir(model_dir)? {
                Some(t) => t,
                None => ChatTemplate::builtin("chatml")?,
            },
            "chatml" | "llama3" => ChatTemplate::builtin(name)?,
            source => {
                let own = ChatTemplate::from_model_dir(model_dir)?;
                let (bos, eos) = own
                    .map(|t| (t.bos_token().map(str::to_string), t.eos_token().map(str::to_string)))
                    .unwrap_or_default();
                ChatTemplate::from_source(source.to_string(), "data.chat_template".to_string(), bos, eos)?
            }
        };
        Ok(ChatFormat { template, tokenizer_adds_bos: !tok.encode("", true)?.is_empty() })
    }
}

/// One tokenized training example; `labels[i]` is `input_ids[i]` or [`IGNORE`] (the shift to
/// next-token targets happens in the loss).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
}

/// Text segments of one record: `(text, trainable)` in order.
pub type Segments = Vec<(String, bool)>;

/// A tokenized data set with what was cut or left out to make it usable.
#[derive(Default)]
pub struct Prepared {
    pub examples: Vec<Example>,
    /// Examples longer than `max_seq_len`, cut at the end (`too_long: truncate`).
    pub truncated: usize,
    /// Examples longer than `max_seq_len`, left out (`too_long: skip`).
    pub skipped_too_long: usize,
    /// Examples with no trainable token (after truncation), left out.
    pub dropped_no_labels: usize,
    /// Rows that could not be used, left out (`on_bad_row: skip`), with the first reasons.
    pub skipped_bad_rows: usize,
    pub bad_row_samples: Vec<String>,
}

impl Prepared {
    /// One line on what was left out or cut, for the run's summary.
    pub fn report(&self) -> String {
        let mut parts = vec![format!("{} examples", self.examples.len())];
        for (n, what) in [
            (self.truncated, "truncated to max_seq_len"),
            (self.skipped_too_long, "skipped as longer than max_seq_len"),
            (self.dropped_no_labels, "dropped with no trainable token"),
            (self.skipped_bad_rows, "bad rows skipped"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        let mut line = parts.join(", ");
        if let Some(first) = self.bad_row_samples.first() {
            line.push_str(&format!(" (first: {first})"));
        }
        line
    }
}

/// The prompt text for `prompt` as a user would give it: an instruction in alpaca format, a
/// plain text prefix otherwise.
pub fn render_prompt(cfg: &DataConfig, prompt: &str) -> String {
    match cfg.format {
        DataFormat::Alpaca => alpaca_prompt(cfg, prompt, ""),
        _ => prompt.to_string(),
    }
}

fn alpaca_prompt(cfg: &DataConfig, instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        cfg.prompt_template_no_input
            .as_deref()
            .unwrap_or(ALPACA_NO_INPUT)
            .replace("{instruction}", instruction)
    } else {
        cfg.prompt_template
            .as_deref()
            .unwrap_or(ALPACA_WITH_INPUT)
            .replace("{instruction}", instruction)
            .replace("{input}", input)
    }
}

/// The column of `record` that holds lorafit's field `name` (after `data.columns` renames).
fn column<'a>(cfg: &'a DataConfig, name: &'a str) -> &'a str {
    cfg.columns.get(name).map(String::as_str).unwrap_or(name)
}

/// A string field, or an error naming file, row, the column and the columns present.
fn text<'a>(record: &'a Record, cfg: &DataConfig, name: &str, required: bool) -> Result<Option<&'a str>> {
    let col = column(cfg, name);
    match record.fields.get(col) {
        Some(Value::String(s)) => Ok(Some(s)),
        None | Some(Value::Null) if !required => Ok(None),
        None | Some(Value::Null) => {
            let present: Vec<&str> = record.fields.keys().map(String::as_str).collect();
            bail!(
                "the row has no `{col}` column (it has: {}); check data.format, or map a column with data.columns",
                present.join(", ")
            )
        }
        Some(other) => bail!("`{col}` must be a string, found {other}"),
    }
}

/// The record as `(text, trainable)` segments in order.
pub fn segments(record: &Record, cfg: &DataConfig, chat: Option<&ChatFormat>) -> Result<Segments> {
    Ok(match cfg.format {
        DataFormat::Completion => {
            vec![(text(record, cfg, "text", true)?.unwrap_or_default().to_string(), true)]
        }
        DataFormat::Alpaca => {
            let instruction = text(record, cfg, "instruction", true)?.unwrap_or_default();
            let input = text(record, cfg, "input", false)?.unwrap_or_default();
            let output = text(record, cfg, "output", true)?.unwrap_or_default();
            vec![(alpaca_prompt(cfg, instruction, input), cfg.train_on_inputs), (output.to_string(), true)]
        }
        DataFormat::InputOutput => {
            let col = column(cfg, "segments");
            let Some(Value::Array(items)) = record.fields.get(col) else {
                bail!("the row has no `{col}` list of {{\"text\", \"label\"}} segments");
            };
            let segs = items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    match (
                        item.get("text").and_then(Value::as_str),
                        item.get("label").and_then(Value::as_bool),
                    ) {
                        (Some(t), Some(label)) => Ok((t.to_string(), label)),
                        _ => bail!(
                            "`{col}[{i}]` must be {{\"text\": string, \"label\": true|false}}, found {item}"
                        ),
                    }
                })
                .collect::<Result<Segments>>()?;
            if segs.is_empty() {
                bail!("`{col}` is empty");
            }
            segs
        }
        DataFormat::Chat => {
            let template = chat.ok_or_else(|| anyhow!("no chat template"))?;
            let field = cfg.columns.get("messages").map(String::as_str);
            let tools = column(cfg, chat::TOOLS_FIELD);
            let conversation =
                chat::parse_conversation(&record.file, record.row, &record.fields, field, tools)?;
            let train_on = match cfg.train_on {
                TrainOn::Assistant => chat::TrainOn::AssistantTurns,
                TrainOn::Last => chat::TrainOn::LastAssistantTurn,
                TrainOn::All => chat::TrainOn::All,
            };
            let mut segs = chat::render_segments(&template.template, &conversation, train_on)?;
            // The tokenizer adds BOS itself; a template that also writes it would double it.
            if template.tokenizer_adds_bos {
                chat::strip_leading_bos(&mut segs, template.template.bos_token().unwrap_or(""));
            }
            segs
        }
    })
}

/// Tokenizes every record's segments (in parallel batches): the first segment with the
/// tokenizer's special tokens (BOS), the rest without, then (with `append_eos`) EOS, which is
/// trained so the model learns to stop. Chats need no EOS: the template's end-of-turn marker
/// closes each trained assistant turn.
fn tokenize_all(tok: &TextTokenizer, all: &[Segments], append_eos: bool) -> Result<Vec<Example>> {
    let firsts: Vec<&str> = all.iter().map(|s| s.first().map(|(t, _)| t.as_str()).unwrap_or("")).collect();
    let rests: Vec<&str> = all.iter().flat_map(|s| s.iter().skip(1).map(|(t, _)| t.as_str())).collect();
    let mut first_ids = tok.encode_batch(&firsts, true)?.into_iter();
    let mut rest_ids = tok.encode_batch(&rests, false)?.into_iter();
    let mut out = Vec::with_capacity(all.len());
    for segs in all {
        let mut ex = Example { input_ids: vec![], labels: vec![] };
        for (i, (_, trainable)) in segs.iter().enumerate() {
            let ids =
                if i == 0 { first_ids.next() } else { rest_ids.next() }.expect("one encoding per segment");
            ex.labels.extend(ids.iter().map(|&id| if *trainable { id } else { IGNORE }));
            ex.input_ids.extend(ids);
        }
        if append_eos {
            ex.input_ids.push(tok.eos_id);
            ex.labels.push(tok.eos_id);
        }
        out.push(ex);
    }
    Ok(out)
}

/// Reads, renders and tokenizes the records of `path` (a file, folder or glob), applying the
/// bad-row and too-long policies.
pub fn prepare(
    path: &Path,
    cfg: &DataConfig,
    tok: &TextTokenizer,
    chat: Option<&ChatFormat>,
) -> Result<Prepared> {
    let mut records = Vec::new();
    for file in expand_paths(path)? {
        records.extend(read_split(&file, &cfg.split)?);
    }
    prepare_records(&records, cfg, tok, chat).with_context(|| format!("preparing {}", path.display()))
}

/// [`prepare`] for records already read.
pub fn prepare_records(
    records: &[Record],
    cfg: &DataConfig,
    tok: &TextTokenizer,
    chat: Option<&ChatFormat>,
) -> Result<Prepared> {
    let mut out = Prepared::default();
    let (mut all, mut origins) = (Vec::with_capacity(records.len()), Vec::with_capacity(records.len()));
    for record in records {
        match segments(record, cfg, chat) {
            Ok(segs) => {
                all.push(segs);
                origins.push(format!("{}:{}", record.file.display(), record.row));
            }
            Err(e) => {
                let origin = format!("{}:{}", record.file.display(), record.row);
                let message = format!("{e:#}");
                let reason =
                    if message.starts_with(&origin) { message } else { format!("{origin}: {message}") };
                match cfg.on_bad_row {
                    OnBadRow::Error => {
                        bail!("{reason} (or set data.on_bad_row: skip to leave such rows out)")
                    }
                    OnBadRow::Skip => {
                        out.skipped_bad_rows += 1;
                        if out.bad_row_samples.len() < 5 {
                            out.bad_row_samples.push(reason);
                        }
                    }
                }
            }
        }
    }
    for (mut ex, origin) in tokenize_all(tok, &all, cfg.format != DataFormat::Chat)?.into_iter().zip(origins)
    {
        if ex.input_ids.len() > cfg.max_seq_len {
            match cfg.too_long {
                TooLong::Truncate => {
                    ex.input_ids.truncate(cfg.max_seq_len);
                    ex.labels.truncate(cfg.max_seq_len);
                    out.truncated += 1;
                }
                TooLong::Skip => {
                    out.skipped_too_long += 1;
                    continue;
                }
                TooLong::Error => bail!(
                    "{origin}: the example has {} tokens, more than data.max_seq_len {}; raise max_seq_len or \
                     set data.too_long: truncate or skip",
                    ex.input_ids.len(),
                    cfg.max_seq_len
                ),
            }
        }
        // The first label never counts (nothing predicts it), so a row needs one after it.
        if ex.labels.iter().skip(1).all(|&l| l == IGNORE) {
            out.dropped_no_labels += 1;
            continue;
        }
        out.examples.push(ex);
    }
    if out.examples.is_empty() {
        bail!("no usable example: {} (with max_seq_len {})", out.report(), cfg.max_seq_len);
    }
    Ok(out)
}

/// The training and validation sets: from their files, or with `val_split` a seeded share of
/// the training records held out.
pub fn prepare_splits(
    cfg: &DataConfig,
    seed: u64,
    tok: &TextTokenizer,
    chat: Option<&ChatFormat>,
) -> Result<(Prepared, Option<Prepared>)> {
    let train = prepare(&cfg.train, cfg, tok, chat)?;
    if let Some(path) = &cfg.validation {
        return Ok((train, Some(prepare(path, cfg, tok, chat)?)));
    }
    let Some(share) = cfg.val_split else { return Ok((train, None)) };
    let mut train = train;
    let mut order: Vec<usize> = (0..train.examples.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed ^ 0x5EED_5A11));
    let n_val = ((train.examples.len() as f64 * share).round() as usize)
        .clamp(1, train.examples.len().saturating_sub(1));
    if train.examples.len() < 2 {
        bail!("data.val_split needs at least 2 training examples");
    }
    let held: std::collections::HashSet<usize> = order[..n_val].iter().copied().collect();
    let examples = std::mem::take(&mut train.examples);
    let (mut val, mut kept) = (Vec::new(), Vec::new());
    for (i, ex) in examples.into_iter().enumerate() {
        if held.contains(&i) {
            val.push(ex);
        } else {
            kept.push(ex);
        }
    }
    train.examples = kept;
    Ok((train, Some(Prepared { examples: val, ..Prepared::default() })))
}
