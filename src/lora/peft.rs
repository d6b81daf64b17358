//! Hugging Face PEFT adapter files: `adapter_config.json` + `adapter_model.safetensors`, keyed
//! `base_model.model.<module path>.lora_A.weight` (`[r, in]`) / `.lora_B.weight` (`[out, r]`).

use super::AttachedAdapters;
use crate::config::{LoraConfig, LoraInit, TargetModules};
use crate::files::{kind_name, publish_dir, read_safetensors, safetensors_bytes, write_atomic};
use crate::model::Decoder;
use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

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

/// One module's two adapter matrices as an adapter file holds them; either may be missing.
#[derive(Debug, Default)]
pub struct Halves {
    /// `lora_A`, `[r, in]`.
    pub a: Option<Tensor>,
    /// `lora_B`, `[out, r]`.
    pub b: Option<Tensor>,
}

/// The tensors read from the adapter file `file`, paired by module path (in path order). Every
/// key must be a `lora_A` or `lora_B` weight; `only` says why in the error (what the caller can
/// use).
pub fn pair_halves(
    file: &Path,
    tensors: Vec<(String, Tensor)>,
    only: &str,
) -> Result<BTreeMap<String, Halves>> {
    let mut halves: BTreeMap<String, Halves> = BTreeMap::new();
    for (key, tensor) in tensors {
        let Some((path, is_a)) = split_key(&key) else {
            bail!(
                "{}: tensor `{key}` is not a LoRA weight (`{KEY_PREFIX}<module>.lora_A.weight` or \
                 `.lora_B.weight`); {only}",
                file.display()
            );
        };
        let entry = halves.entry(path.to_string()).or_default();
        if is_a {
            entry.a = Some(tensor);
        } else {
            entry.b = Some(tensor);
        }
    }
    Ok(halves)
}

/// `adapter_config.json` as PEFT writes it for a LoRA adapter of a causal LM.
pub fn adapter_config(cfg: &LoraConfig, adapters: &AttachedAdapters, base_model: &str) -> serde_json::Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": json_number(cfg.alpha),
        "lora_dropout": cfg.dropout,
        "target_modules": match &cfg.target_modules {
            // Resolved, so that readers without PEFT's all-linear logic select the same layers.
            TargetModules::AllLinear => json!(adapters.target_leaf_names()),
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
        "fan_in_fan_out": adapters.fan_in_fan_out,
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
pub fn save(dir: &Path, cfg: &LoraConfig, adapters: &AttachedAdapters, base_model: &str) -> Result<()> {
    publish_dir(dir, |tmp| write_files(tmp, cfg, adapters, base_model))
        .with_context(|| format!("cannot save the adapter to {}", dir.display()))
}

/// Writes the adapter's two files into the existing directory `dir`.
pub fn write_files(
    dir: &Path,
    cfg: &LoraConfig,
    adapters: &AttachedAdapters,
    base_model: &str,
) -> Result<()> {
    let tensors: Vec<(String, tch::Tensor)> = adapters
        .trainables
        .iter()
        .map(|t| (t.peft_key.clone(), t.tensor.detach().to_kind(Kind::Float)))
        .collect();
    write_atomic(&dir.join(WEIGHTS_FILE), &safetensors_bytes(&tensors, &[("format", "pt")])?)?;
    write_atomic(
        &dir.join(CONFIG_FILE),
        &serde_json::to_vec_pretty(&adapter_config(cfg, adapters, base_model))?,
    )
}

/// The base model of the adapter in `adapter_dir`: `given` (a `--model` flag) when there is
/// one, else the directory its `base_model_name_or_path` names, when that is a model directory
/// (said on stderr, so the user knows which model was used). A relative name is looked up
/// beside the adapter first, so an adapter moved together with its base still finds it, then
/// in the working directory, where PEFT looks.
pub fn base_model_dir(adapter_dir: &Path, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = given {
        return Ok(dir.to_path_buf());
    }
    let adapter = AdapterConfig::read(adapter_dir)?;
    let path = adapter.path.display();
    let Some(base) = &adapter.base_model else {
        bail!("{path} does not name its base model (base_model_name_or_path); pass --model DIR");
    };
    // `join` keeps an absolute `base` as it is.
    let candidates = [adapter_dir.join(base), PathBuf::from(base)];
    let Some(dir) = candidates.into_iter().find(|dir| dir.join("config.json").is_file()) else {
        bail!(
            "{path}: its base model `{base}` (base_model_name_or_path) is not a model directory, \
             neither relative to {} nor to the working directory; pass --model DIR",
            adapter_dir.display()
        );
    };
    eprintln!("using the base model {} (base_model_name_or_path of {path})", dir.display());
    Ok(dir)
}

/// The keys of a PEFT `adapter_config.json` that lorafit reads, typed. Every reader of the
/// file goes through [`AdapterConfig::read`], so a value of the wrong type (`"lora_alpha": "16"`)
/// is refused with the file and key, never replaced by a default. Absent keys (and `null` for
/// those PEFT allows to be `None`) take PEFT's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// The file, for messages.
    pub path: PathBuf,
    pub peft_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
    /// `none`, `all` or `lora_only`.
    pub bias: String,
    pub lora_bias: bool,
    pub modules_to_save: Vec<String>,
    pub target_modules: Option<TargetModules>,
    pub exclude_modules: Option<TargetModules>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    /// `init_lora_weights: "gaussian"`.
    pub gaussian_init: bool,
    /// The key that makes this an activated-LoRA adapter (`alora_invocation_tokens`, ...).
    pub activated_lora: Option<&'static str>,
    /// `base_model_name_or_path`: the model the adapter was trained on (a directory or a Hub id).
    pub base_model: Option<String>,
}

