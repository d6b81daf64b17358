//! Text formats: JSON, JSON Lines, plain text.

use super::{extension, Record, Rows};
use crate::files::kind_name;
use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};
use std::path::Path;

const BOM: &[u8] = b"\xEF\xBB\xBF";

// JSON Lines and plain text are read line by line, so that a line (or paragraph) with bytes that
// are not UTF-8 is one bad row; a JSON document must be UTF-8 as a whole.
pub(super) fn read_text_like(path: &Path) -> Result<Rows> {
    let bytes = std::fs::read(path).map_err(|e| {
        anyhow!("cannot read data file {}: {e}; check the path and its permissions", path.display())
    })?;
    let body = bytes.strip_prefix(BOM).unwrap_or(&bytes);
    let ext = extension(path);
    let Some(first) = body.iter().copied().find(|b| !b.is_ascii_whitespace()) else {
        bail!("data file {} is empty; it must hold at least one record", path.display());
    };
    match (ext.as_str(), first) {
        ("txt" | "text" | "md", _) => Ok(read_paragraphs(path, &bytes)),
        (_, b'[') => {
            let text = decode_utf8(path, &bytes, 1, 0)?;
            read_json_array(path, text.strip_prefix('\u{FEFF}').unwrap_or(text), None).map(Rows::from)
        }
        ("jsonl" | "ndjson", _) => read_json_lines(path, &bytes),
        (_, b'{') => read_json_object_or_lines(path, &bytes),
        ("json", _) => bail!(
            "{}:1: a .json file must start with `[` (an array of objects) or `{{` (JSON Lines, \
             or an object holding one list of objects); if it is plain text, name it .txt",
            path.display()
        ),
        _ => Ok(read_paragraphs(path, &bytes)),
    }
}

/// `bytes` as text, or an error naming the first byte that is not UTF-8 by line, column and
/// byte offset in the file; `bytes` start on line `row`, at byte `offset` of the file.
fn decode_utf8<'a>(path: &Path, bytes: &'a [u8], row: usize, offset: usize) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| {
        let valid = e.valid_up_to();
        let line = row + bytes[..valid].iter().filter(|&&b| b == b'\n').count();
        let column = valid - bytes[..valid].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        anyhow!(
            "{}:{line}: byte 0x{:02X} at byte offset {} (line {line}, column {}) is not \
             valid UTF-8; text data files must be UTF-8, so convert it (e.g. `iconv -f latin1 \
             -t utf-8`)",
            path.display(),
            bytes.get(valid).copied().unwrap_or(0),
            offset + valid,
            column + 1
        )
    })
}

/// The lines of a file's `bytes` with their 1-based row, each decoded on its own (a leading BOM
/// and trailing `\r` removed).
fn lines<'a>(path: &'a Path, bytes: &'a [u8]) -> impl Iterator<Item = (usize, Result<&'a str>)> + 'a {
    let mut offset = 0;
    bytes.split(|&b| b == b'\n').enumerate().map(move |(i, line)| {
        let mut start = offset;
        offset += line.len() + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let line = match line.strip_prefix(BOM) {
            Some(rest) if i == 0 => {
                start += BOM.len();
                rest
            }
            _ => line,
        };
        (i + 1, decode_utf8(path, line, i + 1, start))
    })
}

/// One record per paragraph; a paragraph's row is the line it starts on. A paragraph with a
/// line that is not UTF-8 is a bad row.
fn read_paragraphs(path: &Path, bytes: &[u8]) -> Rows {
    let mut rows = Rows::default();
    let mut paragraph: Vec<&str> = Vec::new();
    let mut problem: Option<String> = None;
    let mut start = 0;
    let mut flush = |paragraph: &mut Vec<&str>, problem: &mut Option<String>, start: usize| {
        if let Some(problem) = problem.take() {
            rows.bad.push(problem);
        } else if !paragraph.is_empty() {
            let mut fields = Map::new();
            fields.insert("text".into(), Value::String(paragraph.join("\n")));
            rows.records.push(Record { file: path.to_path_buf(), row: start, fields });
        }
        paragraph.clear();
    };
    for (row, line) in lines(path, bytes) {
        match line {
            Ok(line) if line.trim().is_empty() => flush(&mut paragraph, &mut problem, start),
            line => {
                if paragraph.is_empty() && problem.is_none() {
                    start = row;
                }
                match line {
                    Ok(line) => paragraph.push(line),
                    Err(e) => {
                        problem.get_or_insert(e.to_string());
                    }
                }
            }
        }
    }
    flush(&mut paragraph, &mut problem, start);
    rows
}

