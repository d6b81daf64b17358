//! A TensorBoard event-file writer: scalars and text summaries.
//!
//! Decision: this is a small in-house writer, not the `tensorboard-rs` crate. `tensorboard-rs`
//! 0.5.9 writes valid scalars, but its `SummaryWriter::add_text` is `unimplemented!()` (it panics),
//! `add_scalar` stamps its own wall time and takes no caller's one, write errors are not
//! returned, and it pulls in `image` 0.23 and `protobuf` 2.28 (RUSTSEC-2024-0437). The file
//! format needs far less than that: TFRecord framing plus a handful of hand-encoded protobuf
//! fields, with no new dependencies.
//!
//! File format. An event file is a sequence of TFRecords, each
//! `u64 length | u32 masked_crc32c(length) | data | u32 masked_crc32c(data)` (little endian),
//! where `data` is a serialized `tensorflow.Event`. The first event carries
//! `file_version = "brain.Event:2"`. The messages and fields written here:
//!
//! ```text
//! Event           { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;
//!                   SessionLog session_log = 7; }
//! SessionLog      { SessionStatus status = 1; }   (START = 1)
//! Summary         { repeated Value value = 1; }
//! Summary.Value   { string tag = 1; float simple_value = 2; TensorProto tensor = 8;
//!                   SummaryMetadata metadata = 9; }
//! SummaryMetadata { PluginData plugin_data = 1; }
//! PluginData      { string plugin_name = 1; bytes content = 2; }
//! TensorProto     { DataType dtype = 1; TensorShapeProto tensor_shape = 2; repeated bytes string_val = 8; }
//! ```
//!
//! A scalar is a `Value` with `simple_value`. A text summary (TensorBoard's Text tab) is a
//! `Value` whose metadata names the `text` plugin, holding a rank-0 `DT_STRING` tensor, as
//! `tf.summary.text` writes it; the text is rendered as Markdown.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The `file_version` of the first event in every file.
pub const FILE_VERSION: &str = "brain.Event:2";

/// The prefix TensorBoard looks for (it loads every file whose name contains `tfevents`).
pub const FILE_PREFIX: &str = "events.out.tfevents.";

/// `tensorflow.DataType.DT_STRING`.
const DT_STRING: u64 = 7;

/// `tensorflow.SessionLog.SessionStatus.START`.
const SESSION_START: u64 = 1;

/// Appends events to one new event file in a directory.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it, named as TensorBoard's own writers do:
    /// `events.out.tfevents.<unix secs>.<hostname>.<pid>.<n>`, where `n` is 0 unless a file of
    /// that name already exists. The `file_version` event is written and flushed at once.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let wall_time = unix_time();
        let stem = format!("{FILE_PREFIX}{:010}.{}.{}", wall_time as u64, hostname(), std::process::id());
        let mut n = 0u32;
        let (file, path) = loop {
            let path = dir.join(format!("{stem}.{n}"));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => break (file, path),
                Err(e) if e.kind() == ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
            }
        };
        let mut writer = EventWriter { out: BufWriter::new(file), path };
        let mut event = Vec::new();
        put_f64(&mut event, 1, wall_time);
        put_bytes(&mut event, 3, FILE_VERSION.as_bytes());
        writer.write_record(&event)?;
        writer.flush()?;
        Ok(writer)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tells readers that the run restarts at `step`: TensorBoard's reader then drops every event
    /// at `step` or later read so far (points an earlier process logged after its last checkpoint),
    /// so a resumed run shows one point per step. Written as PyTorch's
    /// `SummaryWriter(purge_step=step)` does: an event with `file_version` and one with
    /// `SessionLog.START`, both at `step`.
    pub fn purge_from(&mut self, step: i64) -> Result<()> {
        let wall_time = unix_time();
        let mut version = Vec::new();
        put_f64(&mut version, 1, wall_time);
        put_varint_field(&mut version, 2, step as u64);
        put_bytes(&mut version, 3, FILE_VERSION.as_bytes());
        self.write_record(&version)?;
        let mut session_log = Vec::new();
        put_varint_field(&mut session_log, 1, SESSION_START);
        let mut start = Vec::new();
        put_f64(&mut start, 1, wall_time);
        put_varint_field(&mut start, 2, step as u64);
        put_bytes(&mut start, 7, &session_log);
        self.write_record(&start)?;
        self.flush()
    }

    /// One scalar under `tag` at `step`.
    pub fn add_scalar(&mut self, tag: &str, value: f32, step: i64, wall_time: f64) -> Result<()> {
        self.add_scalars(&[(tag, value)], step, wall_time)
    }

    /// Several scalars at the same `step`, in one event. Does nothing for an empty slice.
    pub fn add_scalars(&mut self, values: &[(&str, f32)], step: i64, wall_time: f64) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let mut summary = Vec::new();
        for &(tag, value) in values {
            let mut v = Vec::new();
            put_bytes(&mut v, 1, tag.as_bytes());
            put_f32(&mut v, 2, value);
            put_bytes(&mut summary, 1, &v);
        }
        self.write_summary(&summary, step, wall_time)
    }

    /// A text summary under `tag` at `step`, shown (as Markdown) in TensorBoard's Text tab.
    pub fn add_text(&mut self, tag: &str, text: &str, step: i64) -> Result<()> {
        let mut tensor = Vec::new();
        put_varint_field(&mut tensor, 1, DT_STRING);
        put_bytes(&mut tensor, 2, &[]); // a shape with no dimensions: a scalar
        put_bytes(&mut tensor, 8, text.as_bytes());
        let mut v = Vec::new();
        put_bytes(&mut v, 1, tag.as_bytes());
        put_bytes(&mut v, 8, &tensor);
        put_bytes(&mut v, 9, &plugin_metadata("text", &[]));
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &v);
        self.write_summary(&summary, step, unix_time())
    }

    /// A summary under `tag` at `step` that holds no value, only `content` for the plugin
    /// `plugin_name` (how the HParams plugin's summaries are written, see [`super::hparams`]).
    pub fn add_plugin_content(
        &mut self,
        tag: &str,
        plugin_name: &str,
        content: &[u8],
        step: i64,
    ) -> Result<()> {
        let mut v = Vec::new();
        put_bytes(&mut v, 1, tag.as_bytes());
        put_bytes(&mut v, 9, &plugin_metadata(plugin_name, content));
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &v);
        self.write_summary(&summary, step, unix_time())
    }

    /// Hands everything written so far to the operating system.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().with_context(|| format!("cannot write {}", self.path.display()))
    }

    fn write_summary(&mut self, summary: &[u8], step: i64, wall_time: f64) -> Result<()> {
        let mut event = Vec::with_capacity(summary.len() + 24);
        put_f64(&mut event, 1, wall_time);
        put_varint_field(&mut event, 2, step as u64);
        put_bytes(&mut event, 5, summary);
        self.write_record(&event)
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        if data.len() > u32::MAX as usize {
            bail!("an event of {} bytes is too large", data.len());
        }
        let record = tfrecord(data);
        self.out.write_all(&record).with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// `SummaryMetadata` naming `plugin_name`, with its `content` when there is any.
fn plugin_metadata(plugin_name: &str, content: &[u8]) -> Vec<u8> {
    let mut plugin_data = Vec::new();
    put_bytes(&mut plugin_data, 1, plugin_name.as_bytes());
    if !content.is_empty() {
        put_bytes(&mut plugin_data, 2, content);
    }
    let mut metadata = Vec::new();
    put_bytes(&mut metadata, 1, &plugin_data);
    metadata
}

/// Seconds since the Unix epoch, as event wall times are stored.
pub fn unix_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// One TFRecord holding `data`: length, masked CRC of the length, data, masked CRC of the data.
pub fn tfrecord(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(data.len() + 16);
    record.extend_from_slice(&len);
    record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    record.extend_from_slice(data);
    record.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    record
}

/// CRC-32C (Castagnoli), the checksum TFRecords use.
pub fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |crc, &b| CRC32C_TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8))
}

