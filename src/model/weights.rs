//! safetensors (single file or sharded with an index) → named frozen tensors.
//!
//! Loading reads like a database reads a page: the headers first, so every tensor's name, dtype
//! and shape can be checked against config.json before any data is read, then each tensor by
//! its byte range, in chunks converted into a tensor allocated once in the target dtype and
//! device. Peak memory is the loaded weights plus one chunk.

use crate::config::QuantFormat;
use crate::files::{kind_of, read_safetensors_header};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Bytes of stored data read and converted at a time.
const CHUNK_BYTES: usize = 16 << 20;

/// One tensor of the checkpoint, located by its file's header.
#[derive(Clone)]
struct Stored {
    kind: Kind,
    shape: Vec<i64>,
    /// Index into [`Weights::files`].
    file: usize,
    /// Absolute byte offset of the data in its file.
    start: u64,
}

/// The base model's tensors by Hugging Face name, located by the safetensors headers and read
/// when taken; each remembers its file so that errors can name it.
pub struct Weights {
    files: Vec<PathBuf>,
    tensors: HashMap<String, Stored>,
    /// A name prefix that some checkpoints of the family omit (GPT-2's `transformer.`).
    optional_prefix: Option<&'static str>,
    /// The dtype floating tensors are converted to and their device; `None` while only the
    /// headers are being checked.
    target: Option<(Kind, Device)>,
    /// The 4-bit format linear weights are quantized to at load, and whether their scales are
    /// quantized too.
    quantization: Option<(QuantFormat, bool)>,
}

impl Weights {
    /// Reads the headers of `model.safetensors` (or of the shards listed in
    /// `model.safetensors.index.json`); [`Weights::take`] will read each tensor onto `device`,
    /// converting floating tensors to `kind`.
    pub fn open(dir: &Path, kind: Kind, device: Device) -> Result<Weights> {
        let files = safetensors_files(dir)?;
        let mut tensors: HashMap<String, Stored> = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let mut file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
            let header = read_safetensors_header(&mut file, path)?;
            for (name, info) in header.metadata.tensors() {
                let kind =
                    kind_of(info.dtype).with_context(|| format!("tensor `{name}` in {}", path.display()))?;
                let shape = info.shape.iter().map(|&d| d as i64).collect();
                let stored =
                    Stored { kind, shape, file: i, start: header.data_start + info.data_offsets.0 as u64 };
                if let Some(first) = tensors.insert(name.clone(), stored) {
                    bail!(
                        "tensor `{name}` is stored twice, in {} and in {}",
                        files[first.file].display(),
                        path.display()
                    );
                }
            }
        }
        Ok(Weights {
            files,
            tensors,
            optional_prefix: None,
            target: Some((kind, device)),
            quantization: None,
        })
    }

    /// The same tensors with their headers alone: [`Weights::take`] checks each and returns an
    /// empty placeholder, reading nothing.
    pub fn headers_only(&self) -> Weights {
        Weights {
            files: self.files.clone(),
            tensors: self.tensors.clone(),
            optional_prefix: self.optional_prefix,
            target: None,
            quantization: self.quantization,
        }
    }

    /// Quantize the linear layers' weights to `format` as they are taken (see
    /// [`crate::model::quantized`]), with double-quantized scales when `nested`.
    pub fn set_quantization(&mut self, quantization: Option<(QuantFormat, bool)>) {
        self.quantization = quantization;
    }

    pub fn quantization(&self) -> Option<(QuantFormat, bool)> {
        self.quantization
    }

    /// Accept tensor names without `prefix` as well (`transformer.h.0...` stored as `h.0...`).
    pub fn set_optional_prefix(&mut self, prefix: Option<&'static str>) {
        self.optional_prefix = prefix;
    }

    /// Whether the checkpoint holds tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.short_name(name).is_some_and(|n| self.tensors.contains_key(n))
    }

    fn short_name<'a>(&self, name: &'a str) -> Option<&'a str> {
        self.optional_prefix.and_then(|p| name.strip_prefix(p))
    }

    /// The name `name` is stored under.
    fn key<'a>(&self, name: &'a str) -> &'a str {
        match self.short_name(name) {
            Some(short) if !self.tensors.contains_key(name) => short,
            _ => name,
        }
    }

    /// The dtype tensor `name` is stored in, if the checkpoint holds it.
    pub fn stored_kind(&self, name: &str) -> Option<Kind> {
        self.tensors.get(self.key(name)).map(|s| s.kind)
    }

    /// Whether [`Weights::take`] reads data (rather than checking headers only).
    pub fn reads_data(&self) -> bool {
        self.target.is_some()
    }

    /// The dtype floating tensors are converted to, and their device.
    pub fn target(&self) -> Option<(Kind, Device)> {
        self.target
    }

    /// Takes tensor `name` out of the store, checking its dtype and shape before reading it.
    /// The tensor is frozen.
    pub fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let key = self.key(name);
        let stored = self
            .tensors
            .remove(key)
            .ok_or_else(|| anyhow!("the model weights have no tensor `{name}` (expected shape {shape:?})"))?;
        let file = &self.files[stored.file];
        if stored.shape != shape {
            bail!(
                "tensor `{name}` in {} has shape {:?}, but config.json implies {shape:?}",
                file.display(),
                stored.shape
            );
        }
        if !matches!(stored.kind, Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) {
            bail!(
                "tensor `{name}` in {} is stored as {:?}; model weights must be floating point \
                 (F32, F16, BF16 or F64)",
                file.display(),
                stored.kind
            );
        }
        let tensor = match self.target {
            Some((kind, device)) => read(name, &stored, file, kind, device)?,
            None => Tensor::empty([0], (stored.kind, Device::Cpu)),
        };
        Ok(tensor.set_requires_grad(false))
    }

    /// Takes tensor `name` as stored, on the CPU, after checking that it is stored as `kind`
    /// with `shape` (any shape when `None`): the parts of a pre-quantized weight. An empty
    /// placeholder while only the headers are checked.
    pub fn take_stored(&mut self, name: &str, kind: Kind, shape: Option<&[i64]>) -> Result<Tensor> {
        let key = self.key(name);
        let stored = self.tensors.remove(key).ok_or_else(|| {
            anyhow!("the model weights have no tensor `{name}`, which a pre-quantized weight needs")
        })?;
        let file = &self.files[stored.file];
        if stored.kind != kind || shape.is_some_and(|s| s != stored.shape) {
            bail!(
                "tensor `{name}` in {} is {:?} of shape {:?}, but a bitsandbytes 4-bit checkpoint stores it \
                 as {kind:?}{}; save the model again with transformers + bitsandbytes",
                file.display(),
                stored.kind,
                stored.shape,
                shape.map(|s| format!(" of shape {s:?}")).unwrap_or_default()
            );
        }
        match self.target {
            Some(_) => read(name, &stored, file, kind, Device::Cpu),
            None => Ok(Tensor::empty([0], (kind, Device::Cpu))),
        }
    }

    /// Names that were loaded but not taken: unexpected for a supported architecture.
    pub fn remaining(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }
}

