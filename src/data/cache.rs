//! Prepared (tokenized) data cached on disk, so a second run over the same files, tokenizer and
//! data settings starts without re-tokenizing. The key hashes all of those inputs; any change
//! gives a new key, so a stale entry is never read.

use super::format::{Example, Examples, Prepared};
use super::source::expand_paths;
use crate::config::Config;
use crate::files::write_atomic;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Starts every cache file; changes with the file's layout (02: notes on the data; 03: each
/// example's desirable flag).
const MAGIC: &[u8; 8] = b"LFDATA03";

/// The version of the way examples are prepared, part of every cache key: bumped whenever the
/// same inputs would tokenize or label differently, so entries from before are never read.
/// 2: each example's whole text tokenized once, labels from byte offsets. 3: tool calls in chats
/// are trained.
pub const FORMAT_VERSION: &[u8] = b"lorafit-prepared-examples-3";

/// A 128-bit FNV-1a digest of everything the prepared data depends on.
#[derive(Clone)]
pub struct CacheKey {
    state: [u64; 2],
}

impl Default for CacheKey {
    fn default() -> Self {
        CacheKey { state: [0xcbf2_9ce4_8422_2325, 0x6c62_272e_07bb_0142] }
    }
}

impl CacheKey {
    pub fn add_bytes(&mut self, bytes: &[u8]) -> &mut Self {
        // Length first, so that concatenations of different parts never collide.
        for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            for (i, s) in self.state.iter_mut().enumerate() {
                *s ^= u64::from(*b) + i as u64;
                *s = s.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        self
    }

    /// Adds a file's contents, or every file under a directory (sorted by path).
    pub fn add_path(&mut self, path: &Path) -> Result<&mut Self> {
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<_>>()?;
            entries.sort();
            for entry in entries {
                self.add_bytes(entry.file_name().unwrap_or_default().as_encoded_bytes());
                self.add_path(&entry)?;
            }
        } else {
            let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            self.add_bytes(&bytes);
        }
        Ok(self)
    }

    pub fn hex(&self) -> String {
        format!("{:016x}{:016x}", self.state[0], self.state[1])
    }
}

/// The key of the data `cfg` prepares with a tokenizer whose EOS id is `eos_id` and, for chat
/// data, the chat template `chat_template`: every setting and file the examples depend on.
pub fn key_for(cfg: &Config, eos_id: i64, chat_template: Option<&str>) -> Result<CacheKey> {
    let mut key = CacheKey::default();
    key.add_bytes(FORMAT_VERSION)
        .add_bytes(serde_yaml::to_string(&cfg.data)?.as_bytes())
        .add_bytes(&cfg.train.seed.to_le_bytes())
        .add_bytes(&eos_id.to_le_bytes())
        .add_bytes(chat_template.unwrap_or("").as_bytes());
    // Preference objectives read the same files as pairs (KTO: as unpaired answers); SFT keys
    // stay as they were.
    match Examples::of(cfg.train.objective) {
        Examples::Single => {}
        Examples::Pairs => {
            key.add_bytes(b"pairs");
        }
        Examples::Unpaired => {
            key.add_bytes(b"unpaired");
        }
    }
    key.add_path(&cfg.model.path.join("tokenizer.json"))?;
    for pattern in cfg.data.train.paths().into_iter().chain(cfg.data.validation.as_deref()) {
        for path in expand_paths(pattern)? {
            key.add_path(&path)?;
        }
    }
    Ok(key)
}

/// The cache file for `key` in `dir`.
pub fn entry(dir: &Path, key: &CacheKey) -> PathBuf {
    dir.join(format!("data-{}.bin", key.hex()))
}

/// Writes the training and validation sets.
pub fn store(path: &Path, train: &Prepared, validation: Option<&Prepared>) -> Result<()> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    write_prepared(&mut out, train);
    match validation {
        Some(v) => {
            out.push(1);
            write_prepared(&mut out, v);
        }
        None => out.push(0),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    write_atomic(path, &out)
}

/// Reads what [`store`] wrote; `None` when there is no entry or it cannot be read (it is then
/// rebuilt).
pub fn load(path: &Path) -> Option<(Prepared, Option<Prepared>)> {
    let bytes = std::fs::read(path).ok()?;
    let mut r = Reader { bytes: &bytes, pos: 0 };
    (|| -> Result<_> {
        if r.take(MAGIC.len())? != MAGIC {
            bail!("not a data cache file");
        }
        let train = r.prepared()?;
        let validation = if r.take(1)?[0] == 1 { Some(r.prepared()?) } else { None };
        Ok((train, validation))
    })()
    .ok()
}