impl AdapterConfig {
    /// Reads `adapter_config.json` in the adapter directory `dir`.
    pub fn read(dir: &Path) -> Result<AdapterConfig> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}: not a PEFT adapter directory", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}:{}: not valid JSON ({e})", path.display(), e.line()))?;
        AdapterConfig::from_value(&path, value)
    }

    /// The typed keys of the parsed file `path`.
    pub fn from_value(path: &Path, value: Value) -> Result<AdapterConfig> {
        let Value::Object(map) = value else {
            bail!("{}: must hold a JSON object of settings, found {}", path.display(), kind_name(&value));
        };
        let keys = Keys { path, map: &map };
        let modules = |key: &str| -> Result<Option<TargetModules>> {
            Ok(match keys.optional::<Value>(key, "a list of module names or a regex")? {
                None => None,
                Some(Value::String(s)) if s == "all-linear" => Some(TargetModules::AllLinear),
                Some(Value::String(s)) => Some(TargetModules::Regex(s)),
                Some(_) => {
                    Some(TargetModules::List(keys.required(key, "a list of module names or a regex")?))
                }
            })
        };
        let layers_to_transform = match keys
            .optional::<Value>("layers_to_transform", "a layer index or a list of them")?
        {
            None => None,
            Some(Value::Array(_)) => {
                Some(keys.required("layers_to_transform", "a layer index or a list of them")?)
            }
            Some(_) => Some(vec![keys.required("layers_to_transform", "a layer index or a list of them")?]),
        };
        let gaussian_init =
            match keys.optional::<Value>("init_lora_weights", "true, false or a method name")? {
                Some(Value::String(method)) => method == "gaussian",
                Some(Value::Bool(_)) | None => false,
                Some(other) => bail!(
                "{}: `init_lora_weights` must be true, false or a method name such as \"gaussian\", found {}",
                path.display(),
                kind_name(&other)
            ),
            };
        Ok(AdapterConfig {
            path: path.to_path_buf(),
            peft_type: keys.optional("peft_type", "a string")?,
            // PEFT's LoraConfig defaults.
            r: keys.or("r", "a whole number >= 1", 8)?,
            lora_alpha: keys.or("lora_alpha", "a number", 8.0)?,
            lora_dropout: keys.or("lora_dropout", "a number", 0.0)?,
            use_rslora: keys.or("use_rslora", "true or false", false)?,
            use_dora: keys.or("use_dora", "true or false", false)?,
            bias: keys.or("bias", "\"none\", \"all\" or \"lora_only\"", "none".to_string())?,
            lora_bias: keys.or("lora_bias", "true or false", false)?,
            modules_to_save: keys.optional("modules_to_save", "a list of module names")?.unwrap_or_default(),
            target_modules: modules("target_modules")?,
            exclude_modules: modules("exclude_modules")?,
            layers_to_transform,
            rank_pattern: keys
                .optional("rank_pattern", "a map of regex to whole numbers")?
                .unwrap_or_default(),
            alpha_pattern: keys.optional("alpha_pattern", "a map of regex to numbers")?.unwrap_or_default(),
            gaussian_init,
            activated_lora: ["alora_invocation_tokens", "invocation_string"]
                .into_iter()
                .find(|key| map.get(*key).is_some_and(|v| !v.is_null())),
            base_model: keys.optional("base_model_name_or_path", "a string")?,
        })
    }

    /// The adapter as a [`LoraConfig`] that [`super::inject`] turns into the same modules,
    /// ranks and scales; refuses what lorafit cannot apply.
    pub fn lora_config(&self) -> Result<LoraConfig> {
        let path = self.path.display();
        match self.peft_type.as_deref() {
            Some("LORA") => {}
            other => {
                bail!("{path}: peft_type is {}, only LORA adapters are supported", other.unwrap_or("missing"))
            }
        }
        if self.use_dora {
            bail!("{path}: DoRA adapters (`use_dora: true`) are not supported yet");
        }
        if !self.modules_to_save.is_empty() || self.bias != "none" {
            bail!("{path}: adapters with modules_to_save or trained biases are not supported yet");
        }
        if self.r == 0 || self.rank_pattern.values().any(|&r| r == 0) {
            bail!("{path}: `r` and the ranks in `rank_pattern` must be whole numbers >= 1, found 0");
        }
        let Some(target_modules) = self.target_modules.clone() else {
            bail!("{path}: no target_modules");
        };
        Ok(LoraConfig {
            r: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            use_rslora: self.use_rslora,
            target_modules,
            exclude_modules: self.exclude_modules.clone(),
            layers_to_transform: self.layers_to_transform.clone(),
            rank_pattern: self.rank_pattern.clone(),
            alpha_pattern: self.alpha_pattern.clone(),
            init: if self.gaussian_init { LoraInit::Gaussian } else { LoraInit::Kaiming },
            init_from: None,
        })
    }
}