/// The CRC-32C of `data`, rotated and offset as TFRecords store it.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Byte-at-a-time table for the reflected Castagnoli polynomial 0x82F63B78.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

// Protobuf wire format: a key is `field << 3 | wire type` (0 varint, 1 fixed64, 2 length-delimited,
// 5 fixed32), followed by the value.

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

pub(super) fn put_varint_field(buf: &mut Vec<u8>, field: u64, v: u64) {
    put_varint(buf, field << 3);
    put_varint(buf, v);
}

pub(super) fn put_f64(buf: &mut Vec<u8>, field: u64, v: f64) {
    put_varint(buf, field << 3 | 1);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_f32(buf: &mut Vec<u8>, field: u64, v: f32) {
    put_varint(buf, field << 3 | 5);
    buf.extend_from_slice(&v.to_le_bytes());
}

pub(super) fn put_bytes(buf: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(buf, field << 3 | 2);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// This machine's name for event file names, with anything but `[A-Za-z0-9._-]` replaced.
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string());
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vectors() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn tfrecord_framing() {
        let record = tfrecord(b"abc");
        assert_eq!(record.len(), 8 + 4 + 3 + 4);
        assert_eq!(&record[..8], &3u64.to_le_bytes());
        assert_eq!(&record[8..12], &masked_crc32c(&3u64.to_le_bytes()).to_le_bytes());
        assert_eq!(&record[12..15], b"abc");
        let crc = u32::from_le_bytes(record[15..].try_into().unwrap());
        assert_eq!(crc, crc32c(b"abc").rotate_right(15).wrapping_add(0xa282_ead8));
    }

    #[test]
    fn protobuf_encoding() {
        let mut buf = Vec::new();
        put_varint(&mut buf, 300);
        assert_eq!(buf, [0xac, 0x02]);
        buf.clear();
        put_varint_field(&mut buf, 2, -1i64 as u64);
        assert_eq!(buf.len(), 1 + 10, "a negative int64 takes ten varint bytes");
        buf.clear();
        put_f32(&mut buf, 2, 1.0);
        assert_eq!(buf, [0x15, 0x00, 0x00, 0x80, 0x3f]);
        buf.clear();
        put_bytes(&mut buf, 9, b"hi");
        assert_eq!(buf, [0x4a, 2, b'h', b'i']);
    }

    #[test]
    fn files_in_one_second_get_distinct_names() {
        let dir = tempfile::tempdir().unwrap();
        let a = EventWriter::create(dir.path()).unwrap();
        let b = EventWriter::create(dir.path()).unwrap();
        assert_ne!(a.path(), b.path());
        for w in [&a, &b] {
            let name = w.path().file_name().unwrap().to_str().unwrap();
            assert!(name.starts_with(FILE_PREFIX), "{name}");
            assert!(name.contains(&format!(".{}.", std::process::id())), "{name}");
        }
        // The file_version record is on disk before anything else is written.
        let bytes = std::fs::read(a.path()).unwrap();
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(bytes.len(), 8 + 4 + len + 4);
        assert!(bytes[12..12 + len].windows(FILE_VERSION.len()).any(|w| w == FILE_VERSION.as_bytes()));
    }
}
