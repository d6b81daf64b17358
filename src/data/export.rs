//! `lorafit data export`: the prepared examples as JSON Lines, exactly the ids and labels a run
//! trains on, to check them or to feed them to another trainer.

use super::format::{Example, Prepared};
use super::preference::{pairs_of, prompt_len};
use super::tokenizer::TextTokenizer;
use crate::files::write_atomic;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::Path;

/// Writes one line per example, `{"input_ids": [...], "labels": [...], "text": "..."}`, with
/// labels -100 ([`IGNORE`](super::format::IGNORE)) where the token carries no loss and `text` the
/// ids decoded with their special tokens; with `pairs`, one line per preference pair,
/// `{"prompt": "...", "chosen": {example}, "rejected": {example}}`. Returns the lines written.
pub fn write_jsonl(data: &Prepared, tok: &TextTokenizer, pairs: bool, out: &Path) -> Result<usize> {
    let lines: Vec<Value> = if pairs {
        pairs_of(&data.examples)
            .map(|(chosen, rejected)| {
                let prompt = tok.decode_all(&chosen.input_ids[..prompt_len(chosen)])?;
                Ok(json!({"prompt": prompt, "chosen": line(chosen, tok)?, "rejected": line(rejected, tok)?}))
            })
            .collect::<Result<_>>()?
    } else {
        data.examples.iter().map(|ex| line(ex, tok)).collect::<Result<_>>()?
    };
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    write_atomic(out, text.as_bytes()).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(lines.len())
}

/// An example's line: its ids, labels and decoded text, and KTO's `label` where it has one.
fn line(ex: &Example, tok: &TextTokenizer) -> Result<Value> {
    let mut line =
        json!({"input_ids": ex.input_ids, "labels": ex.labels, "text": tok.decode_all(&ex.input_ids)?});
    if let Some(desirable) = ex.desirable {
        line["label"] = desirable.into();
    }
    Ok(line)
}
