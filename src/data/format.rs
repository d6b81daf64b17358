//! Records → text segments (each trainable or not) → token ids with loss labels.
//!
//! Every format becomes `(text, trainable)` segments; tokenizing them one by one (the first
//! with the tokenizer's special tokens, i.e. BOS) and appending a trained EOS gives the labels,
//! so masking rules live in one place whatever the format.

use super::chat::{self, ChatTemplate};
use super::source::{expand_paths, read_rows, Record, Rows};
use super::tokenizer::{Encoded, TextTokenizer};
use crate::config::{DataConfig, DataFormat, DataSet, Objective, OnBadRow, TooLong, TrainData};
use anyhow::{anyhow, bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// The share of a set's rows that may be left out or cut before a run warns about it.
pub const LOSS_WARNING_SHARE: f64 = 0.05;

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

/// The chat template a run renders conversations with, resolved from `data.chat_template`.
pub struct ChatFormat {
    pub template: ChatTemplate,
    /// Which template this is, in words, for the banner and `data preview`.
    pub described: String,
}

impl ChatFormat {
    /// The names `data.chat_template` accepts besides a `.jinja` file or Jinja text.
    pub const NAMES: [&'static str; 3] = ["auto", "chatml", "llama3"];

    /// The chat format of data prepared with `cfg` for the model in `model_dir`: none unless the
    /// data are chats.
    pub fn of_data(cfg: &DataConfig, model_dir: &Path) -> Result<Option<ChatFormat>> {
        // A set of a `data.train` list may be chats when `data.format` is not, and a
        // validation file is read with `data.format` whatever the sets are.
        let validation_is_chat = cfg.validation.is_some() && cfg.format == DataFormat::Chat;
        if train_formats(cfg).contains(&DataFormat::Chat) || validation_is_chat {
            return Ok(Some(ChatFormat::resolve(&cfg.chat_template, model_dir)?));
        }
        Ok(None)
    }

    /// `data.chat_template`: `auto` (the model's own template; an error when it has none),
    /// `chatml` or `llama3` (built in), a path to a `.jinja` file, or the template text itself.
    /// Templates not from the model are rendered with the model's BOS/EOS strings.
    pub fn resolve(name: &str, model_dir: &Path) -> Result<ChatFormat> {
        let own = ChatTemplate::from_model_dir(model_dir)?;
        let tokens = || {
            own.as_ref()
                .map(|t| (t.bos_token().map(str::to_string), t.eos_token().map(str::to_string)))
                .unwrap_or_default()
        };
        let (template, described) = match name {
            "auto" => match own {
                Some(t) => {
                    let described = format!("the model's own, from {}", t.origin());
                    (t, described)
                }
                None => bail!(
                    "the model in {} has no chat template (no chat_template.jinja, and none in \
                     tokenizer_config.json); set data.chat_template to {} or a .jinja file",
                    model_dir.display(),
                    ChatTemplate::BUILTIN_NAMES.join(" or ")
                ),
            },
            builtin if ChatTemplate::BUILTIN_NAMES.contains(&builtin) => {
                (ChatTemplate::builtin(builtin)?, format!("built-in `{builtin}`"))
            }
            source if source.contains("{{") || source.contains("{%") => {
                let (bos, eos) = tokens();
                let template =
                    ChatTemplate::from_source(source.to_string(), "data.chat_template".into(), bos, eos)?;
                (template, "the Jinja text of data.chat_template".to_string())
            }
            path if path.ends_with(".jinja") || Path::new(path).is_file() => {
                let source = std::fs::read_to_string(path)
                    .with_context(|| format!("data.chat_template: cannot read the template file {path}"))?;
                let (bos, eos) = tokens();
                (ChatTemplate::from_source(source, path.to_string(), bos, eos)?, format!("the file {path}"))
            }
            unknown => bail!(
                "unknown chat template `{unknown}`: use one of {}, a path to a .jinja file, or the \
                 template's Jinja text",
                Self::NAMES.join(", ")
            ),
        };
        Ok(ChatFormat { template, described })
    }
}

/// One tokenized training example; `labels[i]` is `input_ids[i]` or [`IGNORE`] (the shift to
/// next-token targets happens in the loss).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Example {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    /// For preference data, whether the answer is desirable (KTO's `label`; a pair's chosen
    /// answer is, its rejected one is not); `None` for examples of supervised fine-tuning.
    pub desirable: Option<bool>,
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
    /// What the user should know about the data before training on it (columns it ignores).
    pub notes: Vec<String>,
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

    /// A warning when more than [`LOSS_WARNING_SHARE`] of the rows read were left out, or were
    /// cut, with the counts and the settings that keep them; `name` says which set ("training"),
    /// `formats` which record layouts it was read with (a `data.train` list may mix them).
    /// The two are judged apart, as a cut example may then be left out and counted in both.
    pub fn loss_warning(&self, name: &str, cfg: &DataConfig, formats: &[DataFormat]) -> Option<String> {
        let lost = self.skipped_too_long + self.dropped_no_labels + self.skipped_bad_rows;
        let rows = self.examples.len() + lost;
        let over = |n: usize| n as f64 > LOSS_WARNING_SHARE * rows as f64;
        if !over(lost) && !over(self.truncated) {
            return None;
        }
        let mut advice = Vec::new();
        if self.truncated + self.skipped_too_long > 0 {
            advice.push(format!(
                "raise data.max_seq_len (now {}) to keep long examples whole (data.too_long says whether they \
                 are cut or skipped)",
                cfg.max_seq_len
            ));
        }
        if self.dropped_no_labels > 0 {
            advice.push(format!(
                "an example has no trainable token when its answer lies past data.max_seq_len (now {}) or none \
                 of it is trained: {}",
                cfg.max_seq_len,
                masking_advice(cfg, formats)
            ));
        }
        if self.skipped_bad_rows > 0 {
            advice.push("fix the bad rows (data.on_bad_row: error stops at the first)".to_string());
        }
        let percent = |n: usize| 100.0 * n as f64 / rows as f64;
        Some(format!(
            "{name} data: of {rows} rows, {lost} ({:.0}%) are left out and {} ({:.0}%) cut ({}). To keep them: {}",
            percent(lost),
            self.truncated,
            percent(self.truncated),
            self.report(),
            advice.join("; ")
        ))
    }

    /// Adds the examples and counts of another set to this one.
    fn absorb(&mut self, other: Prepared) {
        self.examples.extend(other.examples);
        self.truncated += other.truncated;
        self.skipped_too_long += other.skipped_too_long;
        self.dropped_no_labels += other.dropped_no_labels;
        self.skipped_bad_rows += other.skipped_bad_rows;
        let room = 5usize.saturating_sub(self.bad_row_samples.len());
        self.bad_row_samples.extend(other.bad_row_samples.into_iter().take(room));
        self.notes.extend(other.notes);
    }

    /// Applies `data.on_bad_row` to a row that cannot be used; `reason` names its file and row.
    pub(super) fn bad_row(&mut self, policy: OnBadRow, reason: String) -> Result<()> {
        match policy {
            OnBadRow::Error => bail!("{reason} (or set data.on_bad_row: skip to leave such rows out)"),
            OnBadRow::Skip => {
                self.skipped_bad_rows += 1;
                if self.bad_row_samples.len() < 5 {
                    self.bad_row_samples.push(reason);
                }
                Ok(())
            }
        }
    }
}

/// Which setting decides the trained tokens of each of `formats`, for the data-loss warning;
/// each named by its format when the sets mix several.
fn masking_advice(cfg: &DataConfig, formats: &[DataFormat]) -> String {
    let advice = |format: &DataFormat| match format {
        DataFormat::Chat => {
            format!("data.train_on (now {:?}) says which turns are trained", cfg.train_on).to_lowercase()
        }
        DataFormat::Alpaca => "data.train_on_inputs: true trains the prompt too".to_string(),
        _ => "check which segments are labelled trainable".to_string(),
    };
    match formats {
        [single] => advice(single),
        several => {
            several.iter().map(|f| format!("for {f} data, {}", advice(f))).collect::<Vec<_>>().join("; ")
        }
    }
}

/// How a prompt is put to the model, the way the run's training data put its examples: as a
/// user message followed by the assistant header (chat), inside the alpaca prompt, or as it is.
pub enum PromptFormat<'a> {
    Text,
    Alpaca(&'a DataConfig),
    Chat(&'a ChatFormat),
}

impl<'a> PromptFormat<'a> {
    /// The prompt format of data prepared with `cfg` (and `chat`, for chat data). When the
    /// sets of a `data.train` list mix formats, the model learnt each of their prompts: a chat
    /// set's template is preferred, then the alpaca prompt, over plain text.
    pub fn of_data(cfg: &'a DataConfig, chat: Option<&'a ChatFormat>) -> PromptFormat<'a> {
        let formats = train_formats(cfg);
        match chat {
            Some(chat) if formats.contains(&DataFormat::Chat) => PromptFormat::Chat(chat),
            _ if formats.contains(&DataFormat::Alpaca) => PromptFormat::Alpaca(cfg),
            _ => PromptFormat::Text,
        }
    }

    /// The token ids the model is given for `prompt`, encoded as training encoded its examples.
    pub fn ids(&self, tok: &TextTokenizer, prompt: &str) -> Result<Vec<i64>> {
        self.conversation_ids(tok, &[], prompt)
    }

    /// The token ids for `prompt` asked after the `(question, answer)` turns of `history`: a
    /// conversation through the chat template; only a chat format has one.
    pub fn conversation_ids(
        &self,
        tok: &TextTokenizer,
        history: &[(String, String)],
        prompt: &str,
    ) -> Result<Vec<i64>> {
        if !history.is_empty() && !matches!(self, PromptFormat::Chat(_)) {
            bail!(
                "a prompt asked after earlier turns needs a chat template (a run with data.format: chat, or --chat)"
            );
        }
        match self {
            PromptFormat::Text => tok.encode(prompt, true),
            PromptFormat::Alpaca(cfg) => tok.encode(&alpaca_prompt(cfg, prompt, ""), true),
            PromptFormat::Chat(chat) => {
                let mut messages = Vec::new();
                for (question, answer) in history {
                    messages.push(chat::Message::new("user", question));
                    messages.push(chat::Message::new("assistant", answer));
                }
                messages.push(chat::Message::new("user", prompt));
                tok.encode(&chat.template.render(&messages, true)?, false)
            }
        }
    }
}

pub(super) fn alpaca_prompt(cfg: &DataConfig, instruction: &str, input: &str) -> String {
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

/// The column of `record` that holds lorafit's field `name` (after `data.columns` renames); a
/// dotted path (`prompt.text`) names a field of a nested object ([`Record::get`]).
pub(super) fn column<'a>(cfg: &'a DataConfig, name: &'a str) -> &'a str {
    cfg.columns.get(name).map(String::as_str).unwrap_or(name)
}

/// A string field, or an error naming file, row, the column and the columns present.
fn text<'a>(record: &'a Record, cfg: &DataConfig, name: &str, required: bool) -> Result<Option<&'a str>> {
    let col = column(cfg, name);
    match record.get(col) {
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
            let Some(Value::Array(items)) = record.get(col) else {
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
            chat::render_segments(&template.template, &conversation, cfg.train_on)?
        }
    })
}

