//! Hugging Face PEFT adapter files: `adapter_config.json` + `adapter_model.safetensors`, keyed
//! `base_model.model.<module path>.lora_A.weight` (`[r, in]`) / `.lora_B.weight` (`[out, r]`).

use super::Injected;
use crate::config::{LoraConfig, LoraInit, TargetModules};
use crate::files::{publish_dir, read_safetensors, safetensors_bytes, write_atomic};
use crate::model::Decoder;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";

/// The safetensors key of one half (`lora_A` or `lora_B`) of a module's adapter.
pub fn key(module_path: &str, half: &str) -> String {
    format!("{KEY_PREFIX}{module_path}.{half}.weight")
}

/// The module path and half a PEFT key names, `true` for `lora_A`: the inverse of [`key`].
pub fn split_key(key: &str) -> Option<(&str, bool)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    match rest.strip_suffix(".lora_A.weight") {
        Some(path) => Some((path, true)),
        None => rest.strip_suffix(".lora_B.weight").map(|path| (path, false)),
    }
}

/// `adapter_config.json` as PEFT writes it for a LoRA adapter of a causal LM.
pub fn adapter_config(cfg: &LoraConfig, injected: &Injected, base_model: &str) -> serde_json::Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": json_number(cfg.alpha),
        "lora_dropout": cfg.dropout,
        "target_modules": match &cfg.target_modules {
            // Resolved, so that readers without PEFT's all-linear logic select the same layers.
            TargetModules::AllLinear => json!(injected.target_leaf_names()),
            TargetModules::List(names) => json!(names),
            TargetModules::Regex(pattern) => json!(pattern),
        },
        "exclude_modules": match &cfg.exclude_modules {
            Some(TargetModules::List(names)) => json!(names),
            Some(TargetModules::Regex(pattern)) => json!(pattern),
            _ => json!(null),
        },
        "bias": "none",
        "use_rslora": cfg.use_rslora,
        "use_dora": false,
        "modules_to_save": null,
        "fan_in_fan_out": injected.fan_in_fan_out,
        "init_lora_weights": match cfg.init { LoraInit::Kaiming => json!(true), LoraInit::Gaussian => json!("gaussian") },
        "rank_pattern": cfg.rank_pattern,
        "alpha_pattern": cfg.alpha_pattern.iter().map(|(k, v)| (k.clone(), json_number(*v))).collect::<serde_json::Map<_, _>>(),
        "layers_to_transform": cfg.layers_to_transform,
        "layers_pattern": null,
        "inference_mode": true,
    })
}

/// Integral values as JSON integers (PEFT types `lora_alpha` as int), others as floats.
fn json_number(x: f64) -> serde_json::Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// Writes the adapter into `dir` (created or atomically replaced).
pub fn save(dir: &Path, cfg: &LoraConfig, injected: &Injected, base_model: &str) -> Result<()> {
    publish_dir(dir, |tmp| write_files(tmp, cfg, injected, base_model))
        .with_context(|| format!("cannot save the adapter to {}", dir.display()))
}

/// Writes the adapter's two files into the existing directory `dir`.
pub fn write_files(dir: &Path, cfg: &LoraConfig, injected: &Injected, base_model: &str) -> Result<()> {
    let tensors: Vec<(String, tch::Tensor)> = injected
        .trainables
        .iter()
        .map(|t| (t.peft_key.clone(), t.tensor.detach().to_kind(Kind::Float)))
        .collect();
    write_atomic(&dir.join(WEIGHTS_FILE), &safetensors_bytes(&tensors, &[("format", "pt")])?)?;
    write_atomic(
        &dir.join(CONFIG_FILE),
        &serde_json::to_vec_pretty(&adapter_config(cfg, injected, base_model))?,
    )
}

