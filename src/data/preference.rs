//! Preference data: records holding a prompt with a preferred (`chosen`) and a dispreferred
//! (`rejected`) answer → two examples each, the prompt masked, kept next to each other; or, for
//! KTO, answers standing alone, each labelled desirable or not.
//!
//! Layouts read, as TRL's DPOTrainer reads them: `prompt`/`chosen`/`rejected` as strings or as
//! message lists; without `prompt`, the shared start of `chosen` and `rejected` is the prompt
//! (TRL's `extract_prompt`). LLaMA-Factory's columns are read too: `chosen_messages` /
//! `rejected_messages` (whole conversations), and ShareGPT `conversations` as the prompt with a
//! single `chosen` / `rejected` message. KTO's unpaired layout, as TRL's KTOTrainer reads it:
//! `prompt`/`completion` (both strings or both message lists) and a boolean `label`. Strings are
//! rendered as `data.format` says (the chat template as a user turn and an assistant answer, the
//! alpaca prompt, or plain text); message lists need the chat template. As in TRL, the prompt is
//! rendered alone (with the generation prompt for chats) and the answer is what the whole
//! rendering adds to it.
//!
//! [`prepare_pairs`] returns a [`Prepared`] whose examples are the pairs laid end to end:
//! `[chosen 0, rejected 0, chosen 1, rejected 1, ...]`; a pair is kept, cut or left out whole.
//! [`prepare_unpaired`] returns one example per answer, with its [`Example::desirable`] flag:
//! an unpaired row as it is, a pair as its two answers (chosen desirable), as TRL's
//! `unpair_preference_dataset` splits it.

use super::chat;
use super::format::{
    alpaca_prompt, column, fit_to_max_len, tokenize_all, ChatFormat, Encoding, Example, Prepared, Segments,
    IGNORE,
};
use super::source::{Record, Rows};
use super::tokenizer::TextTokenizer;
use crate::config::{DataConfig, DataFormat};
use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};

/// The columns of a preference pair: (chosen, rejected), in the order they are looked for.
pub const PAIR_COLUMNS: [(&str, &str); 2] =
    [("chosen", "rejected"), ("chosen_messages", "rejected_messages")];

/// Columns that hold the prompt, in the order they are looked for.
const PROMPT_COLUMNS: [&str; 2] = ["prompt", "conversations"];

/// The columns of an unpaired (KTO) answer: the answer, and whether it is desirable.
const COMPLETION: &str = "completion";
const LABEL: &str = "label";

/// A prompt and its answers as read from a record, before rendering.
enum Answers {
    Text { prompt: String, answers: Vec<String> },
    Messages { prompt: Vec<Value>, answers: Vec<Vec<Value>> },
}

/// A single message (ShareGPT's `chosen` beside `conversations`) as a list of one; a list as it is.
fn listed(v: &Value) -> Option<Vec<Value>> {
    match v {
        Value::Object(_) => Some(vec![v.clone()]),
        Value::Array(items) => Some(items.clone()),
        _ => None,
    }
}

/// The columns `record` has, for error messages.
fn present(record: &Record) -> String {
    record.fields.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
}

/// The pair of `record` (chosen, then rejected), with an implicit prompt taken out of the answers.
fn read_pair(record: &Record, cfg: &DataConfig) -> Result<Answers> {
    let Some((chosen, rejected)) = PAIR_COLUMNS
        .iter()
        .find_map(|(c, r)| Some((record.get(column(cfg, c))?, record.get(column(cfg, r))?)))
    else {
        if record.get(column(cfg, COMPLETION)).is_some() && record.get(column(cfg, LABEL)).is_some() {
            bail!(
                "the row is an unpaired answer (`{}` and `{}`, KTO's layout), but this objective needs pairs: \
                 `chosen` and `rejected` columns; set train.objective: kto to train on unpaired answers",
                column(cfg, COMPLETION),
                column(cfg, LABEL)
            );
        }
        bail!(
            "the row has no preference pair: expected `chosen` and `rejected` (or `chosen_messages` and \
             `rejected_messages`) columns, it has: {}",
            present(record)
        );
    };
    let prompt = PROMPT_COLUMNS.iter().find_map(|p| record.get(column(cfg, p))).filter(|p| !p.is_null());
    match (prompt, chosen, rejected) {
        (None, Value::String(c), Value::String(r)) => {
            let shared = text_prompt_len(c, r);
            Ok(Answers::Text {
                prompt: c[..shared].into(),
                answers: vec![c[shared..].into(), r[shared..].into()],
            })
        }
        (Some(Value::String(p)), Value::String(c), Value::String(r)) => {
            Ok(Answers::Text { prompt: p.clone(), answers: vec![c.clone(), r.clone()] })
        }
        (prompt, c, r) => {
            let what = "`chosen` and `rejected` must both be strings or both message lists";
            let (c, r) =
                (listed(c).ok_or_else(|| anyhow!("{what}"))?, listed(r).ok_or_else(|| anyhow!("{what}"))?);
            match prompt {
                Some(p) => {
                    let prompt =
                        listed(p).ok_or_else(|| anyhow!("the prompt must be a message list here"))?;
                    Ok(Answers::Messages { prompt, answers: vec![c, r] })
                }
                None => {
                    let shared = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
                    let answers = vec![c[shared..].to_vec(), r[shared..].to_vec()];
                    Ok(Answers::Messages { prompt: c[..shared].to_vec(), answers })
                }
            }
        }
    }
}

