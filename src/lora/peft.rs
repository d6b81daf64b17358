//! Hugging Face PEFT adapter files: `adapter_config.json` + `adapter_model.safetensors`, keyed
//! `base_model.model.<module path>.lora_A.weight` (`[r, in]`) / `.lora_B.weight` (`[out, r]`).

use super::{pattern_value, scale, Adapter, Injected};
use crate::config::{LoraConfig, LoraInit, TargetModules};
use crate::files::{publish_dir, read_safetensors, safetensors_bytes, write_atomic};
use crate::model::Decoder;
use anyhow::{bail, Context, Result};
use serde_json::json;
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

/// `adapter_config.json` as PEFT writes it for a LoRA adapter of a causal LM.
pub fn adapter_config(
    cfg: &LoraConfig,
    injected: &Injected,
    base_model: &str,
) -> serde_json::Value {
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
    let tensors: Vec<(String, tch::Tensor)> = injected
        .trainables
        .iter()
        .map(|t| (t.peft_key.clone(), t.tensor.detach().to_kind(Kind::Float)))
        .collect();
    let weights = safetensors_bytes(&tensors, &[("format", "pt")])?;
    let config = serde_json::to_vec_pretty(&adapter_config(cfg, injected, base_model))?;
    publish_dir(dir, |tmp| {
        write_atomic(&tmp.join(WEIGHTS_FILE), &weights)?;
        write_atomic(&tmp.join(CONFIG_FILE), &config)
    })
    .with_context(|| format!("cannot save the adapter to {}", dir.display()))
}

/// Attaches the adapter in `dir` (frozen, for inference) to `model`. Returns the module paths.
pub fn load(dir: &Path, model: &mut Decoder, device: Device) -> Result<Vec<String>> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).with_context(|| {
        format!(
            "cannot read {}: not a PEFT adapter directory",
            config_path.display()
        )
    })?;
    let cfg: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    let field = |k: &str| cfg.get(k).cloned().unwrap_or(serde_json::Value::Null);
    if field("peft_type").as_str() != Some("LORA") {
        bail!(
            "{}: peft_type is {}, only LORA adapters are supported",
            config_path.display(),
            field("peft_type")
        );
    }
    if field("use_dora").as_bool() == Some(true) {
        bail!(
            "{}: DoRA adapters (`use_dora: true`) are not supported yet",
            config_path.display()
        );
    }
    let patterns = |key: &str| -> BTreeMap<String, f64> {
        field(key)
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (rank_pattern, alpha_pattern) = (patterns("rank_pattern"), patterns("alpha_pattern"));
    let r = field("r")
        .as_u64()
        .with_context(|| format!("{}: `r` missing", config_path.display()))? as f64;
    let alpha = field("lora_alpha").as_f64().unwrap_or(8.0);
    let use_rslora = field("use_rslora").as_bool().unwrap_or(false);

    let weights_path = dir.join(WEIGHTS_FILE);
    let mut halves: BTreeMap<String, [Option<tch::Tensor>; 2]> = BTreeMap::new();
    for (name, tensor) in read_safetensors(&weights_path)? {
        let parsed = name
            .strip_prefix(KEY_PREFIX)
            .and_then(|rest| rest.strip_suffix(".weight"))
            .and_then(|rest| rest.rsplit_once('.'));
        let (path, slot) = match parsed {
            Some((path, "lora_A")) => (path, 0),
            Some((path, "lora_B")) => (path, 1),
            _ => bail!(
                "{}: unexpected tensor `{name}` (expected LoRA A/B weights)",
                weights_path.display()
            ),
        };
        halves.entry(path.to_string()).or_default()[slot] =
            Some(tensor.to_kind(Kind::Float).to_device(device));
    }
    let mut layers = model.linear_layers_mut();
    for (path, [a, b]) in &halves {
        let (Some(a), Some(b)) = (a, b) else {
            bail!(
                "{}: module `{path}` has only one of lora_A / lora_B",
                weights_path.display()
            );
        };
        let Some((_, linear)) = layers.iter_mut().find(|(p, _)| p == path) else {
            bail!(
                "{}: the model has no linear layer `{path}`",
                weights_path.display()
            );
        };
        let r = pattern_value("rank_pattern", &rank_pattern, path)?.unwrap_or(r) as usize;
        let alpha = pattern_value("alpha_pattern", &alpha_pattern, path)?.unwrap_or(alpha);
        let (want_a, want_b) = (
            [r as i64, linear.in_features()],
            [linear.out_features(), r as i64],
        );
        if a.size() != want_a || b.size() != want_b {
            bail!(
                "{}: `{path}` has lora_A {:?} and lora_B {:?}, but r = {r} and the layer needs {want_a:?} and {want_b:?}",
                weights_path.display(),
                a.size(),
                b.size()
            );
        }
        let scale = scale(alpha, r, use_rslora);
        linear.adapter = Some(Adapter {
            a: a.shallow_clone(),
            b: b.shallow_clone(),
            scale,
            dropout: 0.0,
        });
    }
    Ok(halves.into_keys().collect())
}