/// How an example's rendered text becomes token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Encoding {
    /// With the tokenizer's special tokens (BOS), then a trained EOS so the model learns to stop.
    Text,
    /// Exactly as transformers' `apply_chat_template(tokenize=True)`: without special tokens, as
    /// the template writes whatever BOS and end-of-turn markers the model expects.
    Chat,
}

/// Tokenizes every record's whole text once (in parallel batches) and labels each token by the
/// segment its text comes from: a token is trained when any byte of it lies in a trainable
/// segment. Encoding segments one by one and joining the ids would not give the same tokens:
/// SentencePiece tokenizers start every encoded text with `▁`, and merges across a segment
/// border would be missed. Tokens with no text of their own (BOS added by the post-processor)
/// are not trained.
pub(super) fn tokenize_all(
    tok: &TextTokenizer,
    all: &[Segments],
    encoding: Encoding,
) -> Result<Vec<Example>> {
    let texts: Vec<String> = all.iter().map(|segs| segs.iter().map(|(t, _)| t.as_str()).collect()).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let encoded = tok.encode_batch(&refs, encoding == Encoding::Text)?;
    let mut out = Vec::with_capacity(all.len());
    for (segs, Encoded { ids, offsets }) in all.iter().zip(encoded) {
        let trainable = trainable_bytes(segs);
        let labels = ids
            .iter()
            .zip(&offsets)
            .map(|(&id, &(start, end))| {
                let trained = trainable.get(start..end).is_some_and(|bytes| bytes.contains(&true));
                if trained {
                    id
                } else {
                    IGNORE
                }
            })
            .collect();
        let mut ex = Example { input_ids: ids, labels, desirable: None };
        if encoding == Encoding::Text {
            ex.input_ids.push(tok.eos_id);
            ex.labels.push(tok.eos_id);
        }
        out.push(ex);
    }
    Ok(out)
}

