//! Hugging Face `save_to_disk` directories: a `DatasetDict` or a single `Dataset` folder.

use super::{extension, read_file, Rows};
use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn read_json_file(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("cannot read {}: {e}; check the path and its permissions", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "{}:{}: not valid JSON ({e}); write the dataset again with `save_to_disk`",
            path.display(),
            e.line()
        )
    })
}

pub(super) fn read_directory(dir: &Path, split: &str) -> Result<Rows> {
    let dict_file = dir.join("dataset_dict.json");
    if dict_file.is_file() {
        let dict = read_json_file(&dict_file)?;
        let splits: Vec<String> = dict
            .get("splits")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
            .ok_or_else(|| {
                anyhow!(
                    "{} has no `splits` list of names; write the dataset again with \
                     `DatasetDict.save_to_disk`",
                    dict_file.display()
                )
            })?;
        if !splits.iter().any(|s| s == split) {
            bail!(
                "dataset {} has no split `{split}`; the splits present are: {}; choose one of them",
                dir.display(),
                if splits.is_empty() { "(none)".to_string() } else { splits.join(", ") }
            );
        }
        let split_dir = dir.join(split);
        if !split_dir.join("state.json").is_file() {
            bail!(
                "dataset {} lists split `{split}` but {} holds no state.json; the directory is \
                 incomplete, so write it again with `save_to_disk`",
                dir.display(),
                split_dir.display()
            );
        }
        return read_dataset_folder(&split_dir);
    }
    if dir.join("state.json").is_file() {
        return read_dataset_folder(dir);
    }
    let mut hint = String::new();
    if let Some(example) = find_data_file(dir, 3) {
        let ext = extension(&example);
        let parent = example.parent().unwrap_or(dir);
        hint = format!(
            "; to read its files point at them with a pattern such as {}",
            parent.join(format!("*.{ext}")).display()
        );
    }
    bail!(
        "directory {} is neither a Hugging Face DatasetDict (no dataset_dict.json) nor a Dataset \
         saved with `save_to_disk` (no state.json){hint}",
        dir.display()
    )
}

/// A data-looking file within `depth` levels of `dir`, to suggest a pattern.
fn find_data_file(dir: &Path, depth: usize) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).collect();
    entries.sort();
    let data_ext = ["parquet", "arrow", "jsonl", "json", "txt"];
    if let Some(file) = entries.iter().find(|p| p.is_file() && data_ext.contains(&extension(p).as_str())) {
        return Some(file.clone());
    }
    if depth == 0 {
        return None;
    }
    entries.iter().filter(|p| p.is_dir()).find_map(|p| find_data_file(p, depth - 1))
}

/// A `Dataset.save_to_disk` folder: `state.json` names the Arrow shards in order.
fn read_dataset_folder(dir: &Path) -> Result<Rows> {
    let state_file = dir.join("state.json");
    let state = read_json_file(&state_file)?;
    let files: Vec<&str> = state
        .get("_data_files")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|f| f.get("filename").and_then(Value::as_str)).collect::<Option<Vec<_>>>())
        .ok_or_else(|| {
            anyhow!(
                "{} has no `_data_files` list of {{\"filename\": ...}}; write the dataset again \
                 with `save_to_disk`",
                state_file.display()
            )
        })?;
    let mut rows = Rows::default();
    for name in files {
        let file = dir.join(name);
        if !file.is_file() {
            bail!(
                "{} lists {name} but {} does not exist; the dataset is incomplete, so write it \
                 again with `save_to_disk`",
                state_file.display(),
                file.display()
            );
        }
        rows.extend(read_file(&file)?);
    }
    if rows.records.is_empty() && rows.bad.is_empty() {
        bail!("dataset {} holds no rows; it must hold at least one", dir.display());
    }
    Ok(rows)
}
