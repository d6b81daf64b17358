//! Loading a [`Config`] in the four steps of the module documentation, and the ways one is
//! made: from a file, from YAML text, or from a model directory and a data file.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use serde_yaml::{Mapping, Value};

use super::errors::{
    explain, join_key, locate_or_section, report, split_path, strip_location, value_kind, Origin, Problem,
};
use super::overrides::{apply_override, keys_overlap, parse_override};
use super::{
    Config, DataConfig, DistillConfig, LoraConfig, ModelConfig, OutputConfig, TrainConfig, TrainData,
    SECTIONS,
};

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
            distill: DistillConfig::default(),
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
    /// Every problem is reported at once, one per line in the order of the file.
    pub fn from_yaml_str(yaml: &str, source_name: &str, overrides: &[String]) -> Result<Config> {
        let file = Origin::File(source_name);
        let (mut doc, exact) = parse_document(yaml, source_name)?;
        let mut problems = Vec::new();
        // Positions of serde_yaml's first error are exact when it read the file's own text.
        let exact_text = exact.then_some(yaml);
        drop_refused_keys(&mut doc, &file, exact_text, yaml, &mut problems);

        let mut applied: Vec<(String, &str)> = Vec::new();
        for set in overrides {
            match apply_checked(&doc, set, yaml) {
                Ok((changed, key)) => {
                    doc = changed;
                    applied.push((key, set.as_str()));
                }
                Err(problem) => problems.push(problem),
            }
        }

        let text = serde_yaml::to_string(&doc).map_err(|e| anyhow!("{source_name}: {e}"))?;
        let mut config: Config = match serde_yaml::from_str(&text) {
            Ok(config) => config,
            Err(e) => {
                problems.push(explain(&e, &file, None, yaml));
                return Err(report(source_name, problems));
            }
        };
        let data = doc.get("data");
        config.data.format_unset = data.and_then(|data| data.get("format")).is_none();
        for invalid in config.check() {
            // A key refused while reading is not refused again for the default that replaced it.
            if problems.iter().any(|p| keys_overlap(&p.key, invalid.key)) {
                continue;
            }
            let by_override = applied.iter().rev().find(|(key, _)| keys_overlap(key, invalid.key));
            let (prefix, location) = match by_override {
                Some((_, set)) => (Origin::Override(set).prefix(None), None),
                None => {
                    let location = locate_or_section(yaml, invalid.key);
                    (file.prefix(location), location)
                }
            };
            let message = format!("{prefix}{}", invalid.message);
            problems.push(Problem { location, key: invalid.key.to_string(), message });
        }
        match problems.is_empty() {
            true => Ok(config),
            false => Err(report(source_name, problems)),
        }
    }

    /// Refuses missing required paths and out-of-range values, naming the key and the allowed
    /// range. [`Config::load`] and [`Config::from_yaml_str`] call it already.
    pub fn validate(&self) -> Result<()> {
        let messages: Vec<String> = self.check().into_iter().map(|invalid| invalid.message).collect();
        match messages.as_slice() {
            [] => Ok(()),
            [single] => Err(anyhow!("{single}")),
            several => Err(anyhow!("{} problems:\n{}", several.len(), several.join("\n"))),
        }
    }

    /// The resolved config as YAML (every key, defaults filled in), to be written into the run
    /// directory. `Config::from_yaml_str(&config.to_yaml(), ..)` gives `config` back once its
    /// data format is detected (`data.format_unset` is not written: the YAML names a format).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("a Config always serializes to YAML")
    }
}