/// For each byte of the segments' joined text, whether it belongs to a trainable segment.
fn trainable_bytes(segs: &Segments) -> Vec<bool> {
    segs.iter().flat_map(|(text, trainable)| std::iter::repeat_n(*trainable, text.len())).collect()
}

/// Reads, renders and tokenizes the records of `path` (a file, folder or glob), applying the
/// bad-row and too-long policies.
pub fn prepare(
    path: &Path,
    cfg: &DataConfig,
    tok: &TextTokenizer,
    chat: Option<&ChatFormat>,
) -> Result<Prepared> {
    prepare_as(path, cfg, tok, chat, Examples::Single)
}

/// What the examples of a data set are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Examples {
    /// Each stands alone (supervised fine-tuning).
    Single,
    /// Preference pairs, chosen then rejected ([`preference`](super::preference)).
    Pairs,
    /// Answers standing alone, each desirable or not (KTO): unpaired rows as they are, pairs
    /// split into their two answers ([`preference`](super::preference)).
    Unpaired,
}

impl Examples {
    /// What the examples of a run with `objective` are.
    pub fn of(objective: Objective) -> Examples {
        match objective {
            Objective::Kto => Examples::Unpaired,
            o if o.is_preference() => Examples::Pairs,
            _ => Examples::Single,
        }
    }

