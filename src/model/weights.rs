//! safetensors (single file or sharded with an index) → named frozen tensors.

use crate::files::read_safetensors;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The base model's tensors by Hugging Face name, each remembered with the file it came from so
/// that shape errors can name it.
pub struct Weights {
    tensors: HashMap<String, (Tensor, PathBuf)>,
    /// A name prefix that some checkpoints of the family omit (GPT-2's `transformer.`).
    optional_prefix: Option<&'static str>,
}

impl Weights {
    /// Loads every tensor of `model.safetensors` (or the shards listed in
    /// `model.safetensors.index.json`) onto `device`, converting floating tensors to `kind`.
    /// A NaN or infinite value is refused here, naming the tensor and its file: training on it
    /// would only fail later with a non-finite loss that looks like a learning rate or data fault.
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Weights> {
        let mut tensors = HashMap::new();
        for file in safetensors_files(dir)? {
            for (name, stored) in read_safetensors(&file)? {
                let tensor = if stored.is_floating_point() {
                    let converted = stored.to_kind(kind).to_device(device);
                    if converted.isfinite().all().int64_value(&[]) == 0 {
                        bail!("{}", non_finite(&name, &file, &stored, kind));
                    }
                    converted
                } else {
                    stored.to_device(device)
                };
                tensors.insert(name, (tensor, file.clone()));
            }
        }
        Ok(Weights { tensors, optional_prefix: None })
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

    /// Takes tensor `name` out of the store, checking its shape. The tensor is frozen.
    pub fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let stored = match self.short_name(name) {
            Some(short) if !self.tensors.contains_key(name) => short,
            _ => name,
        };
        let (tensor, file) = self
            .tensors
            .remove(stored)
            .ok_or_else(|| anyhow!("the model weights have no tensor `{name}` (expected shape {shape:?})"))?;
        if tensor.size() != shape {
            bail!(
                "tensor `{name}` in {} has shape {:?}, but config.json implies {shape:?}",
                file.display(),
                tensor.size()
            );
        }
        Ok(tensor.set_requires_grad(false))
    }

    /// Names that were loaded but not taken: unexpected for a supported architecture.
    pub fn remaining(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }
}

/// Why tensor `name` of `file` has non-finite values once converted to `kind`.
fn non_finite(name: &str, file: &Path, stored: &Tensor, kind: Kind) -> String {
    let bad = stored.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]);
    if bad > 0 {
        let nan = stored.isnan().sum(Kind::Int64).int64_value(&[]);
        format!(
            "tensor `{name}` in {} holds {nan} NaN and {} infinite values of {}: the checkpoint is \
             damaged; download or export it again",
            file.display(),
            bad - nan,
            stored.numel()
        )
    } else {
        format!(
            "tensor `{name}` in {} holds values beyond the range of {kind:?} (largest magnitude {}); \
             load the model in float32 (model.dtype: fp32)",
            file.display(),
            stored.abs().max().double_value(&[])
        )
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
        let mut files: Vec<PathBuf> = parsed.weight_map.values().map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        return Ok(Some(files));
    }
    let single = dir.join("model.safetensors");
    Ok(single.exists().then(|| vec![single]))
}