/// One record per non-blank line. A line that is not a JSON object (or not UTF-8) is a bad row;
/// a first line of `{` alone is a pretty-printed document, which fails the file.
fn read_json_lines(path: &Path, bytes: &[u8]) -> Result<Rows> {
    let mut rows = Rows::default();
    for (row, line) in lines(path, bytes) {
        let line = match line {
            Ok(line) if line.trim().is_empty() => continue,
            Ok(line) => line,
            Err(e) => {
                rows.bad.push(e.to_string());
                continue;
            }
        };
        let value = match serde_json::from_str::<Value>(line) {
            Ok(value) => value,
            Err(e) => {
                let reason = format!(
                    "{}:{row}: line {row} is not valid JSON ({e}); each line must hold one JSON object",
                    path.display()
                );
                if rows.records.is_empty() && rows.bad.is_empty() && line.trim() == "{" {
                    bail!("{reason}; the file looks like one pretty-printed JSON document, so name it .json");
                }
                rows.bad.push(reason);
                continue;
            }
        };
        match into_object(path, row, value, "line", "") {
            Ok(fields) => rows.records.push(Record { file: path.to_path_buf(), row, fields }),
            Err(e) => rows.bad.push(e.to_string()),
        }
    }
    Ok(rows)
}

/// A document starting with `{`: one object (perhaps `{"data": [...]}`), else JSON Lines.
fn read_json_object_or_lines(path: &Path, bytes: &[u8]) -> Result<Rows> {
    let text = decode_utf8(path, bytes, 1, 0);
    let whole = match &text {
        Ok(text) => match serde_json::from_str::<Value>(text.strip_prefix('\u{FEFF}').unwrap_or(text)) {
            Ok(Value::Object(map)) => return one_object(path, map).map(Rows::from),
            Ok(other) => bail!(
                "{}:1: the file starts with `{{` but holds {}; expected JSON objects",
                path.display(),
                kind_name(&other)
            ),
            Err(whole) => Some(whole),
        },
        Err(_) => None,
    };
    // A .json document spread over lines whose first line does not parse on its own: the
    // whole-document error points at the real mistake.
    let first_line_bad = lines(path, bytes)
        .find(|(_, line)| line.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .is_some_and(|(_, line)| line.map_or(true, |l| serde_json::from_str::<Value>(l).is_err()));
    if first_line_bad && extension(path) == "json" {
        return Err(match (whole, text) {
            (Some(whole), _) => anyhow!(
                "{}:{}: not valid JSON ({whole}); the file must be an array of objects, an object \
                 holding one list of objects, or one JSON object per line",
                path.display(),
                whole.line()
            ),
            (None, text) => text.err().unwrap_or_else(|| anyhow!("{}: not valid JSON", path.display())),
        });
    }
    read_json_lines(path, bytes)
}

/// The records of a JSON object document: the items of its only key when that holds a list,
/// else the object itself as one record.
fn one_object(path: &Path, document: Map<String, Value>) -> Result<Vec<Record>> {
    let mut entries = document.into_iter();
    match (entries.next(), entries.next()) {
        (Some((key, Value::Array(items))), None) => read_json_values(path, items, Some(&key)),
        (first, second) => Ok(vec![Record {
            file: path.to_path_buf(),
            row: 1,
            fields: first.into_iter().chain(second).chain(entries).collect(),
        }]),
    }
}

fn read_json_array(path: &Path, text: &str, key: Option<&str>) -> Result<Vec<Record>> {
    let values: Vec<Value> = serde_json::from_str(text).map_err(|e| {
        anyhow!(
            "{}:{}: not a valid JSON array of objects ({e}); fix the JSON at that line",
            path.display(),
            e.line()
        )
    })?;
    read_json_values(path, values, key)
}

fn read_json_values(path: &Path, values: Vec<Value>, key: Option<&str>) -> Result<Vec<Record>> {
    let container = match key {
        Some(k) => format!(" of the `{k}` list"),
        None => " of the JSON array".to_string(),
    };
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            Ok(Record {
                file: path.to_path_buf(),
                row: i + 1,
                fields: into_object(path, i + 1, v, "element", &container)?,
            })
        })
        .collect()
}

/// The object `value`, or an error naming "{unit} {row}{container}" (e.g. "element 3 of the
/// JSON array").
fn into_object(
    path: &Path,
    row: usize,
    value: Value,
    unit: &str,
    container: &str,
) -> Result<Map<String, Value>> {
    match value {
        Value::Object(map) => Ok(map),
        other => bail!(
            "{}:{row}: {unit} {row}{container} is {}, not an object; every record must be a \
             JSON object such as {{\"text\": \"...\"}}",
            path.display(),
            kind_name(&other)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paragraphs_keep_lines_and_start_rows() {
        let r = read_paragraphs(Path::new("t.txt"), b"\n\na\r\nb\n \n\n\nc\n");
        let texts: Vec<(&str, usize)> =
            r.records.iter().map(|r| (r.fields["text"].as_str().unwrap(), r.row)).collect();
        assert_eq!(texts, [("a\nb", 3), ("c", 8)]);
        // A paragraph with a byte that is not UTF-8 is one bad row, named by its line.
        let r = read_paragraphs(Path::new("t.txt"), b"one\n\ntw\xE9\nthree\n\nfour\n");
        let texts: Vec<&str> = r.records.iter().map(|r| r.fields["text"].as_str().unwrap()).collect();
        assert_eq!(texts, ["one", "four"]);
        assert_eq!(r.bad.len(), 1);
        assert!(r.bad[0].starts_with("t.txt:3: byte 0xE9 at byte offset 7"), "{}", r.bad[0]);
    }
}
