//! `lorafit generate --prompts FILE.jsonl --out FILE.jsonl`: every prompt of a file answered,
//! each record written back with its answer. A record is one prompt (`prompt` or `instruction`)
//! and gets `answer`; or MT-Bench's `{"question_id", "category", "turns": [...]}`, where each turn
//! is asked after the earlier turns and their answers, and gets FastChat's
//! `choices: [{"index": 0, "turns": [answers...]}]`.

use super::{GenerateOptions, Generator, PromptFormat};
use crate::files::write_atomic;
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// The prompts file and where the answers go.
#[derive(Debug, Clone)]
pub struct BulkFiles {
    pub prompts: PathBuf,
    pub out: PathBuf,
    /// Replace an existing `out`.
    pub force: bool,
}

impl BulkFiles {
    /// Refuses to overwrite `out` unless `force`.
    pub fn check_out(&self) -> Result<()> {
        if self.out.exists() && !self.force {
            bail!("--out {} already exists; pass --force to replace it", self.out.display());
        }
        Ok(())
    }
}

/// One record of the prompts file.
pub struct PromptRecord {
    /// Line number in the file, from 1.
    line: usize,
    fields: Map<String, Value>,
    /// The questions asked one after the other; one for a single prompt.
    turns: Vec<String>,
    /// MT-Bench's layout: the answers go to `choices`.
    multi_turn: bool,
}

/// The columns a single prompt is read from, in order of preference.
const PROMPT_COLUMNS: [&str; 2] = ["prompt", "instruction"];

/// Reads every record of a JSON Lines prompts file, refusing a bad one by line.
pub fn read_prompts(path: &Path) -> Result<Vec<PromptRecord>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read --prompts {}", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let record = parse_record(i + 1, line)
            .with_context(|| format!("--prompts {} line {}", path.display(), i + 1))?;
        records.push(record);
    }
    if records.is_empty() {
        bail!("--prompts {} holds no prompts (one JSON object per line)", path.display());
    }
    Ok(records)
}

fn parse_record(line: usize, text: &str) -> Result<PromptRecord> {
    let fields = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(fields)) => fields,
        Ok(_) => bail!("each line must be a JSON object"),
        Err(e) => bail!("not valid JSON: {e}"),
    };
    if let Some(turns) = fields.get("turns") {
        let turns = match turns.as_array() {
            Some(list) if !list.is_empty() => list.iter().map(|t| t.as_str().map(str::to_string)).collect(),
            _ => None,
        };
        let Some(turns) = turns else { bail!("`turns` must be a non-empty list of strings") };
        return Ok(PromptRecord { line, fields, turns, multi_turn: true });
    }
    let Some((name, value)) = PROMPT_COLUMNS.iter().find_map(|&c| fields.get(c).map(|v| (c, v))) else {
        let present: Vec<&str> = fields.keys().map(String::as_str).collect();
        bail!("no `prompt`, `instruction` or `turns` column (it has: {})", present.join(", "));
    };
    let Some(prompt) = value.as_str() else { bail!("`{name}` must be a string") };
    let turns = vec![prompt.to_string()];
    Ok(PromptRecord { line, fields, turns, multi_turn: false })
}

/// Answers every record in order and writes them to `files.out` (all at once, so a failure
/// leaves no half-written file); returns how many records were written.
pub(super) fn answer_all(
    generator: &Generator,
    opts: &GenerateOptions,
    records: &[PromptRecord],
    files: &BulkFiles,
) -> Result<usize> {
    let format = generator.format();
    // Checked before any answer: later turns need a conversation, which only a chat template has.
    if !matches!(format, PromptFormat::Chat(_)) {
        if let Some(record) = records.iter().find(|r| r.turns.len() > 1) {
            bail!(
                "--prompts {} line {} has {} turns: asking a turn after earlier answers needs a chat \
                 template (a run with data.format: chat, or --chat)",
                files.prompts.display(),
                record.line,
                record.turns.len()
            );
        }
    }
    let mut out = String::new();
    for record in records {
        let answers = answer_turns(generator, opts, &format, record)
            .with_context(|| format!("--prompts {} line {}", files.prompts.display(), record.line))?;
        let mut fields = record.fields.clone();
        if record.multi_turn {
            fields.insert("choices".into(), json!([{ "index": 0, "turns": answers }]));
        } else {
            fields.insert("answer".into(), json!(answers[0]));
        }
        out.push_str(&Value::Object(fields).to_string());
        out.push('\n');
    }
    write_atomic(&files.out, out.as_bytes())?;
    Ok(records.len())
}

/// The answer to each turn of `record`, each asked after the earlier turns and their answers.
fn answer_turns(
    generator: &Generator,
    opts: &GenerateOptions,
    format: &PromptFormat,
    record: &PromptRecord,
) -> Result<Vec<String>> {
    let mut history: Vec<(String, String)> = Vec::new();
    for turn in &record.turns {
        let ids = format.conversation_ids(&generator.tok, &history, turn)?;
        generator.check_ids(&ids)?;
        let new = generator.answer(&ids, opts, |_| {})?;
        let answer = generator.tok.decode(&new)?.trim().to_string();
        history.push((turn.clone(), answer));
    }
    Ok(history.into_iter().map(|(_, answer)| answer).collect())
}
