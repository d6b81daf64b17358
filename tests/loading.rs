//! Loading a model validates before it allocates: the weights' headers against config.json, the
//! shard index's paths, config.json's sizes and tokenizer_config.json for every data format.

mod common;

use lorafit::files::{read_safetensors, safetensors_bytes};
use lorafit::model::{load_model, ModelSpec};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// A copy of the default model in `dir/model`.
fn copy_model(dir: &Path) -> PathBuf {
    let (source, model) = (common::repo().join("data/default-model"), dir.join("model"));
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
    }
    model
}

fn config(model: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap()
}

fn edit_config(model: &Path, edit: impl FnOnce(&mut Value)) {
    let mut value = config(model);
    edit(&mut value);
    std::fs::write(model.join("config.json"), serde_json::to_vec_pretty(&value).unwrap()).unwrap();
}

/// Rewrites `model.safetensors` with `edit` applied to each (name, tensor).
fn edit_tensors(model: &Path, edit: impl Fn(&str, Tensor) -> Tensor) {
    let path = model.join("model.safetensors");
    let tensors: Vec<(String, Tensor)> = read_safetensors(&path)
        .unwrap()
        .into_iter()
        .map(|(name, t)| (name.clone(), edit(&name, t)))
        .collect();
    std::fs::write(&path, safetensors_bytes(&tensors, &[("format", "pt")]).unwrap()).unwrap();
}

