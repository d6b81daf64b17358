//! Records from users' data files, in the layouts Hugging Face `datasets` users already have.
//!
//! A data path may be:
//! - a JSON Lines file (one object per line; `.jsonl`, `.ndjson`, or any file whose first
//!   non-blank character is `{` and which is not one JSON document);
//! - a JSON document: an array of objects, or an object with exactly ONE key whose value is an
//!   array of objects (`{"data": [...]}`, `{"train": [...]}`; the key's name does not matter).
//!   Any other single object is one record. In a `.jsonl` file every line is one record, even a
//!   line shaped like `{"data": [...]}`;
//! - a Parquet file (`PAR1` magic; uncompressed, snappy or zstd pages);
//! - an Arrow IPC stream (what `Dataset.save_to_disk` and the `datasets` cache write; starts with
//!   the continuation marker `0xFFFFFFFF`) or an Arrow IPC file / Feather v2 (`ARROW1` magic);
//! - a `save_to_disk` directory: a `DatasetDict` (`dataset_dict.json` + one folder per split) or
//!   a single `Dataset` folder (`state.json` listing its `.arrow` shards in order);
//! - plain UTF-8 text (`.txt`, or anything that does not start with `{` or `[`): one record per
//!   paragraph (blank-line separated) in a `text` field;
//! - a pattern with `*` / `?` wildcards in any component, matching any of the above.
//!
//! The format is sniffed from the bytes (magic numbers, first non-blank character); the file
//! extension only breaks ties. Arrow values become JSON: strings, booleans and numbers as such,
//! lists as arrays, structs as objects, dictionary-encoded values as their decoded value, nulls
//! (and non-finite floats) as `null`. Types with no JSON form (binary, temporal, decimal, ...)
//! are an error naming the file and column.

use crate::files::kind_name;
use anyhow::{anyhow, bail, Result};
use arrow2::array::{
    Array, BooleanArray, DictionaryArray, DictionaryKey, FixedSizeListArray, ListArray, PrimitiveArray,
    StructArray, Utf8Array,
};
use arrow2::chunk::Chunk;
use arrow2::datatypes::{DataType, IntegerType, Schema};
use arrow2::offset::Offset;
use arrow2::types::{f16, NativeType};
use serde_json::{Map, Number, Value};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

/// One row of a data file, with where it came from for error messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The file the record was read from (a shard, for a directory or a pattern).
    pub file: PathBuf,
    /// 1-based position in `file`: the line (JSON Lines; for text, the paragraph's first line),
    /// the element (JSON array) or the row (Parquet, Arrow).
    pub row: usize,
    pub fields: Map<String, Value>,
}

/// The records of data files, and the rows that are not records: a JSON Lines line that is not
/// a JSON object, or a line or paragraph of a text file holding bytes that are not UTF-8.
/// `data.on_bad_row` decides what the unreadable rows do.
#[derive(Debug, Default)]
pub struct Rows {
    pub records: Vec<Record>,
    /// "file:row: what is wrong" for each unreadable row, in file order.
    pub bad: Vec<String>,
}

impl Rows {
    pub fn extend(&mut self, other: Rows) {
        self.records.extend(other.records);
        self.bad.extend(other.bad);
    }
}

impl From<Vec<Record>> for Rows {
    fn from(records: Vec<Record>) -> Rows {
        Rows { records, bad: Vec::new() }
    }
}

/// Reads every record of `path` (a file, a `save_to_disk` directory or a wildcard pattern);
/// for a `DatasetDict` the `train` split.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    read_split(path, "train")
}

/// Reads every record of `path`, taking split `split` of a `DatasetDict` directory, failing on
/// the first unreadable row. For a single `Dataset` folder or a file the split name is not used.
/// A pattern reads each match in sorted order and concatenates the records.
pub fn read_split(path: &Path, split: &str) -> Result<Vec<Record>> {
    let rows = read_rows(path, split)?;
    match rows.bad.into_iter().next() {
        Some(reason) => Err(anyhow!(reason)),
        None => Ok(rows.records),
    }
}

