//! `lorafit data export`: the prepared examples as JSON Lines, exactly the ids and labels a run
//! trains on, to check them or to feed them to another trainer.

use super::format::Prepared;
use super::tokenizer::TextTokenizer;
use crate::files::write_atomic;
use anyhow::{Context, Result};
use serde_json::json;
use std::path::Path;

/// Writes one line per example, `{"input_ids": [...], "labels": [...], "text": "..."}`, with
/// labels -100 ([`IGNORE`](super::format::IGNORE)) where the token carries no loss and `text` the ids decoded with their
/// special tokens. Returns the number of examples written.
pub fn write_jsonl(data: &Prepared, tok: &TextTokenizer, out: &Path) -> Result<usize> {
    let mut text = String::new();
    for ex in &data.examples {
        let line = json!({
            "input_ids": ex.input_ids,
            "labels": ex.labels,
            "text": tok.decode_all(&ex.input_ids)?,
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    write_atomic(out, text.as_bytes()).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(data.examples.len())
}