/// The length of the implicit prompt of two texts, as TRL's `extract_prompt` finds it: up to the
/// first character where they differ, less a space just before it (the answers keep it).
fn text_prompt_len(chosen: &str, rejected: &str) -> usize {
    let mut shared = 0;
    for ((i, a), b) in chosen.char_indices().zip(rejected.chars()) {
        if a != b {
            break;
        }
        shared = i + a.len_utf8();
    }
    if shared < chosen.len().min(rejected.len()) && chosen[..shared].ends_with(' ') {
        shared -= 1;
    }
    shared
}

/// The (chosen, rejected) segments of `record`: the rendered prompt untrained, then the answer.
pub fn pair_segments(
    record: &Record,
    cfg: &DataConfig,
    chat: Option<&ChatFormat>,
) -> Result<(Segments, Segments)> {
    let pair = read_pair(record, cfg)?;
    match &pair {
        Answers::Text { prompt, answers } if prompt.is_empty() || answers.iter().any(String::is_empty) => {
            bail!("the pair needs a prompt (or a shared start of `chosen` and `rejected`) and two non-empty answers")
        }
        Answers::Messages { answers, .. } if answers.iter().any(Vec::is_empty) => {
            bail!("`chosen` and `rejected` are the same conversation: the pair has nothing to prefer")
        }
        _ => {}
    }
    let [chosen, rejected]: [Segments; 2] =
        render(record, cfg, chat, pair)?.try_into().map_err(|_| anyhow!("a pair renders as two answers"))?;
    Ok((chosen, rejected))
}

/// The unpaired (KTO) answer of `record`: its prompt and completion, and its `label`.
fn read_unpaired(record: &Record, cfg: &DataConfig) -> Result<(Answers, bool)> {
    let (prompt_col, completion_col, label_col) =
        (column(cfg, "prompt"), column(cfg, COMPLETION), column(cfg, LABEL));
    let desirable = match record.get(label_col) {
        Some(Value::Bool(b)) => *b,
        None | Some(Value::Null) => bail!(
            "the row has no `{label_col}` column (true for a desirable answer, false for an undesirable one); \
             it has: {}",
            present(record)
        ),
        Some(other) => bail!("`{label_col}` must be true or false (a JSON boolean), found {other}"),
    };
    let missing = |col: &str| anyhow!("the row has no `{col}` column; it has: {}", present(record));
    let prompt = record.get(prompt_col).filter(|v| !v.is_null()).ok_or_else(|| missing(prompt_col))?;
    let completion =
        record.get(completion_col).filter(|v| !v.is_null()).ok_or_else(|| missing(completion_col))?;
    let empty = || anyhow!("`{completion_col}` is empty: an unpaired answer needs a completion to rate");
    let answers = match (prompt, completion) {
        (Value::String(p), Value::String(c)) => {
            if p.is_empty() {
                bail!("`{prompt_col}` is empty: an unpaired answer needs a prompt");
            }
            if c.is_empty() {
                return Err(empty());
            }
            Answers::Text { prompt: p.clone(), answers: vec![c.clone()] }
        }
        (p, c) => {
            let what = || {
                anyhow!("`{prompt_col}` and `{completion_col}` must both be strings or both message lists")
            };
            let (prompt, completion) = (listed(p).ok_or_else(what)?, listed(c).ok_or_else(what)?);
            if completion.is_empty() {
                return Err(empty());
            }
            Answers::Messages { prompt, answers: vec![completion] }
        }
    };
    Ok((answers, desirable))
}