    /// How many consecutive examples make one unit that is held out or kept whole.
    fn unit(self) -> usize {
        match self {
            Examples::Single | Examples::Unpaired => 1,
            Examples::Pairs => 2,
        }
    }
}

/// [`prepare`] for single examples or preference pairs.
fn prepare_as(
    path: &Path,
    cfg: &DataConfig,
    tok: &TextTokenizer,
    chat: Option<&ChatFormat>,
    examples: Examples,
) -> Result<Prepared> {
    let mut rows = Rows::default();
    for file in expand_paths(path)? {
        rows.extend(read_rows(&file, &cfg.split)?);
    }
    match examples {
        Examples::Single => prepare_records(&rows, cfg, tok, chat),
        Examples::Pairs => super::preference::prepare_pairs(&rows, cfg, tok, chat),
        Examples::Unpaired => super::preference::prepare_unpaired(&rows, cfg, tok, chat),
    }
    .with_context(|| format!("preparing {}", path.display()))
}

/// The fields each format reads, by lorafit's name for them (before `data.columns` renames).
fn format_fields(format: DataFormat) -> &'static [&'static str] {
    match format {
        DataFormat::Completion => &["text"],
        DataFormat::Alpaca => &["instruction", "input", "output"],
        DataFormat::InputOutput => &["segments"],
        DataFormat::Chat => &["messages", chat::SYSTEM_FIELD, chat::TOOLS_FIELD],
    }
}

/// The record layout a record's columns suggest, after the renames of `columns`: the first
/// format whose main column it has, chats by either of their message columns; `None` when no
/// format fits.
fn detect_format(record: &Record, columns: &BTreeMap<String, String>) -> Option<DataFormat> {
    let has = |field: &str| record.get(columns.get(field).map(String::as_str).unwrap_or(field)).is_some();
    let chat = match columns.contains_key("messages") {
        true => has("messages"),
        false => chat::DEFAULT_MESSAGES_FIELDS.iter().any(|name| has(name)),
    };
    if chat {
        return Some(DataFormat::Chat);
    }
    if let Some(format) = super::preference::preference_format(record) {
        return Some(format);
    }
    [DataFormat::Alpaca, DataFormat::InputOutput, DataFormat::Completion]
        .into_iter()
        .find(|format| has(format_fields(*format)[0]))
}

