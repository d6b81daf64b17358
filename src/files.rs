//! The project's one home for file formats and safe writes: safetensors in and out, and
//! atomic publication (write to a temporary name, then rename) so a crash never leaves a
//! partial file where a good one is expected.

use anyhow::{bail, Context, Result};
use safetensors::tensor::Metadata;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Reads every tensor of a safetensors file (on the CPU, in the file's dtype).
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype()).with_context(|| format!("tensor `{name}` in {}", path.display()))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        out.push((name, Tensor::f_from_data_size(view.data(), &shape, kind)?));
    }
    Ok(out)
}

/// A safetensors file's header: its tensors' dtypes, shapes and data offsets.
pub struct SafetensorsHeader {
    pub metadata: Metadata,
    /// Where the tensor data starts in the file (the data offsets count from here).
    pub data_start: u64,
}

/// Reads the header of the safetensors file `path` (open as `file`) without loading the
/// tensors: the crate's parser checks that the offsets are contiguous and match each tensor's
/// dtype and shape; this checks they fit in the file.
pub fn read_safetensors_header(file: &mut File, path: &Path) -> Result<SafetensorsHeader> {
    let bad = || format!("{} is not a valid safetensors file", path.display());
    let file_len = file.metadata().with_context(bad)?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).with_context(bad)?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER_LEN || 8 + header_len > file_len {
        bail!("{}: the header length is invalid", bad());
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).with_context(bad)?;
    let metadata: Metadata = serde_json::from_slice(&header).with_context(bad)?;
    let data_start = 8 + header_len;
    if data_start + metadata.data_len() as u64 > file_len {
        bail!("{}: the tensor data runs past the end of the file", bad());
    }
    Ok(SafetensorsHeader { metadata, data_start })
}

/// The safetensors crate's limit on a header's size.
const MAX_HEADER_LEN: u64 = 100 << 20;

/// The dtypes named in a safetensors file's header (read without loading the tensors).
pub fn safetensors_dtypes(path: &Path) -> Result<Vec<String>> {
    let mut file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let header = read_safetensors_header(&mut file, path)?;
    let mut dtypes: Vec<String> = header.metadata.tensors().values().map(|t| t.dtype.to_string()).collect();
    dtypes.sort();
    dtypes.dedup();
    Ok(dtypes)
}

/// How a JSON value is named in error messages about a file's contents.
pub fn kind_name(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Serialises tensors (any device, made contiguous) to safetensors bytes with `metadata`.
pub fn safetensors_bytes(tensors: &[(String, Tensor)], metadata: &[(&str, &str)]) -> Result<Vec<u8>> {
    let mut buffers = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_device(tch::Device::Cpu).contiguous();
        let mut data = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, t.numel())?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        buffers.push((name.clone(), dtype_of(t.kind())?, shape, data));
    }
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, data)| Ok((name.as_str(), TensorView::new(*dtype, shape.clone(), data)?)))
        .collect::<Result<Vec<_>>>()?;
    let metadata: HashMap<String, String> =
        metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Ok(safetensors::serialize(views, Some(metadata))?)
}

pub(crate) fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        other => bail!("unsupported safetensors dtype {other:?}"),
    })
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => bail!("cannot store tensors of kind {other:?} in safetensors"),
    })
}