/// Each answer's segments: the prompt rendered as `data.format` says, untrained, then the answer.
fn render(
    record: &Record,
    cfg: &DataConfig,
    chat: Option<&ChatFormat>,
    read: Answers,
) -> Result<Vec<Segments>> {
    let with = |answer: &str, prompt: &str| vec![(prompt.to_string(), false), (answer.to_string(), true)];
    match (read, cfg.format, chat) {
        (Answers::Text { prompt, answers }, DataFormat::Chat, Some(chat)) => {
            let user = vec![text_message("user", &prompt)];
            answers.iter().map(|a| chat_segments(record, chat, &user, &[text_message("assistant", a)])).collect()
        }
        (Answers::Text { prompt, answers }, DataFormat::Alpaca, _) => {
            let prompt = alpaca_prompt(cfg, &prompt, "");
            Ok(answers.iter().map(|a| with(a, &prompt)).collect())
        }
        (Answers::Text { prompt, answers }, _, _) => Ok(answers.iter().map(|a| with(a, &prompt)).collect()),
        (Answers::Messages { prompt, answers }, DataFormat::Chat, Some(chat)) => {
            answers.iter().map(|a| chat_segments(record, chat, &prompt, a)).collect()
        }
        (Answers::Messages { .. }, format, _) => bail!(
            "the row holds message lists, which are rendered with a chat template, but data.format is {format}: \
             set data.format: chat"
        ),
    }
}

fn text_message(role: &str, content: &str) -> Value {
    serde_json::json!({ "role": role, "content": content })
}

/// The prompt rendered with the generation prompt (untrained), then what rendering the answer
/// after it adds (trained).
fn chat_segments(record: &Record, chat: &ChatFormat, prompt: &[Value], answer: &[Value]) -> Result<Segments> {
    let parse = |messages: &[Value]| {
        let fields = Map::from_iter([("messages".to_string(), Value::Array(messages.to_vec()))]);
        chat::parse_conversation(&record.file, record.row, &fields, Some("messages"), chat::TOOLS_FIELD)
    };
    // Parsed whole: the prompt alone has no assistant turn, which a conversation needs.
    let whole: Vec<Value> = prompt.iter().chain(answer).cloned().collect();
    let messages = parse(&whole)?.messages;
    let prompt_text = chat.template.render(&messages[..prompt.len()], true)?;
    let text = chat.template.render(&messages, false)?;
    let Some(answer_text) = text.strip_prefix(&prompt_text) else {
        bail!(
            "the chat template renders the prompt differently once the answer follows it, so the answer \
             cannot be told from the prompt"
        );
    };
    Ok(vec![(prompt_text.clone(), false), (answer_text.to_string(), true)])
}

/// Renders and tokenizes the pairs of `rows`, applying `data.on_bad_row` and `data.too_long`
/// to each pair whole.
pub fn prepare_pairs(
    rows: &Rows,
    cfg: &DataConfig,
    tok: &TextTokenizer,
    chat: Option<&ChatFormat>,
) -> Result<Prepared> {
    let names = ("preference pair", "the pair has an answer of");
    prepare_units(rows, cfg, tok, names, |record| {
        let (chosen, rejected) = pair_segments(record, cfg, chat)?;
        Ok(vec![vec![(chosen, true), (rejected, false)]])
    })
}

/// Renders and tokenizes the answers of `rows` one by one, each with its desirable flag: an
/// unpaired row (`prompt`, `completion`, `label`) as it is, a pair as its chosen (desirable) and
/// its rejected answer, as TRL's KTOTrainer unpairs pairs.
pub fn prepare_unpaired(
    rows: &Rows,
    cfg: &DataConfig,
    tok: &TextTokenizer,
    chat: Option<&ChatFormat>,
) -> Result<Prepared> {
    prepare_units(rows, cfg, tok, ("answer", "the answer has"), |record| {
        if is_pair(record) {
            let (chosen, rejected) = pair_segments(record, cfg, chat)?;
            return Ok(vec![vec![(chosen, true)], vec![(rejected, false)]]);
        }
        let (read, desirable) = read_unpaired(record, cfg)?;
        Ok(render(record, cfg, chat, read)?.into_iter().map(|s| vec![(s, desirable)]).collect())
    })
}

