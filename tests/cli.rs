//! Bad input through the command line: a non-zero exit, one paragraph naming the file, key or
//! line, and nothing written into the run directory.

mod common;

use std::path::Path;

/// Runs `lorafit train run.yaml` in `dir` and returns stderr, checking the run failed cleanly.
fn train_fails(dir: &Path) -> String {
    let out = common::lorafit(dir, &["train", "run.yaml"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "train should fail; stderr: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one paragraph expected: {stderr}");
    let checkpoints = dir.join("checkpoints");
    let written: Vec<_> = std::fs::read_dir(&checkpoints).map(|d| d.collect()).unwrap_or_default();
    assert!(written.is_empty(), "a failed run wrote into {}: {written:?}", checkpoints.display());
    stderr
}

fn project(model: &Path, config_body: &str, data: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    common::write(&tmp.path().join("data.jsonl"), data);
    common::write(
        &tmp.path().join("run.yaml"),
        &format!(
            "model:\n  path: {}\ndata:\n  train: data.jsonl\n  format: completion\n{config_body}",
            model.display()
        ),
    );
    tmp
}

#[test]
fn bad_inputs_fail_before_any_work_and_name_the_culprit() {
    // The shipped default model: these checks need no test assets.
    let model = common::repo().join("data/default-model");

    let p = project(&model, "train:\n  lr_sheduler: cosine\n", common::STORY_ROWS);
    let err = train_fails(p.path());
    assert!(
        err.contains("run.yaml:7") && err.contains("train.lr_sheduler") && err.contains("lr_scheduler"),
        "{err}"
    );

    let p = project(&model, "lora:\n  r: eight\n", common::STORY_ROWS);
    let err = train_fails(p.path());
    assert!(err.contains("run.yaml:7") && err.contains("lora.r"), "{err}");

    let p = project(&model, "lora:\n  r: 0\n", common::STORY_ROWS);
    let err = train_fails(p.path());
    assert!(err.contains("lora.r"), "{err}");

    let p = project(&model.join("missing"), "", common::STORY_ROWS);
    let err = train_fails(p.path());
    assert!(err.contains("missing/config.json"), "{err}");

    let p = project(&model, "", "");
    let err = train_fails(p.path());
    assert!(err.contains("data.jsonl") && err.contains("empty"), "{err}");

    let p = project(&model, "", "{\"text\": \"fine\"}\n{\"text\": broken\n");
    let err = train_fails(p.path());
    assert!(err.contains("data.jsonl:2") && err.contains("not valid JSON"), "{err}");

    let p = project(&model, "", "{\"prompt\": \"wrong column\"}\n");
    let err = train_fails(p.path());
    assert!(err.contains("data.jsonl:1") && err.contains("`text`") && err.contains("prompt"), "{err}");
}

#[test]
fn set_overrides_are_validated_like_the_file() {
    let p = project(&common::repo().join("data/default-model"), "", common::STORY_ROWS);
    let out = common::lorafit(p.path(), &["train", "run.yaml", "--set", "lora.dropout=1.5"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--set lora.dropout=1.5"), "{stderr}");
}

#[test]
fn help_describes_every_flag() {
    let out = common::lorafit(&common::repo(), &["train", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--set", "--overwrite", "CONFIG"] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

#[test]
fn data_preview_marks_trained_tokens() {
    let out = common::lorafit(&common::repo(), &["data", "preview", "configs/default.yaml", "-n", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The Alpaca prompt is masked, the response and EOS are trained.
    assert!(text.contains("### Response:\n[["), "{text}");
    assert!(text.contains("</s>]]"), "{text}");
    assert!(text.contains("468 examples") && text.contains("length histogram"), "{text}");
}

#[test]
fn eval_without_a_config_reads_model_and_data_flags() {
    let args =
        ["eval", "--model", "data/default-model", "--data", "data/default/val.jsonl", "--adapter", "none"];
    let out = common::lorafit(&common::repo(), &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    // The base model has never seen the question format: its loss is well above the trained one.
    assert!(report["eval_loss"].as_f64().unwrap() > 1.0, "{stdout}");
    assert!(report["label_tokens"].as_i64().unwrap() > 300, "{stdout}");
}

/// NaN or infinite base weights are found when the model loads, naming the tensor and its file,
/// before the run directory exists (not as a non-finite loss at the first step).
#[test]
fn non_finite_base_weights_fail_at_load_naming_tensor_and_file() {
    let name = "model.layers.1.mlp.down_proj.weight";
    for (value, what) in [(f64::NAN, "1 NaN"), (f64::NEG_INFINITY, "1 infinite")] {
        let model = tempfile::tempdir().unwrap();
        let fixture = common::fixture("llama3");
        for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(fixture.join(file), model.path().join(file)).unwrap();
        }
        let tensors: Vec<(String, tch::Tensor)> =
            lorafit::files::read_safetensors(&fixture.join("model.safetensors"))
                .unwrap()
                .into_iter()
                .map(|(n, t)| {
                    if n == name {
                        let t = t.copy();
                        let _ = t.view([-1]).get(5).fill_(value);
                        (n, t)
                    } else {
                        (n, t)
                    }
                })
                .collect();
        let bytes = lorafit::files::safetensors_bytes(&tensors, &[]).unwrap();
        std::fs::write(model.path().join("model.safetensors"), bytes).unwrap();
        let p = project(model.path(), "", common::STORY_ROWS);
        let err = train_fails(p.path());
        assert!(err.contains(name) && err.contains("model.safetensors") && err.contains(what), "{err}");
    }
}