/// Reads `stored` from `path` into a tensor of `kind` on `device`, one chunk at a time. A NaN or
/// infinite value is refused here, naming the file: training on it would only fail later with a
/// non-finite loss that looks like a learning rate or data fault.
fn read(name: &str, stored: &Stored, path: &Path, kind: Kind, device: Device) -> Result<Tensor> {
    let cannot_read = || format!("cannot read tensor `{name}` from {}", path.display());
    let mut file = File::open(path).with_context(cannot_read)?;
    file.seek(SeekFrom::Start(stored.start)).with_context(cannot_read)?;
    let out = Tensor::f_empty(&stored.shape, (kind, device))
        .with_context(|| format!("no memory for tensor `{name}` ({kind:?}, shape {:?})", stored.shape))?;
    let flat = out.view([-1]);
    let numel = flat.size()[0];
    let elt = stored.kind.elt_size_in_bytes();
    let chunk = (CHUNK_BYTES / elt).max(1) as i64;
    let mut buffer = vec![0u8; chunk.min(numel) as usize * elt];
    let mut bad = NonFinite::default();
    let mut done = 0;
    while done < numel {
        let n = chunk.min(numel - done);
        let bytes = &mut buffer[..n as usize * elt];
        file.read_exact(bytes).with_context(cannot_read)?;
        let values = Tensor::f_from_data_size(bytes, &[n], stored.kind)?;
        let mut dest = flat.narrow(0, done, n);
        dest.f_copy_(&values)?;
        if dest.isfinite().all().int64_value(&[]) == 0 {
            bad.count(&values);
        }
        done += n;
    }
    match bad.message(name, path, numel, kind) {
        Some(message) => Err(anyhow!(message)),
        None => Ok(out),
    }
}

/// The stored values of a tensor that are not finite once converted, counted chunk by chunk.
#[derive(Default)]
struct NonFinite {
    nan: i64,
    infinite: i64,
    /// The largest magnitude among the chunks that overflowed the target dtype.
    overflow: Option<f64>,
}

impl NonFinite {
    fn count(&mut self, stored: &Tensor) {
        let nan = stored.isnan().sum(Kind::Int64).int64_value(&[]);
        let bad = stored.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]);
        self.nan += nan;
        self.infinite += bad - nan;
        if bad == 0 {
            let largest = stored.abs().max().double_value(&[]);
            self.overflow = Some(self.overflow.map_or(largest, |m| m.max(largest)));
        }
    }

    fn message(&self, name: &str, file: &Path, numel: i64, kind: Kind) -> Option<String> {
        if self.nan + self.infinite > 0 {
            Some(format!(
                "tensor `{name}` in {} holds {} NaN and {} infinite values of {numel}: the checkpoint is damaged; \
                 download or export it again",
                file.display(),
                self.nan,
                self.infinite
            ))
        } else {
            self.overflow.map(|largest| {
                format!(
                    "tensor `{name}` in {} holds values beyond the range of {kind:?} (largest magnitude {largest}); \
                     load the model in float32 (model.dtype: fp32)",
                    file.display()
                )
            })
        }
    }
}

/// The weight files of a model directory: the shards of the index when there is one.
pub(crate) fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    safetensors_files_if_any(dir)?.ok_or_else(|| {
        anyhow!(
            "{} has neither model.safetensors nor model.safetensors.index.json \
             (PyTorch .bin checkpoints are not supported: convert them to safetensors)",
            dir.display()
        )
    })
}

/// [`safetensors_files`], `None` for a directory without any.
pub(crate) fn safetensors_files_if_any(dir: &Path) -> Result<Option<Vec<PathBuf>>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let text =
            std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
        let parsed: Index = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid safetensors index", index.display()))?;
        let mut files = Vec::new();
        for (tensor, file) in &parsed.weight_map {
            // A shard is a file of the model directory: an index must not make lorafit read
            // whatever file a relative or absolute path reaches.
            let mut parts = Path::new(file).components();
            if !parts.all(|c| matches!(c, Component::Normal(_))) || file.is_empty() {
                bail!(
                    "{}: weight_map entry `{tensor}` points to `{file}`, outside the model directory; \
                     shards must be named by paths inside {}",
                    index.display(),
                    dir.display()
                );
            }
            files.push(dir.join(file));
        }
        files.sort();
        files.dedup();
        return Ok(Some(files));
    }
    let single = dir.join("model.safetensors");
    Ok(single.exists().then(|| vec![single]))
}
