//! Bad input through the command line: a non-zero exit, one paragraph naming the file, key or
//! line, and nothing written into the run directory.

mod common;

use lorafit::files::{read_safetensors, safetensors_bytes};
use lorafit::lora::peft;
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

/// Runs the binary with `args` in `cwd` and checks it failed with exit code 1 (an error, not a
/// panic) and a message naming `culprit` and every one of `words`.
fn fails_naming(cwd: &Path, args: &[&str], culprit: &Path, words: &[&str]) {
    let out = common::lorafit(cwd, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?} should exit 1; stderr: {stderr}");
    assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    assert!(stderr.contains(&culprit.display().to_string()), "{args:?}: {culprit:?} not named in {stderr}");
    for w in words {
        assert!(stderr.contains(w), "{args:?}: missing {w:?} in {stderr}");
    }
}

/// A copy of the llama3 fixture's PEFT adapter in `dir`, with `edit` applied to its config.
fn adapter_copy(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> std::path::PathBuf {
    let source = common::fixture("llama3").join("adapter");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(source.join(peft::WEIGHTS_FILE), dir.join(peft::WEIGHTS_FILE)).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join(peft::CONFIG_FILE)).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.join(peft::CONFIG_FILE), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    dir.to_path_buf()
}

#[test]
fn bad_adapters_and_rows_exit_1_naming_the_file() {
    let model = common::fixture("llama3");
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let alpha = adapter_copy(&t.join("alpha"), |c| c["lora_alpha"] = "16".into());
    let rank = adapter_copy(&t.join("rank"), |c| c["r"] = "4".into());
    let layers = adapter_copy(&t.join("layers"), |c| c["layers_to_transform"] = "all".into());
    let alpha_config = alpha.join(peft::CONFIG_FILE);
    // An adapter holding an infinity in one lora_B.
    let inf = adapter_copy(&t.join("inf"), |_| {});
    let weights = inf.join(peft::WEIGHTS_FILE);
    let tensors: Vec<(String, tch::Tensor)> = read_safetensors(&weights)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let broken = name.ends_with("layers.0.self_attn.v_proj.lora_B.weight");
            (name, if broken { t.fill(f64::INFINITY) } else { t })
        })
        .collect();
    std::fs::write(&weights, safetensors_bytes(&tensors, &[("format", "pt")]).unwrap()).unwrap();
    let m = model.to_str().unwrap();
    let gguf = t.join("out.gguf");
    let g = gguf.to_str().unwrap();

    for (dir, key) in [(&alpha, "`lora_alpha`"), (&rank, "`r`"), (&layers, "`layers_to_transform`")] {
        let a = dir.to_str().unwrap();
        fails_naming(
            t,
            &["export", "--adapter", a, "--model", m, "--out", g],
            &dir.join(peft::CONFIG_FILE),
            &[key],
        );
    }
    fails_naming(
        t,
        &["export", "--adapter", inf.to_str().unwrap(), "--model", m, "--out", g],
        &weights,
        &["layers.0.self_attn.v_proj.lora_B", "infinite"],
    );
    assert!(!gguf.exists(), "a refused export wrote {}", gguf.display());
    let merged = t.join("merged");
    let a = alpha.to_str().unwrap();
    fails_naming(
        t,
        &["merge", "--model", m, "--adapter", a, "--out", merged.to_str().unwrap()],
        &alpha_config,
        &["`lora_alpha`"],
    );
    common::write(&t.join("val.jsonl"), "{\"instruction\": \"Say hi.\", \"output\": \"hi\"}\n");
    fails_naming(
        t,
        &["eval", "--model", m, "--data", "val.jsonl", "--adapter", a],
        &alpha_config,
        &["`lora_alpha`"],
    );

    // Training: init_from, and rows in error mode.
    let p = project(&model, &format!("lora:\n  init_from: {a}\n"), common::STORY_ROWS);
    fails_naming(p.path(), &["train", "run.yaml"], &alpha_config, &["`lora_alpha`"]);
    let p = project(&model, "", "");
    std::fs::write(p.path().join("data.jsonl"), b"{\"text\": \"fine\"}\n{\"text\": \"caf\xe9\"}\n").unwrap();
    fails_naming(p.path(), &["train", "run.yaml"], Path::new("data.jsonl:2"), &["UTF-8", "on_bad_row"]);
}

/// Trains one step on the default model with `LORAFIT_CPU_BF16` set to `cpu_bf16`; returns
/// (stdout, stderr, config.yaml).
fn one_step(precision: Option<&str>, cpu_bf16: &str) -> (String, String, String) {
    let model = common::repo().join("data/default-model");
    let train = "train:\n  max_steps: 1\n  device: cpu\noutput:\n  run_name: r\n";
    let precision = precision.map(|p| format!("  precision: {p}\n")).unwrap_or_default();
    let p = project(&model, &train.replace("train:\n", &format!("train:\n{precision}")), common::STORY_ROWS);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lorafit"))
        .args(["train", "run.yaml"])
        .current_dir(p.path())
        .env(lorafit::train::precision::CPU_BF16_ENV, cpu_bf16)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stderr}");
    (stdout, stderr, std::fs::read_to_string(p.path().join("checkpoints/r/config.yaml")).unwrap())
}

#[test]
fn precision_auto_follows_the_cpu_and_says_why() {
    let (stdout, stderr, config) = one_step(None, "1");
    assert!(
        stdout.contains("precision bf16-mixed (auto: LORAFIT_CPU_BF16=1 says this CPU has native bf16)"),
        "{stdout}"
    );
    assert!(stdout.contains("bf16 weights) on the CPU") && !stderr.contains("warning"), "{stdout}{stderr}");
    // The run directory keeps `auto`, so the file picks again on the machine it runs on.
    assert!(
        config.starts_with("# precision used: bf16-mixed (auto:") && config.contains("precision: auto"),
        "{config}"
    );

    let (stdout, stderr, _) = one_step(None, "0");
    assert!(
        stdout.contains("precision fp32 (auto: LORAFIT_CPU_BF16=0 says this CPU has no native bf16; bf16 would be emulated)"),
        "{stdout}"
    );
    assert!(stdout.contains("fp32 weights) on the CPU") && !stderr.contains("warning"), "{stdout}{stderr}");

    // Asked for explicitly, bf16-mixed runs, with a warning where it is emulated.
    let (stdout, stderr, _) = one_step(Some("bf16-mixed"), "0");
    assert!(stdout.contains("precision bf16-mixed (set in the config)"), "{stdout}");
    assert!(
        stderr.contains("warning: train.precision is bf16-mixed but")
            && stderr.contains("7× slower than fp32"),
        "{stderr}"
    );
    let (_, stderr, _) = one_step(Some("bf16-mixed"), "1");
    assert!(!stderr.contains("warning"), "{stderr}");
}