/// The record layout of a data file's first readable record (`split` of a `save_to_disk`
/// folder, columns renamed by `columns`): for data whose config names no format.
pub fn detect_data_format(
    path: &Path,
    split: &str,
    columns: &BTreeMap<String, String>,
) -> Result<DataFormat> {
    let rows = read_rows(path, split)?;
    let Some(first) = rows.records.first() else {
        match rows.bad.first() {
            Some(reason) => {
                bail!("{} holds no readable record to detect data.format from: {reason}", path.display())
            }
            None => bail!("{} holds no records", path.display()),
        }
    };
    detect_format(first, columns).ok_or_else(|| {
        let present: Vec<&str> = first.fields.keys().map(String::as_str).collect();
        // A rename whose column the record lacks is the likely cause: name it first.
        let missing: Vec<String> = columns
            .iter()
            .filter(|(_, column)| first.get(column).is_none())
            .map(|(field, column)| {
                format!("data.columns renames `{column}` to {field}, but the record has no `{column}`; ")
            })
            .collect();
        anyhow!(
            "{} row {}: {}no known record layout in its columns ({}); expected `text`, \
             `instruction`/`output`, `segments`, `messages` or `conversations`: set data.format, \
             or rename columns with data.columns",
            first.file.display(),
            first.row,
            missing.concat(),
            present.join(", ")
        )
    })
}

/// Gives `data.format`, when the loaded YAML named none, the layout the data has (see
/// [`detect_data_format`]): of `data.train`, or for a `data.train` list of each set that names no
/// format of its own (and of `data.validation`, which is read with `data.format`). Returns a
/// line for the user per format detected. An explicit format is kept. Called right after a
/// config is loaded, so that a run's saved config names the format and a resume reads the data
/// the same way.
pub fn resolve_format(cfg: &mut DataConfig) -> Result<Vec<String>> {
    let mut said = Vec::new();
    if !cfg.format_unset {
        return Ok(said);
    }
    let DataConfig { train, validation, split, format, columns, format_unset, .. } = cfg;
    let mut detect = |path: &Path, columns: &BTreeMap<String, String>, key: &str| {
        let detected = detect_data_format(path, split, columns)
            .with_context(|| format!("detecting {key} (the config names none)"))?;
        said.push(format!("{key}: {detected} (detected from {}; set {key} to choose)", path.display()));
        Ok::<_, anyhow::Error>(detected)
    };
    match train {
        TrainData::Path(path) => *format = detect(path, columns, "data.format")?,
        TrainData::Sets(sets) => {
            for (i, set) in sets.iter_mut().enumerate().filter(|(_, set)| set.format.is_none()) {
                let own = set.columns.as_ref().unwrap_or(columns);
                set.format = Some(detect(&set.path, own, &format!("data.train[{i}].format"))?);
            }
            if let Some(validation) = validation {
                *format = detect(validation, columns, "data.format")?;
            }
        }
    }
    *format_unset = false;
    Ok(said)
}

/// The format a set of a `data.train` list is read with: its own, else `data.format`.
fn set_format(set: &DataSet, cfg: &DataConfig) -> DataFormat {
    set.format.unwrap_or(cfg.format)
}

/// The formats the training data is read with, each once, in the order of `data.train`.
pub fn train_formats(cfg: &DataConfig) -> Vec<DataFormat> {
    let mut formats = Vec::new();
    let all = match &cfg.train {
        TrainData::Path(_) => vec![cfg.format],
        TrainData::Sets(sets) => sets.iter().map(|set| set_format(set, cfg)).collect(),
    };
    for format in all {
        if !formats.contains(&format) {
            formats.push(format);
        }
    }
    formats
}

/// The columns a format reads in the user's files: its fields after renames, and for chats the
/// ShareGPT `conversations` column tried when `messages` is not renamed.
fn used_columns(cfg: &DataConfig) -> Vec<&str> {
    let mut used: Vec<&str> = format_fields(cfg.format).iter().map(|f| column(cfg, f)).collect();
    if cfg.format == DataFormat::Chat && !cfg.columns.contains_key("messages") {
        used.extend(chat::DEFAULT_MESSAGES_FIELDS);
    }
    used
}

/// Columns of preference data, which supervised fine-tuning must not take for its own: pairs of
/// a preferred and a rejected answer (DPO, as TRL and LLaMA-Factory lay them out).
const PREFERENCE_PAIRS: [(&str, &str); 2] =
    [("chosen", "rejected"), ("chosen_messages", "rejected_messages")];