fn write_prepared(out: &mut Vec<u8>, p: &Prepared) {
    let mut u64s =
        |values: &[usize]| values.iter().for_each(|v| out.extend_from_slice(&(*v as u64).to_le_bytes()));
    u64s(&[p.truncated, p.skipped_too_long, p.dropped_no_labels, p.skipped_bad_rows, p.examples.len()]);
    for e in &p.examples {
        out.extend_from_slice(&(e.input_ids.len() as u64).to_le_bytes());
        for &v in e.input_ids.iter().chain(&e.labels) {
            out.extend_from_slice(&(v as i32).to_le_bytes());
        }
        out.push(match e.desirable {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        });
    }
    for list in [&p.bad_row_samples, &p.notes] {
        out.extend_from_slice(&(list.len() as u64).to_le_bytes());
        for s in list {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else { bail!("truncated data cache file") };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u64(&mut self) -> Result<usize> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?) as usize)
    }

    fn i32s(&mut self, n: usize) -> Result<Vec<i64>> {
        Ok(self
            .take(n * 4)?
            .chunks_exact(4)
            .map(|c| i64::from(i32::from_le_bytes(c.try_into().unwrap())))
            .collect())
    }

    fn prepared(&mut self) -> Result<Prepared> {
        let (truncated, skipped_too_long, dropped_no_labels, skipped_bad_rows) =
            (self.u64()?, self.u64()?, self.u64()?, self.u64()?);
        let n = self.u64()?;
        let mut examples = Vec::with_capacity(n.min(1 << 24));
        for _ in 0..n {
            let len = self.u64()?;
            let (input_ids, labels) = (self.i32s(len)?, self.i32s(len)?);
            let desirable = match self.take(1)?[0] {
                0 => None,
                1 => Some(false),
                2 => Some(true),
                other => bail!("bad desirable flag {other}"),
            };
            examples.push(Example { input_ids, labels, desirable });
        }
        let bad_row_samples = self.strings()?;
        let notes = self.strings()?;
        Ok(Prepared {
            examples,
            truncated,
            skipped_too_long,
            dropped_no_labels,
            skipped_bad_rows,
            bad_row_samples,
            notes,
        })
    }

    fn strings(&mut self) -> Result<Vec<String>> {
        let n = self.u64()?;
        let mut out = Vec::new();
        for _ in 0..n {
            let len = self.u64()?;
            out.push(String::from_utf8(self.take(len)?.to_vec())?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::format::IGNORE;

    #[test]
    fn round_trips_and_rejects_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let train = Prepared {
            examples: vec![
                Example { input_ids: vec![1, 70000, 2], labels: vec![IGNORE, 70000, 2], desirable: None },
                Example { input_ids: vec![1, 3], labels: vec![IGNORE, 3], desirable: Some(false) },
                Example { input_ids: vec![1, 4], labels: vec![IGNORE, 4], desirable: Some(true) },
            ],
            truncated: 3,
            skipped_bad_rows: 1,
            bad_row_samples: vec!["a.jsonl:4: bad".into()],
            notes: vec!["columns not used: id".into()],
            ..Prepared::default()
        };
        let val = Prepared {
            examples: vec![Example { input_ids: vec![5], labels: vec![5], desirable: None }],
            ..Prepared::default()
        };
        let path = tmp.path().join("c.bin");
        store(&path, &train, Some(&val)).unwrap();
        let (t, v) = load(&path).unwrap();
        assert_eq!(t.examples, train.examples);
        assert_eq!(
            (t.truncated, t.skipped_bad_rows, t.bad_row_samples.clone(), t.notes.clone()),
            (3, 1, train.bad_row_samples.clone(), train.notes.clone())
        );
        assert_eq!(v.unwrap().examples, val.examples);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(load(&path).is_none());
    }

    #[test]
    fn keys_change_with_any_input() {
        let a = CacheKey::default().add_bytes(b"ab").add_bytes(b"c").hex();
        let b = CacheKey::default().add_bytes(b"a").add_bytes(b"bc").hex();
        assert_ne!(a, b);
        assert_eq!(a, CacheKey::default().add_bytes(b"ab").add_bytes(b"c").hex());
    }
}