/// The LoRA settings of a PEFT adapter directory, as a [`LoraConfig`] that [`super::inject`]
/// turns into the same modules, ranks and scales.
pub fn read_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}: not a PEFT adapter directory", path.display()))?;
    let cfg: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let field = |k: &str| cfg.get(k).cloned().unwrap_or(Value::Null);
    let refuse = |what: String| -> Result<LoraConfig> { bail!("{}: {what}", path.display()) };
    if field("peft_type").as_str() != Some("LORA") {
        return refuse(format!("peft_type is {}, only LORA adapters are supported", field("peft_type")));
    }
    if field("use_dora").as_bool() == Some(true) {
        return refuse("DoRA adapters (`use_dora: true`) are not supported yet".into());
    }
    if !field("modules_to_save").is_null() || field("bias").as_str().is_some_and(|b| b != "none") {
        return refuse("adapters with modules_to_save or trained biases are not supported yet".into());
    }
    let modules = |v: Value| -> Result<Option<TargetModules>> {
        Ok(match v {
            Value::Null => None,
            Value::String(s) if s == "all-linear" => Some(TargetModules::AllLinear),
            Value::String(s) => Some(TargetModules::Regex(s)),
            Value::Array(names) => Some(TargetModules::List(
                names
                    .iter()
                    .map(|n| n.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or_else(|| anyhow::anyhow!("{}: module names must be strings", path.display()))?,
            )),
            other => bail!("{}: cannot read module selection {other}", path.display()),
        })
    };
    let patterns = |key: &str| -> BTreeMap<String, f64> {
        field(key)
            .as_object()
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect())
            .unwrap_or_default()
    };
    let layers = match field("layers_to_transform") {
        Value::Null => None,
        Value::Number(n) => Some(vec![n.as_u64().unwrap_or(0) as usize]),
        Value::Array(a) => Some(a.iter().filter_map(Value::as_u64).map(|i| i as usize).collect()),
        other => return refuse(format!("cannot read layers_to_transform {other}")),
    };
    let Some(target_modules) = modules(field("target_modules"))? else {
        return refuse("no target_modules".into());
    };
    Ok(LoraConfig {
        r: field("r").as_u64().ok_or_else(|| anyhow::anyhow!("{}: `r` missing", path.display()))? as usize,
        alpha: field("lora_alpha").as_f64().unwrap_or(8.0),
        dropout: field("lora_dropout").as_f64().unwrap_or(0.0),
        use_rslora: field("use_rslora").as_bool().unwrap_or(false),
        target_modules,
        exclude_modules: modules(field("exclude_modules"))?,
        layers_to_transform: layers,
        rank_pattern: patterns("rank_pattern").into_iter().map(|(k, v)| (k, v as usize)).collect(),
        alpha_pattern: patterns("alpha_pattern"),
        init: match field("init_lora_weights").as_str() {
            Some("gaussian") => LoraInit::Gaussian,
            _ => LoraInit::Kaiming,
        },
        init_from: None,
    })
}

/// Copies the tensors of the adapter file in `dir` into `injected`'s adapters. Every tensor of
/// the file must have a place, and every adapter a tensor, of the same shape.
pub fn copy_weights(dir: &Path, injected: &Injected) -> Result<()> {
    let path = dir.join(WEIGHTS_FILE);
    let mut stored: BTreeMap<String, tch::Tensor> = read_safetensors(&path)?.into_iter().collect();
    for t in &injected.trainables {
        let Some(value) = stored.remove(&t.peft_key) else {
            bail!("{}: no tensor `{}` for this adapter's configuration", path.display(), t.peft_key);
        };
        if value.size() != t.tensor.size() {
            bail!(
                "{}: `{}` has shape {:?}, the adapter needs {:?}",
                path.display(),
                t.peft_key,
                value.size(),
                t.tensor.size()
            );
        }
        tch::no_grad(|| t.tensor.shallow_clone().copy_(&value.to_kind(Kind::Float)));
    }
    if let Some(extra) = stored.keys().next() {
        bail!("{}: tensor `{extra}` matches no module its adapter_config.json selects", path.display());
    }
    Ok(())
}

/// Attaches the adapter in `dir` to `model` for inference (frozen, no dropout).
pub fn load(dir: &Path, model: &mut Decoder, device: Device) -> Result<Injected> {
    let cfg = LoraConfig { dropout: 0.0, ..read_config(dir)? };
    let injected = super::inject(model, &cfg, device)
        .with_context(|| format!("applying the adapter in {}", dir.display()))?;
    copy_weights(dir, &injected)?;
    for t in &injected.trainables {
        let _ = t.tensor.shallow_clone().set_requires_grad(false);
    }
    Ok(injected)
}