/// Checks the columns of `records` against `cfg.format` before any row is used: renames in
/// `data.columns` must name a field of the format and a column of the data; preference data
/// (`chosen`/`rejected` pairs, KTO's boolean `label`) is refused, as training on its
/// conversations alone would train on rejected answers too. Returns a note listing the columns
/// the format ignores, if any.
fn check_columns(records: &[Record], cfg: &DataConfig) -> Result<Option<String>> {
    let Some(first) = records.first() else { return Ok(None) };
    let file = first.file.display();
    let mut present: Vec<&str> = Vec::new();
    for record in records {
        for key in record.fields.keys() {
            if !present.contains(&key.as_str()) {
                present.push(key);
            }
        }
    }
    let fields = format_fields(cfg.format);
    for (field, column) in &cfg.columns {
        if !fields.contains(&field.as_str()) {
            bail!(
                "data.columns renames `{field}`, which data.format {} does not read (it reads: {})",
                cfg.format,
                fields.join(", ")
            );
        }
        if !records.iter().any(|r| r.get(column).is_some()) {
            bail!(
                "data.columns maps `{field}` to the column `{column}`, but no row of {file} has it (columns: {})",
                present.join(", ")
            );
        }
    }
    let used = used_columns(cfg);
    // A nested path (`prompt.text`) uses its top-level column (`prompt`).
    let is_used =
        |c: &str| used.iter().any(|u| *u == c || u.strip_prefix(c).is_some_and(|r| r.starts_with('.')));
    for (chosen, rejected) in PREFERENCE_PAIRS {
        if [chosen, rejected].iter().all(|c| present.contains(c) && !is_used(c)) {
            bail!(
                "{file} holds preference pairs (columns `{chosen}` and `{rejected}`): set train.objective: dpo \
                 (or ipo) to train on them; supervised training (train.objective: sft) as data.format {} \
                 would train on the conversation without either answer, or on the rejected answers too",
                cfg.format
            );
        }
    }
    if !is_used("label") && records.iter().any(|r| r.fields.get("label").is_some_and(Value::is_boolean)) {
        bail!(
            "{file} holds KTO-style feedback (a true/false `label` column): as data.format {} every answer \
             would be trained, the undesirable ones (label false) too. Keep only the rows labelled true and \
             drop the column",
            cfg.format
        );
    }
    let ignored: Vec<&str> = present.iter().copied().filter(|c| !is_used(c)).collect();
    Ok((!ignored.is_empty()).then(|| {
        format!("{file}: columns that data.format {} does not read: {}", cfg.format, ignored.join(", "))
    }))
}