/// Steps 1 and 2a: the file as a YAML mapping of sections, with merge keys (`<<: *anchor`)
/// applied and `x-` sections (holders of anchors) left out; also whether that is the file's
/// text as written, so that serde_yaml's positions in it hold.
fn parse_document(yaml: &str, source_name: &str) -> Result<(Value, bool)> {
    let file = Origin::File(source_name);
    let parsed: Value = serde_yaml::from_str(yaml).map_err(|e| {
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
    match &parsed {
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
    let mut doc = parsed.clone();
    doc.apply_merge().map_err(|e| anyhow!("{}{}", file.prefix(None), strip_location(&e)))?;
    if let Value::Mapping(sections) = &mut doc {
        sections.retain(|key, _| !key.as_str().is_some_and(|k| k.starts_with(ANCHOR_SECTION)));
    }
    let exact = doc == parsed;
    // An empty section (`lora:`) is read from the file's text as one without keys; written
    // back out it would be a `null`, which is not a section.
    if let Value::Mapping(sections) = &mut doc {
        for (_, section) in sections.iter_mut().filter(|(_, section)| section.is_null()) {
            *section = Value::Mapping(Mapping::new());
        }
    }
    Ok((doc, exact))
}

/// Step 2b: reads `doc` as a [`Config`] again and again, recording each key serde_yaml refuses
/// and removing it (its default takes its place), until it reads.
fn drop_refused_keys(
    doc: &mut Value,
    file: &Origin,
    mut exact_text: Option<&str>,
    yaml: &str,
    problems: &mut Vec<Problem>,
) {
    // Each round removes one key, so this bounds the rounds on any file; it is never reached
    // by a config a person writes.
    for _ in 0..MAX_PROBLEMS {
        let generated;
        let text = match exact_text {
            Some(text) => text,
            None => match serde_yaml::to_string(doc) {
                Ok(text) => {
                    generated = text;
                    &generated
                }
                Err(_) => return,
            },
        };
        let Err(e) = serde_yaml::from_str::<Config>(text) else { return };
        let problem = explain(&e, file, exact_text, yaml);
        let removed = remove_key(doc, &problem.key);
        problems.push(problem);
        if !removed {
            return;
        }
        exact_text = None;
    }
}

/// Step 3 for one override: `doc` with `set` applied and the key it set, or the problem that
/// refuses it (the override is then left out).
fn apply_checked(doc: &Value, set: &str, yaml: &str) -> std::result::Result<(Value, String), Problem> {
    let origin = Origin::Override(set);
    let refused = |key: String, message: String| Problem { location: None, key, message };
    let (key, value) = parse_override(set)
        .map_err(|e| refused(set.split('=').next().unwrap_or(set).to_string(), e.to_string()))?;
    let dotted = key.join(".");
    let mut changed = doc.clone();
    apply_override(&mut changed, &key, value)
        .map_err(|msg| refused(dotted.clone(), format!("{}{msg}", origin.prefix(None))))?;
    // Re-serializing keeps serde_yaml's dotted paths in the errors.
    let text = serde_yaml::to_string(&changed)
        .map_err(|e| refused(dotted.clone(), format!("{}{e}", origin.prefix(None))))?;
    match serde_yaml::from_str::<Config>(&text) {
        Ok(_) => Ok((changed, dotted)),
        Err(e) => Err(explain(&e, &origin, None, yaml)),
    }
}

/// Removes the entry at the dotted `key` from `doc`; a key of a user's mapping may itself
/// contain dots (`rank_pattern: {layers.0.q_proj: 4}`), so the longest matching name wins.
fn remove_key(doc: &mut Value, key: &str) -> bool {
    let Value::Mapping(map) = doc else { return false };
    let segments: Vec<&str> = key.split('.').collect();
    for end in (1..=segments.len()).rev() {
        let name = Value::String(segments[..end].join("."));
        if end == segments.len() {
            if map.remove(&name).is_some() {
                return true;
            }
        } else if let Some(child) = map.get_mut(&name) {
            if remove_key(child, &segments[end..].join(".")) {
                return true;
            }
        }
    }
    false
}

/// Top-level keys starting with this hold YAML anchors for merge keys and are not read.
pub(super) const ANCHOR_SECTION: &str = "x-";

/// More problems than this in one config are not looked for.
const MAX_PROBLEMS: usize = 100;