/// A sibling path that is unique to this process, for staging a file or directory.
fn staging_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `contents` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = staging_path(path);
    let result = (|| -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

/// Builds a directory with `fill` under a temporary name, then renames it to `dir`, replacing a
/// previous version only once the new one is complete.
pub fn publish_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = staging_path(dir);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let old = dir.with_file_name(format!(
            ".{}.old-{}",
            dir.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        std::fs::rename(dir, &old).with_context(|| format!("cannot replace {}", dir.display()))?;
        std::fs::rename(&tmp, dir).with_context(|| format!("cannot write {}", dir.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, dir).with_context(|| format!("cannot write {}", dir.display()))?;
    }
    Ok(())
}

/// Whether `name` is a staging name of [`write_atomic`] or [`publish_dir`]: `.NAME.tmp-PID`, or
/// `.NAME.old-PID` (a directory being replaced).
fn is_staging(name: &str) -> bool {
    name.starts_with('.') && (name.contains(".tmp-") || name.contains(".old-"))
}

/// Removes every staging file and directory in `dir` (not below it): what writers killed
/// mid-write left behind. Only safe while no other process writes into `dir`, i.e. under its
/// [`DirLock`].
pub fn remove_staging(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries.flatten() {
        if entry.file_name().to_str().is_some_and(is_staging) {
            let path = entry.path();
            let removed =
                if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            removed.with_context(|| format!("cannot remove the leftover {}", path.display()))?;
        }
    }
    Ok(())
}

/// Writes and removes a small file in `dir`, so a read-only or full directory fails before any
/// work; the file has a staging name, so a kill in between leaves nothing [`remove_staging`]
/// does not clean.
pub fn probe_writable(dir: &Path) -> Result<()> {
    let probe = staging_path(&dir.join("write-test"));
    std::fs::write(&probe, b"ok")
        .and_then(|_| std::fs::remove_file(&probe))
        .with_context(|| format!("the directory {} is not writable", dir.display()))
}

/// The file in a directory that [`DirLock`] locks.
pub const LOCK_FILE: &str = "lorafit.lock";

/// An advisory lock (`flock`) on a directory, held until dropped: one process at a time owns
/// the directory. The operating system releases it when the holder exits, however it exits
/// (SIGKILL included), so a lock file left behind by a dead process is simply taken again.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock of `dir` (which exists) and writes this process's id into the lock file,
    /// or fails naming the process that holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock> {
        use std::io::{Seek, Write};
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() {
                    "another process".to_string()
                } else {
                    format!("process {holder}")
                };
                bail!(
                    "{} is in use by {holder} (it holds {}); wait for it to finish or stop it, then try again",
                    dir.display(),
                    path.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        let pid = format!("{}\n", std::process::id());
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(pid.as_bytes()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-tensor safetensors file in a fresh directory, as this crate writes it.
    fn written() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let tensors = [
            ("a".to_string(), Tensor::from_slice(&[1.0f32, 2.0, 3.0])),
            ("b".to_string(), Tensor::from_slice(&[4i64, 5]).to_kind(Kind::BFloat16)),
        ];
        let bytes = safetensors_bytes(&tensors, &[]).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        (dir, path, bytes)
    }

    #[test]
    fn header_locates_each_tensor() {
        let (_dir, path, bytes) = written();
        let expected = SafeTensors::deserialize(&bytes).unwrap();
        let header = read_safetensors_header(&mut File::open(&path).unwrap(), &path).unwrap();
        for (name, info) in header.metadata.tensors() {
            let at = header.data_start as usize;
            let data = &bytes[at + info.data_offsets.0..at + info.data_offsets.1];
            assert_eq!(data, expected.tensor(&name).unwrap().data(), "{name}");
        }
        assert_eq!(safetensors_dtypes(&path).unwrap(), ["BF16", "F32"]);
    }

    /// A file cut short, or with a header that is not safetensors JSON, is refused by name.
    #[test]
    fn bad_files_are_named() {
        let (_dir, path, bytes) = written();
        let mut cases =
            vec![("truncated data", bytes[..bytes.len() - 1].to_vec()), ("no header", bytes[..4].to_vec())];
        let mut garbled = bytes.clone();
        garbled[8] = b'[';
        cases.push(("garbled header", garbled));
        for (case, contents) in cases {
            std::fs::write(&path, contents).unwrap();
            let err = format!("{:#}", safetensors_dtypes(&path).unwrap_err());
            assert!(
                err.contains(&format!("{} is not a valid safetensors file", path.display())),
                "{case}: {err}"
            );
        }
    }
}