/// [`prepare`] for rows already read.
pub fn prepare_records(
    rows: &Rows,
    cfg: &DataConfig,
    tok: &TextTokenizer,
    chat: Option<&ChatFormat>,
) -> Result<Prepared> {
    let mut out = Prepared::default();
    let records: &[Record] = &rows.records;
    out.notes.extend(check_columns(records, cfg)?);
    // Rows the reader could not parse come first; they are in file order among themselves.
    for reason in &rows.bad {
        out.bad_row(cfg.on_bad_row, reason.clone())?;
    }
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
                out.bad_row(cfg.on_bad_row, reason)?;
            }
        }
    }
    for (mut ex, origin) in
        tokenize_all(tok, &all, if cfg.format == DataFormat::Chat { Encoding::Chat } else { Encoding::Text })?
            .into_iter()
            .zip(origins)
    {
        let length = ex.input_ids.len();
        let what = || format!("{origin}: the example has {length} tokens");
        if !fit_to_max_len(std::slice::from_mut(&mut ex), cfg, &mut out, what)? {
            continue;
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
/// the training records held out (from each set of a `data.train` list, before weighting, so
/// that no copy of a held-out example is trained).
pub fn prepare_splits(
    cfg: &DataConfig,
    seed: u64,
    tok: &TextTokenizer,
    chat: Option<&ChatFormat>,
    examples: Examples,
) -> Result<(Prepared, Option<Prepared>)> {
    let (train, held_out) = match &cfg.train {
        TrainData::Path(path) => {
            let train = prepare_as(path, cfg, tok, chat, examples)?;
            match cfg.val_split {
                Some(share) => {
                    let (train, val) = hold_out(train, share, seed, examples.unit())?;
                    (train, Some(val))
                }
                None => (train, None),
            }
        }
        TrainData::Sets(sets) => prepare_sets(sets, cfg, seed, tok, chat)?,
    };
    match &cfg.validation {
        Some(path) => Ok((train, Some(prepare_as(path, cfg, tok, chat, examples)?))),
        None => Ok((train, held_out)),
    }
}

/// Applies `data.too_long` to one unit of examples kept or dropped together (an example, or a
/// preference pair) whose longest member is over `data.max_seq_len`: cuts every member, or
/// counts the unit as skipped (`Ok(false)`), or refuses with `what()` ("FILE:ROW: the example
/// has N tokens"). `Ok(true)`: keep the unit.
pub(super) fn fit_to_max_len(
    unit: &mut [Example],
    cfg: &DataConfig,
    out: &mut Prepared,
    what: impl FnOnce() -> String,
) -> Result<bool> {
    if unit.iter().all(|ex| ex.input_ids.len() <= cfg.max_seq_len) {
        return Ok(true);
    }
    match cfg.too_long {
        TooLong::Truncate => {
            for ex in unit {
                ex.input_ids.truncate(cfg.max_seq_len);
                ex.labels.truncate(cfg.max_seq_len);
            }
            out.truncated += 1;
            Ok(true)
        }
        TooLong::Skip => {
            out.skipped_too_long += 1;
            Ok(false)
        }
        TooLong::Error => bail!(
            "{}, more than data.max_seq_len {}; raise max_seq_len or set data.too_long: truncate or skip",
            what(),
            cfg.max_seq_len
        ),
    }
}

/// The data sets of a `data.train` list, each read with its own format and columns, held out
/// from when `val_split` says so, weighted ([`weighted`]) and concatenated in list order.
fn prepare_sets(
    sets: &[DataSet],
    cfg: &DataConfig,
    seed: u64,
    tok: &TextTokenizer,
    chat: Option<&ChatFormat>,
) -> Result<(Prepared, Option<Prepared>)> {
    let (mut train, mut val) = (Prepared::default(), cfg.val_split.map(|_| Prepared::default()));
    for (i, set) in sets.iter().enumerate() {
        let set_cfg = DataConfig {
            format: set_format(set, cfg),
            columns: set.columns.clone().unwrap_or_else(|| cfg.columns.clone()),
            ..cfg.clone()
        };
        let mut prepared = prepare(&set.path, &set_cfg, tok, chat)
            .with_context(|| format!("data.train[{i}] ({})", set.path.display()))?;
        if let (Some(share), Some(val)) = (cfg.val_split, val.as_mut()) {
            let (kept, held) = hold_out(prepared, share, seed, 1)?;
            prepared = kept;
            val.absorb(held);
        }
        prepared.examples = weighted(prepared.examples, set.weight, seed ^ (i as u64 + 1));
        train.absorb(prepared);
    }
    Ok((train, val))
}

/// A set's examples as its `weight` counts them: each example `floor(weight)` times, then a
/// seeded `weight - floor(weight)` share of them once more (0.5: a random half; 2.5: all twice
/// and half three times). Unlike LLaMA-Factory's `interleave_probs`, which samples sets by
/// probability until one runs out, the result is a fixed multiset: the proportions hold
/// exactly over every epoch. Never fewer than one example.
fn weighted(examples: Vec<Example>, weight: f64, seed: u64) -> Vec<Example> {
    let whole = weight.floor() as usize;
    let extra = ((weight - weight.floor()) * examples.len() as f64).round() as usize;
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut picked = order[..extra.min(order.len())].to_vec();
    if whole == 0 && picked.is_empty() {
        picked.extend(order.first());
    }
    picked.sort_unstable();
    let mut out = Vec::with_capacity(examples.len() * whole + picked.len());
    for _ in 0..whole {
        out.extend(examples.iter().cloned());
    }
    out.extend(picked.into_iter().map(|i| examples[i].clone()));
    out
}

/// Holds a seeded `share` of the examples out of `train` for validation, in units of `unit`
/// consecutive examples (2 keeps a preference pair together).
fn hold_out(mut train: Prepared, share: f64, seed: u64, unit: usize) -> Result<(Prepared, Prepared)> {
    let units = train.examples.len() / unit;
    let mut order: Vec<usize> = (0..units).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed ^ 0x5EED_5A11));
    let n_val = ((units as f64 * share).round() as usize).clamp(1, units.saturating_sub(1));
    if units < 2 {
        bail!("data.val_split needs at least 2 training examples");
    }
    let held: std::collections::HashSet<usize> = order[..n_val].iter().copied().collect();
    let examples = std::mem::take(&mut train.examples);
    let (mut val, mut kept) = (Vec::new(), Vec::new());
    for (i, ex) in examples.into_iter().enumerate() {
        if held.contains(&(i / unit)) {
            val.push(ex);
        } else {
            kept.push(ex);
        }
    }
    train.examples = kept;
    Ok((train, Prepared { examples: val, ..Prepared::default() }))
}