/// [`read_split`], collecting the unreadable rows in [`Rows::bad`] instead of failing on them.
/// A file that cannot be read as a whole (missing, corrupt, a broken JSON document) is still an
/// error.
pub fn read_rows(path: &Path, split: &str) -> Result<Rows> {
    let paths = if path.exists() || !has_wildcard(path.as_os_str()) {
        vec![path.to_path_buf()]
    } else {
        expand_paths(path)?
    };
    let mut rows = Rows::default();
    for p in &paths {
        rows.extend(read_one(p, split)?);
    }
    Ok(rows)
}

/// The paths matching `pattern`, sorted. `*` matches any run of characters and `?` one
/// character, within one path component (they never match `/`, nor a leading `.` unless the
/// pattern component starts with `.`). A path without wildcards must exist and is returned
/// as is. A pattern matching nothing is an error.
pub fn expand_paths(pattern: &Path) -> Result<Vec<PathBuf>> {
    if !has_wildcard(pattern.as_os_str()) {
        if pattern.exists() {
            return Ok(vec![pattern.to_path_buf()]);
        }
        bail!(
            "data path {} does not exist; check the path (relative paths start at the \
             directory lorafit runs in)",
            pattern.display()
        );
    }
    let mut current = vec![PathBuf::new()];
    for component in pattern.components() {
        match component {
            Component::Normal(name) if has_wildcard(name) => {
                let pat: Vec<char> = name.to_string_lossy().chars().collect();
                let mut next = Vec::new();
                for base in &current {
                    let dir = if base.as_os_str().is_empty() { Path::new(".") } else { base.as_path() };
                    let Ok(entries) = std::fs::read_dir(dir) else {
                        continue;
                    };
                    for entry in entries.flatten() {
                        let file_name = entry.file_name();
                        let name: Vec<char> = file_name.to_string_lossy().chars().collect();
                        if name.first() == Some(&'.') && pat.first() != Some(&'.') {
                            continue;
                        }
                        if wildcard_match(&pat, &name) {
                            next.push(base.join(&file_name));
                        }
                    }
                }
                current = next;
            }
            other => current.iter_mut().for_each(|p| p.push(other)),
        }
        if current.is_empty() {
            break;
        }
    }
    current.retain(|p| p.exists());
    current.sort();
    current.dedup();
    if current.is_empty() {
        bail!(
            "no file matches {}; `*` and `?` match within one path component, so check each \
             directory of the pattern",
            pattern.display()
        );
    }
    Ok(current)
}

fn has_wildcard(s: &std::ffi::OsStr) -> bool {
    s.to_string_lossy().contains(['*', '?'])
}

/// Whole-string match of `name` against `pat` (`*` = any run, `?` = any one character).
fn wildcard_match(pat: &[char], name: &[char]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pat.len() && (pat[p] == '?' || pat[p] == name[n]) {
            p += 1;
            n += 1;
        } else if p < pat.len() && pat[p] == '*' {
            star = Some((p, n));
            p += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == '*')
}

fn read_one(path: &Path, split: &str) -> Result<Rows> {
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            return anyhow!(
                "data path {} does not exist; check the path (relative paths start at the \
                 directory lorafit runs in)",
                path.display()
            );
        }
        anyhow!("cannot read data path {}: {e}; check the path and its permissions", path.display())
    })?;
    if meta.is_dir() {
        return read_directory(path, split);
    }
    let rows = read_file(path)?;
    if rows.records.is_empty() && rows.bad.is_empty() {
        bail!("data file {} holds no records; it must hold at least one row", path.display());
    }
    Ok(rows)
}

/// What the first bytes (and, for ties, the extension) say a file is.
enum Sniffed {
    Parquet,
    IpcFile,
    IpcStream,
    Utf8,
}

fn extension(path: &Path) -> String {
    path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default()
}