/// The examples of the units `read` makes of each record (a unit: answers with their
/// desirable flags, kept, cut or left out together), with `data.on_bad_row` applied to the rows
/// it refuses and `data.too_long` to each unit. `names`: what a unit is called, and how a too
/// long one is described ("the answer has").
fn prepare_units(
    rows: &Rows,
    cfg: &DataConfig,
    tok: &TextTokenizer,
    names: (&str, &str),
    read: impl Fn(&Record) -> Result<Vec<Vec<(Segments, bool)>>>,
) -> Result<Prepared> {
    let mut out = Prepared::default();
    for reason in &rows.bad {
        out.bad_row(cfg.on_bad_row, reason.clone())?;
    }
    let (mut segments, mut units) = (Vec::new(), Vec::new());
    for record in &rows.records {
        let origin = format!("{}:{}", record.file.display(), record.row);
        match read(record) {
            Ok(read) => {
                for unit in read {
                    units.push((origin.clone(), unit.iter().map(|(_, d)| *d).collect::<Vec<_>>()));
                    segments.extend(unit.into_iter().map(|(s, _)| s));
                }
            }
            Err(e) => out.bad_row(cfg.on_bad_row, format!("{origin}: {e:#}"))?,
        }
    }
    let encoding = if cfg.format == DataFormat::Chat { Encoding::Chat } else { Encoding::Text };
    let mut examples = tokenize_all(tok, &segments, encoding)?.into_iter();
    for (origin, flags) in units {
        let mut unit: Vec<Example> = examples
            .by_ref()
            .take(flags.len())
            .zip(flags)
            .map(|(e, d)| Example { desirable: Some(d), ..e })
            .collect();
        let longest = unit.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
        let what = || format!("{origin}: {} {longest} tokens with its prompt", names.1);
        if !fit_to_max_len(&mut unit, cfg, &mut out, what)? {
            continue;
        }
        if unit.iter().any(|ex| ex.labels.iter().skip(1).all(|&l| l == IGNORE)) {
            out.dropped_no_labels += 1;
            continue;
        }
        out.examples.extend(unit);
    }
    if out.examples.is_empty() {
        bail!("no usable {}: {} (with max_seq_len {})", names.0, out.report(), cfg.max_seq_len);
    }
    Ok(out)
}

/// The pairs of `examples` laid end to end as [`prepare_pairs`] lays them: (chosen, rejected).
pub fn pairs_of(examples: &[Example]) -> impl Iterator<Item = (&Example, &Example)> {
    examples.chunks_exact(2).map(|p| (&p[0], &p[1]))
}

/// The tokens of a pair's prompt: those before its first trained token (shared by both answers).
pub fn prompt_len(answer: &Example) -> usize {
    answer.labels.iter().skip(1).position(|&l| l != IGNORE).map_or(answer.labels.len(), |i| i + 1)
}

/// Whether a record holds a preference pair.
pub fn is_pair(record: &Record) -> bool {
    PAIR_COLUMNS.iter().any(|(c, r)| record.get(c).is_some() && record.get(r).is_some())
}

/// The `data.format` of preference data, from its first record: message lists are chats,
/// strings plain text, as TRL reads them. `None`: not preference data.
pub fn preference_format(record: &Record) -> Option<DataFormat> {
    let answers: Vec<&str> = if is_pair(record) {
        PAIR_COLUMNS.iter().map(|(c, _)| *c).collect()
    } else if record.get(COMPLETION).is_some() && record.get(LABEL).is_some() {
        vec![COMPLETION]
    } else {
        return None;
    };
    let lists = answers.iter().any(|c| record.get(c).is_some_and(|v| !v.is_string()));
    Some(if lists { DataFormat::Chat } else { DataFormat::Completion })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implicit_text_prompt_leaves_the_space_to_the_answers() {
        let (c, r) = ("The sky is blue.", "The sky is green.");
        let n = text_prompt_len(c, r);
        assert_eq!((&c[..n], &c[n..], &r[n..]), ("The sky is", " blue.", " green."));
    }
}