fn load_error(model: &Path) -> String {
    match load_model(model, Kind::Float, Device::Cpu) {
        Ok(_) => panic!("{} loaded", model.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// The shape check runs on the headers: the embedding, stored first and full of NaN, is never
/// read, so the error is the lm_head's shape and not the NaN a read would have found.
#[test]
fn a_misshapen_lm_head_is_refused_before_any_data_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_model(tmp.path());
    let c = config(&model);
    let (vocab, hidden) = (c["vocab_size"].as_i64().unwrap(), c["hidden_size"].as_i64().unwrap());
    edit_tensors(&model, |name, t| match name {
        "lm_head.weight" => t.narrow(0, 0, vocab - 1).contiguous(),
        "model.embed_tokens.weight" => t.fill(f64::NAN),
        _ => t,
    });
    let err = load_error(&model);
    for part in [
        "lm_head.weight".to_string(),
        model.join("model.safetensors").display().to_string(),
        format!("{:?}", [vocab - 1, hidden]),
        format!("{:?}", [vocab, hidden]),
    ] {
        assert!(err.contains(&part), "no `{part}` in: {err}");
    }
    assert!(!err.contains("NaN"), "data was read before the shapes were checked: {err}");
}

#[test]
fn a_shard_index_pointing_outside_the_model_directory_is_refused() {
    for outside in ["../../etc/passwd", "/etc/passwd", "shards/../../model.safetensors"] {
        let tmp = tempfile::tempdir().unwrap();
        let model = copy_model(tmp.path());
        let names: Vec<String> =
            read_safetensors(&model.join("model.safetensors")).unwrap().into_iter().map(|(n, _)| n).collect();
        let mut weight_map = serde_json::Map::new();
        for name in &names {
            let file = if name == "lm_head.weight" { outside } else { "model.safetensors" };
            weight_map.insert(name.clone(), file.into());
        }
        let index = model.join("model.safetensors.index.json");
        std::fs::write(&index, json!({"metadata": {}, "weight_map": weight_map}).to_string()).unwrap();
        std::fs::remove_file(model.join("model.safetensors")).unwrap();
        let err = load_error(&model);
        for part in [index.display().to_string(), "`lm_head.weight`".into(), format!("`{outside}`")] {
            assert!(err.contains(&part), "{outside}: no `{part}` in: {err}");
        }
        assert!(err.contains("outside the model directory"), "{outside}: {err}");
    }
}

/// Sizes config.json must give as positive numbers, and head counts that must divide, each
/// refused naming its key.
#[test]
fn config_sizes_that_cannot_make_a_model_are_refused_naming_the_key() {
    let cases: &[(&str, Value, &str)] = &[
        ("max_position_embeddings", json!(0), "max_position_embeddings"),
        ("max_position_embeddings", json!(-5), "max_position_embeddings"),
        ("num_hidden_layers", json!(-1), "num_hidden_layers"),
        ("intermediate_size", json!(0), "intermediate_size"),
        ("vocab_size", json!(0), "vocab_size"),
        ("head_dim", json!(0), "head_dim"),
        ("num_key_value_heads", json!(0), "num_key_value_heads"),
        ("sliding_window", json!(-1), "sliding_window"),
        (
            "rope_parameters",
            json!({"rope_type": "llama3", "original_max_position_embeddings": 0}),
            "original_max_position_embeddings",
        ),
    ];
    for (key, value, named) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let model = copy_model(tmp.path());
        edit_config(&model, |c| c[*key] = value.clone());
        let err =
            format!("{:#}", ModelSpec::from_dir(&model).expect_err(&format!("{key}: {value} accepted")));
        assert!(err.contains(&format!("`{named}`")) && err.contains("config.json"), "{key}: {value}: {err}");
    }
    // Without head_dim the head size is hidden_size / num_attention_heads, which must divide.
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_model(tmp.path());
    edit_config(&model, |c| {
        c.as_object_mut().unwrap().remove("head_dim");
        let hidden = c["hidden_size"].as_i64().unwrap();
        c["num_attention_heads"] = json!(hidden - 1);
        c["num_key_value_heads"] = json!(1);
    });
    let err = format!("{:#}", ModelSpec::from_dir(&model).unwrap_err());
    assert!(err.contains("`hidden_size`") && err.contains("`num_attention_heads`"), "{err}");
}

/// A small completion-format project on `model`; returns the config path and the output dir.
fn completion_project(dir: &Path, model: &Path, max_seq_len: i64) -> (PathBuf, PathBuf) {
    common::write(&dir.join("rows.jsonl"), common::STORY_ROWS);
    let out = dir.join("out");
    let config = dir.join("config.yaml");
    common::write(
        &config,
        &format!(
            "model: {{path: {}}}\ndata: {{train: {}, format: completion, max_seq_len: {max_seq_len}}}\n\
             train: {{max_steps: 1, micro_batch_size: 2}}\noutput: {{dir: {}}}\n",
            model.display(),
            dir.join("rows.jsonl").display(),
            out.display()
        ),
    );
    (config, out)
}

/// Runs `lorafit train config`, which must fail with exit 1 and write nothing; returns stderr.
fn refused_train(config: &Path, out: &Path) -> String {
    let output = common::lorafit(config.parent().unwrap(), &["train", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!out.exists(), "{} was written: {stderr}", out.display());
    stderr
}

#[test]
fn a_corrupt_tokenizer_config_is_reported_for_completion_data() {
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_model(tmp.path());
    let tokenizer_config = model.join("tokenizer_config.json");
    std::fs::write(&tokenizer_config, "{\"bos_token\": ").unwrap();
    let (cfg, out) = completion_project(tmp.path(), &model, 64);
    let stderr = refused_train(&cfg, &out);
    assert!(stderr.contains(&tokenizer_config.display().to_string()), "{stderr}");
    assert!(stderr.contains("not valid JSON"), "{stderr}");
}

/// An example longer than the model has positions for is refused naming `data.max_seq_len`:
/// GPT-2's learned positions end there (the lookup past them used to panic), and a rotary
/// model never saw positions beyond its config's.
#[test]
fn examples_longer_than_the_model_positions_are_refused_naming_max_seq_len() {
    let tmp = tempfile::tempdir().unwrap();
    let long_rows: String =
        (0..4).map(|i| format!("{{\"text\": \"{}\"}}\n", format!("story {i} goes on ").repeat(40))).collect();
    common::write(&tmp.path().join("long.jsonl"), &long_rows);
    let gpt2 = common::fixture("gpt2");
    let positions = ModelSpec::from_dir(&gpt2).unwrap().max_position_embeddings;
    let out = tmp.path().join("out");
    let config = tmp.path().join("gpt2.yaml");
    common::write(
        &config,
        &format!(
            "model: {{path: {}}}\nlora: {{target_modules: all-linear}}\n\
             data: {{train: long.jsonl, format: completion, max_seq_len: {}}}\n\
             train: {{max_steps: 1}}\noutput: {{dir: {}}}\n",
            gpt2.display(),
            4 * positions,
            out.display()
        ),
    );
    let stderr = refused_train(&config, &out);
    assert!(
        stderr.contains("data.max_seq_len") && stderr.contains(&format!("{positions} positions")),
        "{stderr}"
    );

    let model = copy_model(tmp.path());
    edit_config(&model, |c| c["max_position_embeddings"] = json!(16));
    let (config, out) = completion_project(tmp.path(), &model, 64);
    let stderr = refused_train(&config, &out);
    assert!(stderr.contains("data.max_seq_len") && stderr.contains("16 positions"), "{stderr}");
}

/// Decoding stops at GPT-2's last learned position instead of looking up one past it.
#[test]
fn generation_stops_at_the_last_learned_position() {
    let model = load_model(&common::fixture("gpt2"), Kind::Float, Device::Cpu).unwrap();
    let positions = model.spec.max_position_embeddings as usize;
    let prompt: Vec<i64> = (1..positions as i64 - 1).collect();
    let sampling = lorafit::generate::Sampling::GREEDY;
    let new = lorafit::generate::generate(&model, &prompt, 10, &[], &sampling, Device::Cpu, |_| {});
    assert_eq!(prompt.len() + new.len(), positions);
}
