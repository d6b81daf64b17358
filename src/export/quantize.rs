//! `lorafit quantize`: a model directory written again with its linear weights in 4 bits, as
//! transformers + bitsandbytes' `save_pretrained` writes a 4-bit model, so that
//! `from_pretrained` loads it as it is (and lorafit too, see [`crate::model::quantized`]).

use super::merge::{check_out_dir, SIDE_FILES};
use crate::config::QuantFormat;
use crate::files::{publish_dir, safetensors_bytes};
use crate::model::quantized::{quantization_config, FrozenWeight};
use crate::model::{load_model_quantized, Weights};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;
use tch::{Device, Kind};

/// What [`quantize_command`] wrote.
pub struct QuantizeReport {
    pub quantized: usize,
    pub bytes: u64,
}

/// Writes `model_dir` to `out_dir` with every frozen linear weight (not embeddings, norms or an
/// untied `lm_head`) in `format`, scales double-quantized when `nested`; the other tensors keep
/// their stored dtype. One model.safetensors, plus config.json with its `quantization_config`
/// and the tokenizer and generation files.
pub fn quantize_command(
    model_dir: &Path,
    out_dir: &Path,
    format: QuantFormat,
    nested: bool,
) -> Result<QuantizeReport> {
    if !model_dir.join("config.json").is_file() {
        let what = if model_dir.is_dir() { "has no config.json" } else { "is not a directory" };
        bail!(
            "--model {}: {what}; give a Hugging Face model directory (config.json and \
             model.safetensors)",
            model_dir.display()
        );
    }
    check_out_dir(out_dir)?;
    let mut model = load_model_quantized(model_dir, Kind::Float, Device::Cpu, Some((format, nested)))?;
    let mut source = Weights::open(model_dir, Kind::Float, Device::Cpu)?;
    let mut tensors = Vec::new();
    let mut taken = HashSet::new();
    for (site, linear) in model.linear_layers_mut() {
        let FrozenWeight::Quantized(q) = &linear.weight else { continue };
        if linear.fan_in_fan_out {
            bail!(
                "{}: `{}` is a Conv1D weight; lorafit writes 4-bit checkpoints of [out, in] weights only",
                model_dir.display(),
                site.path
            );
        }
        let name = format!("{}.weight", site.path);
        let dtype = source.stored_kind(&name).map_or("float32", torch_name);
        tensors.extend(q.saved_parts(&name, dtype));
        taken.insert(name);
    }
    let quantized = taken.len();
    drop(model);
    for name in source.remaining() {
        // A checkpoint already in 4 bits keeps its parts beside each weight: written above.
        let part_of =
            |n: &str| n.split_once(".weight.").is_some_and(|(p, _)| taken.contains(&format!("{p}.weight")));
        if taken.contains(&name) || part_of(&name) {
            continue;
        }
        let kind = source.stored_kind(&name).ok_or_else(|| anyhow!("tensor `{name}` vanished"))?;
        tensors.push((name.clone(), source.take_stored(&name, kind, None)?));
    }
    let bytes = safetensors_bytes(&tensors, &[("format", "pt")])?;
    let size = bytes.len() as u64;
    publish_dir(out_dir, |tmp| {
        std::fs::write(tmp.join("model.safetensors"), &bytes)?;
        copy_side_files(model_dir, tmp, format, nested)
    })
    .with_context(|| format!("writing the 4-bit model to {}", out_dir.display()))?;
    Ok(QuantizeReport { quantized, bytes: size })
}

/// Copies the side files; config.json gains the `quantization_config` transformers reads.
fn copy_side_files(model_dir: &Path, out: &Path, format: QuantFormat, nested: bool) -> Result<()> {
    for name in SIDE_FILES.iter().filter(|n| model_dir.join(n).is_file()) {
        let (from, to) = (model_dir.join(name), out.join(name));
        if *name != "config.json" {
            std::fs::copy(&from, &to).with_context(|| format!("cannot copy {}", from.display()))?;
            continue;
        }
        let text =
            std::fs::read_to_string(&from).with_context(|| format!("cannot read {}", from.display()))?;
        let mut config: Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", from.display()))?;
        let map =
            config.as_object_mut().ok_or_else(|| anyhow!("{} must be a JSON object", from.display()))?;
        let compute =
            ["dtype", "torch_dtype"].iter().find_map(|k| map.get(*k)?.as_str()).unwrap_or("float32");
        map.insert("quantization_config".into(), quantization_config(format, nested, compute));
        std::fs::write(&to, serde_json::to_vec_pretty(&config)?)
            .with_context(|| format!("cannot write {}", to.display()))?;
    }
    Ok(())
}

/// torch's name of a floating dtype.
fn torch_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    }
}
