//! Preference pairs: records holding a prompt with a preferred (`chosen`) and a dispreferred
//! (`rejected`) answer → two examples each, the prompt masked, kept next to each other.
//!
//! Layouts read, as TRL's DPOTrainer reads them: `prompt`/`chosen`/`rejected` as strings or as
//! message lists; without `prompt`, the shared start of `chosen` and `rejected` is the prompt
//! (TRL's `extract_prompt`). LLaMA-Factory's columns are read too: `chosen_messages` /
//! `rejected_messages` (whole conversations), and ShareGPT `conversations` as the prompt with a
//! single `chosen` / `rejected` message. Strings are rendered as `data.format` says (the chat
//! template as a user turn and an assistant answer, the alpaca prompt, or plain text); message
//! lists need the chat template. As in TRL, the prompt is rendered alone (with the generation
//! prompt for chats) and the answer is what the whole rendering adds to it.
//!
//! [`prepare_pairs`] returns a [`Prepared`] whose examples are the pairs laid end to end:
//! `[chosen 0, rejected 0, chosen 1, rejected 1, ...]`; a pair is kept, cut or left out whole.

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

/// A pair's prompt and answers as read from the record, before rendering.
enum Pair {
    Text { prompt: String, chosen: String, rejected: String },
    Messages { prompt: Vec<Value>, chosen: Vec<Value>, rejected: Vec<Value> },
}

/// The pair of `record`, with an implicit prompt taken out of the answers.
fn read_pair(record: &Record, cfg: &DataConfig) -> Result<Pair> {
    let Some((chosen, rejected)) = PAIR_COLUMNS
        .iter()
        .find_map(|(c, r)| Some((record.get(column(cfg, c))?, record.get(column(cfg, r))?)))
    else {
        let present: Vec<&str> = record.fields.keys().map(String::as_str).collect();
        bail!(
            "the row has no preference pair: expected `chosen` and `rejected` (or `chosen_messages` and \
             `rejected_messages`) columns, it has: {}",
            present.join(", ")
        );
    };
    let prompt = PROMPT_COLUMNS.iter().find_map(|p| record.get(column(cfg, p))).filter(|p| !p.is_null());
    // A single message (ShareGPT's `chosen` beside `conversations`) is a list of one.
    let listed = |v: &Value| match v {
        Value::Object(_) => Some(vec![v.clone()]),
        Value::Array(items) => Some(items.clone()),
        _ => None,
    };
    match (prompt, chosen, rejected) {
        (None, Value::String(c), Value::String(r)) => {
            let shared = text_prompt_len(c, r);
            Ok(Pair::Text {
                prompt: c[..shared].into(),
                chosen: c[shared..].into(),
                rejected: r[shared..].into(),
            })
        }
        (Some(Value::String(p)), Value::String(c), Value::String(r)) => {
            Ok(Pair::Text { prompt: p.clone(), chosen: c.clone(), rejected: r.clone() })
        }
        (prompt, c, r) => {
            let what = "`chosen` and `rejected` must both be strings or both message lists";
            let (c, r) =
                (listed(c).ok_or_else(|| anyhow!("{what}"))?, listed(r).ok_or_else(|| anyhow!("{what}"))?);
            match prompt {
                Some(p) => {
                    let prompt =
                        listed(p).ok_or_else(|| anyhow!("the prompt must be a message list here"))?;
                    Ok(Pair::Messages { prompt, chosen: c, rejected: r })
                }
                None => {
                    let shared = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
                    Ok(Pair::Messages {
                        prompt: c[..shared].to_vec(),
                        chosen: c[shared..].to_vec(),
                        rejected: r[shared..].to_vec(),
                    })
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
    if let Pair::Text { prompt, chosen, rejected } = &pair {
        if prompt.is_empty() || chosen.is_empty() || rejected.is_empty() {
            bail!("the pair needs a prompt (or a shared start of `chosen` and `rejected`) and two non-empty answers");
        }
    }
    let with = |answer: &str, prompt: &str| vec![(prompt.to_string(), false), (answer.to_string(), true)];
    match (pair, cfg.format, chat) {
        (Pair::Text { prompt, chosen, rejected }, DataFormat::Chat, Some(chat)) => {
            let user = vec![text_message("user", &prompt)];
            let answers = [chosen, rejected].map(|a| vec![text_message("assistant", &a)]);
            let [c, r] = answers.map(|a| chat_segments(record, chat, &user, &a));
            Ok((c?, r?))
        }
        (Pair::Text { prompt, chosen, rejected }, DataFormat::Alpaca, _) => {
            let prompt = alpaca_prompt(cfg, &prompt, "");
            Ok((with(&chosen, &prompt), with(&rejected, &prompt)))
        }
        (Pair::Text { prompt, chosen, rejected }, _, _) => Ok((with(&chosen, &prompt), with(&rejected, &prompt))),
        (Pair::Messages { prompt, chosen, rejected }, DataFormat::Chat, Some(chat)) => {
            if chosen.is_empty() || rejected.is_empty() {
                bail!("`chosen` and `rejected` are the same conversation: the pair has nothing to prefer");
            }
            Ok((chat_segments(record, chat, &prompt, &chosen)?, chat_segments(record, chat, &prompt, &rejected)?))
        }
        (Pair::Messages { .. }, format, _) => bail!(
            "the pair holds message lists, which are rendered with a chat template, but data.format is {format}: \
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
    let prompt_text = chat.template.render(&parse(prompt)?.messages, true)?;
    let whole: Vec<Value> = prompt.iter().chain(answer).cloned().collect();
    let text = chat.template.render(&parse(&whole)?.messages, false)?;
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
    let mut out = Prepared::default();
    for reason in &rows.bad {
        out.bad_row(cfg.on_bad_row, reason.clone())?;
    }
    let (mut segments, mut origins) = (Vec::new(), Vec::new());
    for record in &rows.records {
        let origin = format!("{}:{}", record.file.display(), record.row);
        match pair_segments(record, cfg, chat) {
            Ok((chosen, rejected)) => {
                segments.extend([chosen, rejected]);
                origins.push(origin);
            }
            Err(e) => out.bad_row(cfg.on_bad_row, format!("{origin}: {e:#}"))?,
        }
    }
    let encoding = if cfg.format == DataFormat::Chat { Encoding::Chat } else { Encoding::Text };
    let examples = tokenize_all(tok, &segments, encoding)?;
    for (pair, origin) in examples.chunks(2).zip(origins) {
        let mut pair = pair.to_vec();
        let longest = pair.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
        let what = || format!("{origin}: the pair has an answer of {longest} tokens with its prompt");
        if !fit_to_max_len(&mut pair, cfg, &mut out, what)? {
            continue;
        }
        if pair.iter().any(|ex| ex.labels.iter().skip(1).all(|&l| l == IGNORE)) {
            out.dropped_no_labels += 1;
            continue;
        }
        out.examples.extend(pair);
    }
    if out.examples.is_empty() {
        bail!("no usable preference pair: {} (with max_seq_len {})", out.report(), cfg.max_seq_len);
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

/// Whether the first record holds a preference pair (for detecting `data.format`).
pub fn is_pair(record: &Record) -> bool {
    PAIR_COLUMNS.iter().any(|(c, r)| record.get(c).is_some() && record.get(r).is_some())
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