/// Typed access to the keys of one JSON object, naming the file and key on a wrong type.
struct Keys<'a> {
    path: &'a Path,
    map: &'a serde_json::Map<String, Value>,
}

impl Keys<'_> {
    /// The value of `key`, `None` when absent or null.
    fn optional<T: DeserializeOwned>(&self, key: &str, expected: &str) -> Result<Option<T>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => T::deserialize(value).map(Some).map_err(|_| self.wrong(key, expected, value)),
        }
    }

    /// The value of `key`, which must be present and of type `T`.
    fn required<T: DeserializeOwned>(&self, key: &str, expected: &str) -> Result<T> {
        let value = self.map.get(key).unwrap_or(&Value::Null);
        T::deserialize(value).map_err(|_| self.wrong(key, expected, value))
    }

    /// The value of `key`, `default` when absent (null is refused: PEFT cannot use it either).
    fn or<T: DeserializeOwned>(&self, key: &str, expected: &str, default: T) -> Result<T> {
        match self.map.get(key) {
            None => Ok(default),
            Some(_) => self.required(key, expected),
        }
    }

    fn wrong(&self, key: &str, expected: &str, value: &Value) -> anyhow::Error {
        anyhow!(
            "{}: `{key}` must be {expected}, found {} `{value}`; fix the value in the file",
            self.path.display(),
            kind_name(value)
        )
    }
}