fn sniff(path: &Path, head: &[u8]) -> Result<Sniffed> {
    if head.starts_with(b"PAR1") {
        return Ok(Sniffed::Parquet);
    }
    if head.starts_with(b"ARROW1") {
        return Ok(Sniffed::IpcFile);
    }
    if head.starts_with(&[0xFF, 0xFF, 0xFF, 0xFF]) {
        return Ok(Sniffed::IpcStream);
    }
    if head.starts_with(&[0xFF, 0xFE]) || head.starts_with(&[0xFE, 0xFF]) {
        bail!(
            "data file {} is UTF-16 text; save it as UTF-8 (e.g. `iconv -f utf-16 -t utf-8`)",
            path.display()
        );
    }
    let compressed = [
        (&[0x1F, 0x8B][..], "gzip"),
        (&[0x28, 0xB5, 0x2F, 0xFD][..], "zstd"),
        (&b"PK\x03\x04"[..], "zip"),
        (&b"BZh"[..], "bzip2"),
        (&[0xFD, b'7', b'z', b'X', b'Z', 0x00][..], "xz"),
    ];
    if let Some((_, kind)) = compressed.iter().find(|(magic, _)| head.starts_with(magic)) {
        bail!(
            "data file {} is {kind}-compressed; decompress it first and point at the result",
            path.display()
        );
    }
    match extension(path).as_str() {
        "parquet" | "pq" => bail!(
            "data file {} is named like Parquet but does not start with the `PAR1` magic bytes; \
             it is corrupt or not Parquet (write it again, e.g. with `Dataset.to_parquet`)",
            path.display()
        ),
        "arrow" | "ipc" | "feather" | "arrows" => bail!(
            "data file {} is named like Arrow but is neither an Arrow IPC stream (starting with \
             0xFFFFFFFF) nor an Arrow IPC file (starting with `ARROW1`); it is corrupt or not \
             Arrow (write it again, e.g. with `Dataset.save_to_disk`)",
            path.display()
        ),
        _ => Ok(Sniffed::Utf8),
    }
}

/// Reads one file (not a directory); may return no records.
fn read_file(path: &Path) -> Result<Rows> {
    let mut head = Vec::with_capacity(8);
    File::open(path).and_then(|f| f.take(8).read_to_end(&mut head)).map_err(|e| {
        anyhow!("cannot read data file {}: {e}; check the path and its permissions", path.display())
    })?;
    if head.is_empty() {
        bail!("data file {} is empty (0 bytes); it must hold at least one record", path.display());
    }
    match sniff(path, &head)? {
        Sniffed::Parquet => guarded(path, "Parquet", || read_parquet(path)).map(Rows::from),
        Sniffed::IpcFile => guarded(path, "Arrow IPC", || read_ipc_file(path)).map(Rows::from),
        Sniffed::IpcStream => guarded(path, "Arrow IPC", || read_ipc_stream(path)).map(Rows::from),
        Sniffed::Utf8 => read_text_like(path),
    }
}

