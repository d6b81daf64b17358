//! Step 3 of loading: `--set key.path=value` overrides, applied to the YAML document one at a
//! time.

use anyhow::{anyhow, Result};
use serde_yaml::{Mapping, Value};

use super::errors::{strip_location, Origin};

/// True when setting `set` may have produced the value at `key` (same key, or one contains the
/// other).
pub(super) fn keys_overlap(set: &str, key: &str) -> bool {
    set == key
        || key.strip_prefix(set).is_some_and(|rest| rest.starts_with('.'))
        || set.strip_prefix(key).is_some_and(|rest| rest.starts_with('.'))
}

/// Splits `--set key.path=value` into the key's segments and the value parsed as YAML.
pub(super) fn parse_override(set: &str) -> Result<(Vec<String>, Value)> {
    let prefix = Origin::Override(set).prefix(None);
    let Some((key, value)) = set.split_once('=') else {
        return Err(anyhow!("{prefix}expected `key.path=value`, e.g. `--set train.lr=1e-4`"));
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(anyhow!(
            "{prefix}the key is empty; expected `key.path=value`, e.g. `--set train.lr=1e-4`"
        ));
    }
    let segments: Vec<String> = key.split('.').map(|s| s.trim().to_string()).collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(anyhow!("{prefix}`{key}` has an empty part; keys are written like `train.lr`"));
    }
    let value: Value = serde_yaml::from_str(value).map_err(|e| {
        anyhow!(
            "{prefix}cannot read `{value}` as a YAML value ({}); quote text that starts with a \
             special character, e.g. '\"@text\"'",
            strip_location(&e)
        )
    })?;
    Ok((segments, value))
}

/// Sets `key` (segments) in `doc` to `value`, creating sections that are absent or null.
pub(super) fn apply_override(
    doc: &mut Value,
    key: &[String],
    value: Value,
) -> std::result::Result<(), String> {
    let (leaf, parents) = key.split_last().expect("parse_override returns at least one segment");
    let mut current = doc;
    for (depth, segment) in parents.iter().enumerate() {
        let Value::Mapping(map) = current else { unreachable!("only mappings are descended into") };
        let entry = map.entry(Value::String(segment.clone())).or_insert(Value::Null);
        if entry.is_null() {
            *entry = Value::Mapping(Mapping::new());
        }
        if !entry.is_mapping() {
            return Err(format!(
                "`{}` is a single value, not a section, so `{}` cannot be set",
                key[..=depth].join("."),
                key.join(".")
            ));
        }
        current = entry;
    }
    let Value::Mapping(map) = current else { unreachable!("only mappings are descended into") };
    map.insert(Value::String(leaf.clone()), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_application() {
        let mut doc: Value = serde_yaml::from_str("train:\n  lr: 1\nlora:\n").unwrap();
        let key = |s: &str| s.split('.').map(String::from).collect::<Vec<_>>();
        apply_override(&mut doc, &key("train.epochs"), Value::from(3)).unwrap();
        apply_override(&mut doc, &key("lora.r"), Value::from(4)).unwrap();
        apply_override(&mut doc, &key("output.dir"), Value::from("out")).unwrap();
        assert_eq!(doc["train"]["lr"], Value::from(1));
        assert_eq!(doc["train"]["epochs"], Value::from(3));
        assert_eq!(doc["lora"]["r"], Value::from(4));
        assert_eq!(doc["output"]["dir"], Value::from("out"));
        let err = apply_override(&mut doc, &key("train.lr.x"), Value::from(1)).unwrap_err();
        assert!(err.contains("`train.lr` is a single value"), "{err}");
    }
}
