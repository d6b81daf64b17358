//! Records from data files: JSON Lines (one object per line) or a JSON array of objects.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// One row of a data file, with where it came from for error messages.
pub struct Record {
    /// 1-based line (JSON Lines) or element index (JSON array).
    pub row: usize,
    pub fields: Map<String, Value>,
}

/// Reads every record of `path`; the format follows from the first non-blank byte
/// (`[` = JSON array, otherwise JSON Lines).
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read data file {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let offset = e.utf8_error().valid_up_to();
        anyhow::anyhow!(
            "data file {} is not UTF-8 text (invalid byte at offset {offset}, line {})",
            path.display(),
            1 + e.as_bytes()[..offset]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
        )
    })?;
    let records = if text.trim_start().starts_with('[') {
        read_json_array(path, &text)?
    } else {
        read_json_lines(path, &text)?
    };
    if records.is_empty() {
        bail!(
            "data file {} holds no records; expected one JSON object per line",
            path.display()
        );
    }
    Ok(records)
}

fn read_json_lines(path: &Path, text: &str) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let row = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).with_context(|| {
            format!(
                "{}:{row}: this line is not valid JSON; each line must be one JSON object",
                path.display()
            )
        })?;
        records.push(Record {
            row,
            fields: into_object(path, row, value)?,
        });
    }
    Ok(records)
}

fn read_json_array(path: &Path, text: &str) -> Result<Vec<Record>> {
    let values: Vec<Value> = serde_json::from_str(text)
        .with_context(|| format!("{} is not a valid JSON array of objects", path.display()))?;
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            Ok(Record {
                row: i + 1,
                fields: into_object(path, i + 1, v)?,
            })
        })
        .collect()
}

fn into_object(path: &Path, row: usize, value: Value) -> Result<Map<String, Value>> {
    match value {
        Value::Object(map) => Ok(map),
        other => bail!(
            "{}:{row}: expected a JSON object, found {}",
            path.display(),
            kind_name(&other)
        ),
    }
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The string field `name` of a record, or an error naming file, row and the columns present.
pub fn string_field<'a>(
    path: &Path,
    record: &'a Record,
    name: &str,
    required: bool,
) -> Result<Option<&'a str>> {
    match record.fields.get(name) {
        Some(Value::String(s)) => Ok(Some(s)),
        None | Some(Value::Null) if !required => Ok(None),
        None => {
            let present: Vec<&str> = record.fields.keys().map(String::as_str).collect();
            bail!(
                "{}:{}: the row has no `{name}` field (it has: {}); check data.format",
                path.display(),
                record.row,
                present.join(", ")
            )
        }
        Some(other) => bail!(
            "{}:{}: `{name}` must be a string, found {}",
            path.display(),
            record.row,
            kind_name(other)
        ),
    }
}