thread_local! {
    /// Set while this thread runs a [`guarded`] reader, whose panics become errors.
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs a reader of binary data, turning a panic of the Arrow/Parquet decoder on malformed
/// input into an error. The first call installs a panic hook that stays silent for panics
/// inside such a reader (they are reported as errors) and defers to the previous hook for
/// every other panic.
fn guarded(path: &Path, kind: &str, read: impl FnOnce() -> Result<Vec<Record>>) -> Result<Vec<Record>> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(std::cell::Cell::get) {
                previous(info)
            }
        }));
    });
    QUIET_PANICS.with(|q| q.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(read));
    QUIET_PANICS.with(|q| q.set(false));
    result.unwrap_or_else(|payload| {
        let detail = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "its contents are inconsistent".to_string());
        Err(anyhow!(
            "data file {} is a corrupt {kind} file (the decoder failed: {detail}); write it \
             again",
            path.display()
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// Text formats: JSON, JSON Lines, plain text.

const BOM: &[u8] = b"\xEF\xBB\xBF";

// JSON Lines and plain text are read line by line, so that a line (or paragraph) with bytes that
// are not UTF-8 is one bad row; a JSON document must be UTF-8 as a whole.
fn read_text_like(path: &Path) -> Result<Rows> {
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

// ---------------------------------------------------------------------------------------------
// Hugging Face `save_to_disk` directories.

fn read_json_file(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("cannot read {}: {e}; check the path and its permissions", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "{}:{}: not valid JSON ({e}); write the dataset again with `save_to_disk`",
            path.display(),
            e.line()
        )
    })
}

fn read_directory(dir: &Path, split: &str) -> Result<Rows> {
    let dict_file = dir.join("dataset_dict.json");
    if dict_file.is_file() {
        let dict = read_json_file(&dict_file)?;
        let splits: Vec<String> = dict
            .get("splits")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
            .ok_or_else(|| {
                anyhow!(
                    "{} has no `splits` list of names; write the dataset again with \
                     `DatasetDict.save_to_disk`",
                    dict_file.display()
                )
            })?;
        if !splits.iter().any(|s| s == split) {
            bail!(
                "dataset {} has no split `{split}`; the splits present are: {}; choose one of them",
                dir.display(),
                if splits.is_empty() { "(none)".to_string() } else { splits.join(", ") }
            );
        }
        let split_dir = dir.join(split);
        if !split_dir.join("state.json").is_file() {
            bail!(
                "dataset {} lists split `{split}` but {} holds no state.json; the directory is \
                 incomplete, so write it again with `save_to_disk`",
                dir.display(),
                split_dir.display()
            );
        }
        return read_dataset_folder(&split_dir);
    }
    if dir.join("state.json").is_file() {
        return read_dataset_folder(dir);
    }
    let mut hint = String::new();
    if let Some(example) = find_data_file(dir, 3) {
        let ext = extension(&example);
        let parent = example.parent().unwrap_or(dir);
        hint = format!(
            "; to read its files point at them with a pattern such as {}",
            parent.join(format!("*.{ext}")).display()
        );
    }
    bail!(
        "directory {} is neither a Hugging Face DatasetDict (no dataset_dict.json) nor a Dataset \
         saved with `save_to_disk` (no state.json){hint}",
        dir.display()
    )
}

/// A data-looking file within `depth` levels of `dir`, to suggest a pattern.
fn find_data_file(dir: &Path, depth: usize) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).collect();
    entries.sort();
    let data_ext = ["parquet", "arrow", "jsonl", "json", "txt"];
    if let Some(file) = entries.iter().find(|p| p.is_file() && data_ext.contains(&extension(p).as_str())) {
        return Some(file.clone());
    }
    if depth == 0 {
        return None;
    }
    entries.iter().filter(|p| p.is_dir()).find_map(|p| find_data_file(p, depth - 1))
}

