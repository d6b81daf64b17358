//! Records from users' data files, in the layouts Hugging Face `datasets` users already have.
//!
//! A data path may be:
//! - a JSON Lines file (one object per line; `.jsonl`, `.ndjson`, or any file whose first
//!   non-blank character is `{` and which is not one JSON document);
//! - a JSON document: an array of objects, or an object with exactly ONE key whose value is an
//!   array of objects (`{"data": [...]}`, `{"train": [...]}`; the key's name does not matter).
//!   Any other single object is one record. In a `.jsonl` file every line is one record, even a
//!   line shaped like `{"data": [...]}`;
//! - a Parquet file (`PAR1` magic; uncompressed, snappy, zstd, gzip, brotli, lz4 or lz4_raw
//!   pages);
//! - an Arrow IPC stream (what `Dataset.save_to_disk` and the `datasets` cache write; starts with
//!   the continuation marker `0xFFFFFFFF`) or an Arrow IPC file / Feather v2 (`ARROW1` magic),
//!   uncompressed or with lz4_frame / zstd buffers;
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
//!
//! This file finds the files of a data path and tells their formats apart; `pattern` expands
//! wildcards, `text` reads JSON, JSON Lines and plain text, `arrow` Parquet and Arrow IPC, and
//! `saved` the directories `save_to_disk` writes.

mod arrow;
mod pattern;
mod saved;
mod text;

pub use pattern::expand_paths;

use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

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

/// The value at `column` of a record's fields: the field of that name, or, for a dotted path
/// such as `prompt.text` that is no field's name, field `text` of the object in field `prompt`
/// (any depth). Arrow structs are JSON objects once read, so the same path serves every format.
pub fn lookup<'a>(fields: &'a Map<String, Value>, column: &str) -> Option<&'a Value> {
    if let Some(value) = fields.get(column) {
        return Some(value);
    }
    // Try every split at a dot: a field name may itself hold dots (`a.b` in `{"a.b": {"c": ..}}`).
    column.match_indices('.').find_map(|(i, _)| match fields.get(&column[..i]) {
        Some(Value::Object(inner)) => lookup(inner, &column[i + 1..]),
        _ => None,
    })
}

impl Record {
    /// The value at `column`, a field name or a dotted path into nested objects ([`lookup`]).
    pub fn get(&self, column: &str) -> Option<&Value> {
        lookup(&self.fields, column)
    }
}

impl From<Vec<Record>> for Rows {
    fn from(records: Vec<Record>) -> Rows {
        Rows { records, bad: Vec::new() }
    }
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
    let paths = if path.exists() || !pattern::has_wildcard(path.as_os_str()) {
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
        return saved::read_directory(path, split);
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

pub(super) fn extension(path: &Path) -> String {
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
pub(super) fn read_file(path: &Path) -> Result<Rows> {
    let mut head = Vec::with_capacity(8);
    File::open(path).and_then(|f| f.take(8).read_to_end(&mut head)).map_err(|e| {
        anyhow!("cannot read data file {}: {e}; check the path and its permissions", path.display())
    })?;
    if head.is_empty() {
        bail!("data file {} is empty (0 bytes); it must hold at least one record", path.display());
    }
    match sniff(path, &head)? {
        Sniffed::Parquet => arrow::guarded(path, "Parquet", || arrow::read_parquet(path)).map(Rows::from),
        Sniffed::IpcFile => arrow::guarded(path, "Arrow IPC", || arrow::read_ipc_file(path)).map(Rows::from),
        Sniffed::IpcStream => {
            arrow::guarded(path, "Arrow IPC", || arrow::read_ipc_stream(path)).map(Rows::from)
        }
        Sniffed::Utf8 => text::read_text_like(path),
    }
}
