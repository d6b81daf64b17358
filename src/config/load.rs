//! Loading a [`Config`] in the four steps of the module documentation, and the ways one is
//! made: from a file, from YAML text, or from a model directory and a data file.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use serde_yaml::Value;

use super::errors::{explain, join_key, locate, split_path, strip_location, value_kind, Origin};
use super::overrides::{apply_override, keys_overlap, parse_override};
use super::{Config, DataConfig, LoraConfig, ModelConfig, OutputConfig, TrainConfig, TrainData, SECTIONS};

impl Config {
    /// The default configuration with the two required paths filled in.
    pub fn new(model_path: impl Into<PathBuf>, train_path: impl Into<PathBuf>) -> Config {
        let mut model = ModelConfig::unset();
        model.path = model_path.into();
        let mut data = DataConfig::unset();
        data.train = TrainData::Path(train_path.into());
        Config {
            model,
            lora: LoraConfig::default(),
            data,
            train: TrainConfig::default(),
            output: OutputConfig::default(),
        }
    }

    /// Reads CONFIG, applies `--set` overrides ("a.b.c=value", value parsed as a YAML
    /// scalar/flow value), validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow!("cannot read config file {}: {e}", path.display()))?;
        Config::from_yaml_str(&text, &path.display().to_string(), overrides)
    }

    /// The config of a command given a model directory and a data file instead of a config
    /// file: the data serves as training and validation set; `overrides` as for [`Config::load`].
    pub fn for_model_and_data(model: &Path, data: &Path, overrides: &[String]) -> Result<Config> {
        let doc = serde_json::json!({"model": {"path": model}, "data": {"train": data, "validation": data}});
        Config::from_yaml_str(&serde_yaml::to_string(&doc)?, "the command line", overrides)
    }

    /// Like [`Config::load`] for YAML text; `source_name` names the text in error messages.
    pub fn from_yaml_str(yaml: &str, source_name: &str, overrides: &[String]) -> Result<Config> {
        let file = Origin::File(source_name);
        let mut doc: Value = serde_yaml::from_str(yaml).map_err(|e| {
            let location = e.location().map(|l| (l.line(), l.column()));
            let text = strip_location(&e);
            let (path, message) = split_path(&text);
            let body = match message.strip_prefix("duplicate entry with key ") {
                Some(key) => {
                    format!("key `{}` is given twice; keep one", join_key(path, key.trim_matches('"')))
                }
                None => format!("invalid YAML: {text}"),
            };
            anyhow!("{}{body}", file.prefix(location))
        })?;
        match &doc {
            Value::Mapping(_) => {}
            Value::Null => {
                return Err(anyhow!(
                    "{source_name} is empty: a config needs at least `model.path` and \
                     `data.train`, e.g. `model: {{path: models/SmolLM2-135M}}` and \
                     `data: {{train: data/train.jsonl}}`; configs/reference.yaml lists every key"
                ))
            }
            other => {
                return Err(anyhow!(
                    "{source_name}: the top level must be a mapping of sections ({}), found {}",
                    SECTIONS.join(", "),
                    value_kind(other)
                ))
            }
        }

        let mut config: Config = serde_yaml::from_str(yaml).map_err(|e| explain(&e, &file))?;

        let mut applied: Vec<(String, &str)> = Vec::new();
        for set in overrides {
            let origin = Origin::Override(set);
            let (key, value) = parse_override(set)?;
            apply_override(&mut doc, &key, value).map_err(|msg| anyhow!("{}{msg}", origin.prefix(None)))?;
            // Re-serializing keeps serde_yaml's dotted paths in the errors; the positions refer
            // to the generated text, so `explain` drops them for overrides.
            let text = serde_yaml::to_string(&doc).map_err(|e| anyhow!("{}{e}", origin.prefix(None)))?;
            config = serde_yaml::from_str(&text).map_err(|e| explain(&e, &origin))?;
            applied.push((key.join("."), set.as_str()));
        }

        if let Err(invalid) = config.check() {
            let by_override = applied.iter().rev().find(|(key, _)| keys_overlap(key, invalid.key));
            let prefix = match by_override {
                Some((_, set)) => Origin::Override(set).prefix(None),
                None => {
                    let section = invalid.key.split('.').next().unwrap_or(invalid.key);
                    let location = locate(yaml, invalid.key).or_else(|| locate(yaml, section));
                    file.prefix(location)
                }
            };
            return Err(anyhow!("{prefix}{}", invalid.message));
        }
        Ok(config)
    }

    /// Refuses missing required paths and out-of-range values, naming the key and the allowed
    /// range. [`Config::load`] and [`Config::from_yaml_str`] call it already.
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(|invalid| anyhow!("{}", invalid.message))
    }

    /// The resolved config as YAML (every key, defaults filled in), to be written into the run
    /// directory. `Config::from_yaml_str(&config.to_yaml(), ..)` gives `config` back.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("a Config always serializes to YAML")
    }
}