/// A `Dataset.save_to_disk` folder: `state.json` names the Arrow shards in order.
fn read_dataset_folder(dir: &Path) -> Result<Rows> {
    let state_file = dir.join("state.json");
    let state = read_json_file(&state_file)?;
    let files: Vec<&str> = state
        .get("_data_files")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|f| f.get("filename").and_then(Value::as_str)).collect::<Option<Vec<_>>>())
        .ok_or_else(|| {
            anyhow!(
                "{} has no `_data_files` list of {{\"filename\": ...}}; write the dataset again \
                 with `save_to_disk`",
                state_file.display()
            )
        })?;
    let mut rows = Rows::default();
    for name in files {
        let file = dir.join(name);
        if !file.is_file() {
            bail!(
                "{} lists {name} but {} does not exist; the dataset is incomplete, so write it \
                 again with `save_to_disk`",
                state_file.display(),
                file.display()
            );
        }
        rows.extend(read_file(&file)?);
    }
    if rows.records.is_empty() && rows.bad.is_empty() {
        bail!("dataset {} holds no rows; it must hold at least one", dir.display());
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// Parquet and Arrow IPC.

fn open(path: &Path) -> Result<BufReader<File>> {
    File::open(path).map(BufReader::new).map_err(|e| {
        anyhow!("cannot read data file {}: {e}; check the path and its permissions", path.display())
    })
}

fn corrupt(path: &Path, kind: &str, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!(
        "data file {} is not readable as {kind} ({e}); it is corrupt or truncated, so write it \
         again",
        path.display()
    )
}

fn read_parquet(path: &Path) -> Result<Vec<Record>> {
    use arrow2::io::parquet::read;
    let mut reader = open(path)?;
    let metadata = read::read_metadata(&mut reader).map_err(|e| corrupt(path, "a Parquet file", e))?;
    let schema = read::infer_schema(&metadata).map_err(|e| corrupt(path, "a Parquet file", e))?;
    let expected = metadata.num_rows;
    let chunks = read::FileReader::new(reader, metadata.row_groups, schema.clone(), None, None, None);
    let mut records = Vec::new();
    for chunk in chunks {
        let chunk = chunk.map_err(|e| corrupt(path, "a Parquet file", e))?;
        append_chunk(path, &schema, &chunk, &mut records)?;
    }
    if records.len() != expected {
        return Err(corrupt(
            path,
            "a Parquet file",
            format!("its footer promises {expected} rows, its pages hold {}", records.len()),
        ));
    }
    Ok(records)
}

fn read_ipc_file(path: &Path) -> Result<Vec<Record>> {
    use arrow2::io::ipc::read;
    let mut reader = open(path)?;
    let metadata =
        read::read_file_metadata(&mut reader).map_err(|e| corrupt(path, "an Arrow IPC file", e))?;
    let schema = metadata.schema.clone();
    let mut records = Vec::new();
    for chunk in read::FileReader::new(reader, metadata, None, None) {
        let chunk = chunk.map_err(|e| corrupt(path, "an Arrow IPC file", e))?;
        append_chunk(path, &schema, &chunk, &mut records)?;
    }
    Ok(records)
}

fn read_ipc_stream(path: &Path) -> Result<Vec<Record>> {
    use arrow2::io::ipc::read;
    let mut reader = open(path)?;
    let metadata =
        read::read_stream_metadata(&mut reader).map_err(|e| corrupt(path, "an Arrow IPC stream", e))?;
    let schema = metadata.schema.clone();
    let mut records = Vec::new();
    for state in read::StreamReader::new(reader, metadata, None) {
        match state.map_err(|e| corrupt(path, "an Arrow IPC stream", e))? {
            read::StreamState::Some(chunk) => append_chunk(path, &schema, &chunk, &mut records)?,
            // The file ended without the end-of-stream marker, which the format allows.
            read::StreamState::Waiting => break,
        }
    }
    Ok(records)
}

/// Appends one record per row of `chunk`, numbering rows on from those already read.
fn append_chunk(
    path: &Path,
    schema: &Schema,
    chunk: &Chunk<Box<dyn Array>>,
    records: &mut Vec<Record>,
) -> Result<()> {
    let mut columns = Vec::with_capacity(chunk.arrays().len());
    for (field, array) in schema.fields.iter().zip(chunk.arrays()) {
        let values = to_values(array.as_ref(), &field.name)
            .map_err(|e| anyhow!("data file {}: {e}", path.display()))?;
        columns.push((field.name.as_str(), values));
    }
    for i in 0..chunk.len() {
        let mut fields = Map::new();
        for (name, values) in columns.iter_mut() {
            let value = values.get_mut(i).map(std::mem::take).unwrap_or(Value::Null);
            fields.insert((*name).to_string(), value);
        }
        let row = records.len() + 1;
        records.push(Record { file: path.to_path_buf(), row, fields });
    }
    Ok(())
}

/// The JSON value of every slot of `array`; `column` names it (with `[]` / `.field` for nested
/// values) in errors.
fn to_values(array: &dyn Array, column: &str) -> std::result::Result<Vec<Value>, String> {
    use DataType as D;
    let values = match array.data_type().to_logical_type() {
        D::Null => vec![Value::Null; array.len()],
        D::Boolean => downcast::<BooleanArray>(array, column)?
            .iter()
            .map(|v| v.map_or(Value::Null, Value::Bool))
            .collect(),
        D::Int8 => primitive::<i8>(array, column, Value::from)?,
        D::Int16 => primitive::<i16>(array, column, Value::from)?,
        D::Int32 => primitive::<i32>(array, column, Value::from)?,
        D::Int64 => primitive::<i64>(array, column, Value::from)?,
        D::UInt8 => primitive::<u8>(array, column, Value::from)?,
        D::UInt16 => primitive::<u16>(array, column, Value::from)?,
        D::UInt32 => primitive::<u32>(array, column, Value::from)?,
        D::UInt64 => primitive::<u64>(array, column, Value::from)?,
        D::Float16 => primitive::<f16>(array, column, |v| float(v.to_f32().into()))?,
        D::Float32 => primitive::<f32>(array, column, |v| float(v.into()))?,
        D::Float64 => primitive::<f64>(array, column, float)?,
        D::Utf8 => strings::<i32>(array, column)?,
        D::LargeUtf8 => strings::<i64>(array, column)?,
        D::List(_) => list::<i32>(array, column)?,
        D::LargeList(_) => list::<i64>(array, column)?,
        D::FixedSizeList(_, _) => fixed_size_list(array, column)?,
        D::Struct(_) => structs(array, column)?,
        D::Dictionary(key, _, _) => match key {
            IntegerType::Int8 => dictionary::<i8>(array, column)?,
            IntegerType::Int16 => dictionary::<i16>(array, column)?,
            IntegerType::Int32 => dictionary::<i32>(array, column)?,
            IntegerType::Int64 => dictionary::<i64>(array, column)?,
            IntegerType::UInt8 => dictionary::<u8>(array, column)?,
            IntegerType::UInt16 => dictionary::<u16>(array, column)?,
            IntegerType::UInt32 => dictionary::<u32>(array, column)?,
            IntegerType::UInt64 => dictionary::<u64>(array, column)?,
        },
        other => {
            return Err(format!(
                "column `{column}` has Arrow type {other:?}, which has no JSON form lorafit can \
                 use; drop or convert that column before saving (e.g. `dataset.remove_columns` \
                 or `dataset.cast_column` to a string)"
            ))
        }
    };
    if values.len() != array.len() {
        return Err(format!(
            "column `{column}` is inconsistent ({} values for {} rows); the file is corrupt, so \
             write it again",
            values.len(),
            array.len()
        ));
    }
    Ok(values)
}

fn downcast<'a, A: 'static>(array: &'a dyn Array, column: &str) -> std::result::Result<&'a A, String> {
    array.as_any().downcast_ref::<A>().ok_or_else(|| {
        format!(
            "column `{column}` holds an unexpected array for its type {:?}; the file is corrupt",
            array.data_type()
        )
    })
}

fn float(v: f64) -> Value {
    Number::from_f64(v).map_or(Value::Null, Value::Number)
}

fn primitive<T: NativeType>(
    array: &dyn Array,
    column: &str,
    convert: impl Fn(T) -> Value,
) -> std::result::Result<Vec<Value>, String> {
    Ok(downcast::<PrimitiveArray<T>>(array, column)?
        .iter()
        .map(|v| v.map_or(Value::Null, |v| convert(*v)))
        .collect())
}

fn strings<O: Offset>(array: &dyn Array, column: &str) -> std::result::Result<Vec<Value>, String> {
    Ok(downcast::<Utf8Array<O>>(array, column)?
        .iter()
        .map(|v| v.map_or(Value::Null, |s| Value::String(s.to_string())))
        .collect())
}

fn list<O: Offset>(array: &dyn Array, column: &str) -> std::result::Result<Vec<Value>, String> {
    let list = downcast::<ListArray<O>>(array, column)?;
    let mut items = to_values(list.values().as_ref(), &format!("{column}[]"))?;
    let offsets = list.offsets();
    let mut out = Vec::with_capacity(list.len());
    for i in 0..list.len() {
        if list.is_null(i) || i >= offsets.len_proxy() {
            out.push(Value::Null);
            continue;
        }
        let (start, end) = offsets.start_end(i);
        let slice = items.get_mut(start..end).ok_or_else(|| {
            format!("column `{column}` has list offsets past its values; the file is corrupt")
        })?;
        out.push(Value::Array(slice.iter_mut().map(std::mem::take).collect()));
    }
    Ok(out)
}

fn fixed_size_list(array: &dyn Array, column: &str) -> std::result::Result<Vec<Value>, String> {
    let list = downcast::<FixedSizeListArray>(array, column)?;
    let size = list.size();
    let mut items = to_values(list.values().as_ref(), &format!("{column}[]"))?;
    let mut out = Vec::with_capacity(list.len());
    for i in 0..list.len() {
        if list.is_null(i) {
            out.push(Value::Null);
            continue;
        }
        let slice = items.get_mut(i * size..(i + 1) * size).ok_or_else(|| {
            format!("column `{column}` has fewer values than its rows need; the file is corrupt")
        })?;
        out.push(Value::Array(slice.iter_mut().map(std::mem::take).collect()));
    }
    Ok(out)
}

fn structs(array: &dyn Array, column: &str) -> std::result::Result<Vec<Value>, String> {
    let array = downcast::<StructArray>(array, column)?;
    let mut children = Vec::with_capacity(array.fields().len());
    for (field, child) in array.fields().iter().zip(array.values()) {
        let values = to_values(child.as_ref(), &format!("{column}.{}", field.name))?;
        children.push((field.name.as_str(), values));
    }
    let mut out = Vec::with_capacity(array.len());
    for i in 0..array.len() {
        if array.is_null(i) {
            out.push(Value::Null);
            continue;
        }
        let mut object = Map::new();
        for (name, values) in children.iter_mut() {
            let value = values.get_mut(i).map(std::mem::take).unwrap_or(Value::Null);
            object.insert((*name).to_string(), value);
        }
        out.push(Value::Object(object));
    }
    Ok(out)
}

fn dictionary<K: DictionaryKey>(array: &dyn Array, column: &str) -> std::result::Result<Vec<Value>, String> {
    let array = downcast::<DictionaryArray<K>>(array, column)?;
    let values = to_values(array.values().as_ref(), column)?;
    array
        .keys()
        .iter()
        .map(|key| match key {
            None => Ok(Value::Null),
            Some(key) => {
                (*key).try_into().ok().and_then(|k: usize| values.get(k).cloned()).ok_or_else(|| {
                    format!("column `{column}` has a dictionary key out of range; the file is corrupt")
                })
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, n: &str) -> bool {
        let p: Vec<char> = p.chars().collect();
        let n: Vec<char> = n.chars().collect();
        wildcard_match(&p, &n)
    }

    #[test]
    fn wildcards_match_whole_names() {
        assert!(m("*.jsonl", "a.jsonl"));
        assert!(m("*", "anything"));
        assert!(m("train-?????-of-*.parquet", "train-00000-of-00002.parquet"));
        assert!(m("a*b*c", "abbbc"));
        assert!(m("a*b*c", "axxbyyc"));
        assert!(!m("a*b*c", "axxbyy"));
        assert!(!m("*.json", "a.jsonl"));
        assert!(!m("?", ""));
        assert!(m("", ""));
        assert!(m("**", ""));
        assert!(m("x?z", "xéz"));
    }

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

    #[test]
    fn arrow_values_become_json() {
        use arrow2::array::{Int32Array, MutableDictionaryArray, MutableUtf8Array, TryExtend};
        let ints = Int32Array::from([Some(1), None, Some(3)]);
        assert_eq!(to_values(&ints, "n").unwrap(), [Value::from(1), Value::Null, Value::from(3)]);
        let mut dict = MutableDictionaryArray::<i32, MutableUtf8Array<i32>>::new();
        dict.try_extend([Some("a"), None, Some("a"), Some("b")]).unwrap();
        let dict: DictionaryArray<i32> = dict.into();
        assert_eq!(
            to_values(&dict, "d").unwrap(),
            [Value::from("a"), Value::Null, Value::from("a"), Value::from("b")]
        );
        let floats = PrimitiveArray::<f64>::from([Some(0.5), Some(f64::NAN)]);
        assert_eq!(to_values(&floats, "f").unwrap(), [Value::from(0.5), Value::Null]);
        let binary = arrow2::array::BinaryArray::<i32>::from_slice([b"x"]);
        let err = to_values(&binary, "img").unwrap_err();
        assert!(err.contains("`img`") && err.contains("Binary"), "{err}");
    }
}