/// The LoRA settings of a PEFT adapter directory (see [`AdapterConfig::lora_config`]).
pub fn read_config(dir: &Path) -> Result<LoraConfig> {
    AdapterConfig::read(dir)?.lora_config()
}

/// Copies the tensors of the adapter file in `dir` into `adapters`. Every tensor of
/// the file must have a place, and every adapter a tensor, of the same shape.
pub fn copy_weights(dir: &Path, adapters: &AttachedAdapters) -> Result<()> {
    let path = dir.join(WEIGHTS_FILE);
    let mut stored: BTreeMap<String, tch::Tensor> = read_safetensors(&path)?.into_iter().collect();
    for t in &adapters.trainables {
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
pub fn load(dir: &Path, model: &mut Decoder, device: Device) -> Result<AttachedAdapters> {
    let cfg = LoraConfig { dropout: 0.0, ..read_config(dir)? };
    let adapters = super::inject(model, &cfg, device)
        .with_context(|| format!("applying the adapter in {}", dir.display()))?;
    copy_weights(dir, &adapters)?;
    for t in &adapters.trainables {
        let _ = t.tensor.shallow_clone().set_requires_grad(false);
    }
    Ok(adapters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_pair_by_module_path() {
        let file = Path::new("run/adapter/adapter_model.safetensors");
        let t = || Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let (q, v) = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj");
        let tensors = vec![(key(q, "lora_B"), t()), (key(v, "lora_A"), t()), (key(q, "lora_A"), t())];
        let halves = pair_halves(file, tensors, "why").unwrap();
        let present: Vec<_> =
            halves.iter().map(|(p, h)| (p.as_str(), h.a.is_some(), h.b.is_some())).collect();
        assert_eq!(present, [(q, true, true), (v, true, false)]);

        let err = pair_halves(file, vec![(format!("base_model.model.{q}.weight"), t())], "why").unwrap_err();
        let err = err.to_string();
        assert!(
            err.starts_with(&format!("{}: tensor `base_model.model.{q}.weight`", file.display())),
            "{err}"
        );
        assert!(err.ends_with("why"), "{err}");
    }

    #[test]
    fn wrong_types_are_refused_naming_the_file_and_key() {
        let path = Path::new("run/adapter/adapter_config.json");
        let good = json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]});
        let cfg = AdapterConfig::from_value(path, good.clone()).unwrap().lora_config().unwrap();
        assert_eq!((cfg.r, cfg.alpha), (8, 16.0));
        for (key, value) in [
            ("lora_alpha", json!("16")),
            ("lora_alpha", json!(null)),
            ("r", json!("8")),
            ("r", json!(8.5)),
            ("r", json!(-1)),
            ("use_rslora", json!("true")),
            ("lora_dropout", json!([0.1])),
            ("target_modules", json!(5)),
            ("target_modules", json!(["q_proj", 3])),
            ("layers_to_transform", json!(["0"])),
            ("rank_pattern", json!({"q_proj": "4"})),
            ("alpha_pattern", json!([16])),
            ("init_lora_weights", json!(3)),
            ("modules_to_save", json!("lm_head")),
        ] {
            let mut config = good.clone();
            config[key] = value.clone();
            let err = AdapterConfig::from_value(path, config).unwrap_err().to_string();
            assert!(err.starts_with("run/adapter/adapter_config.json: "), "{key} = {value}: {err}");
            assert!(err.contains(&format!("`{key}` must be")), "{key} = {value}: {err}");
        }
        let err = AdapterConfig::from_value(path, json!([1])).unwrap_err().to_string();
        assert!(err.contains("adapter_config.json") && err.contains("an array"), "{err}");
    }
}
