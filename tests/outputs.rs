//! What the commands that write or read a run's outputs do with what the user gives them:
//! `export` never replaces a file unasked, and `export`, `merge` and `eval` find the base model
//! an adapter names in its `adapter_config.json` when `--model` is left out.

mod common;

use lorafit::lora::peft;
use std::path::{Path, PathBuf};

/// A copy of the llama3 fixture's adapter in `dir` whose `base_model_name_or_path` is `base`.
fn adapter_naming(dir: &Path, base: &str) -> PathBuf {
    let source = common::fixture("llama3").join("adapter");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(source.join(peft::WEIGHTS_FILE), dir.join(peft::WEIGHTS_FILE)).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join(peft::CONFIG_FILE)).unwrap()).unwrap();
    config["base_model_name_or_path"] = base.into();
    std::fs::write(dir.join(peft::CONFIG_FILE), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    dir.to_path_buf()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn export_replaces_an_existing_file_only_with_force() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = common::fixture("llama3");
    let adapter = adapter_naming(&t.join("adapter"), model.to_str().unwrap());
    let gguf = t.join("adapter.gguf");
    std::fs::write(&gguf, "an earlier export").unwrap();
    let args = ["export", "--adapter", adapter.to_str().unwrap(), "--model", model.to_str().unwrap()];
    let args: Vec<&str> = args.into_iter().chain(["--out", gguf.to_str().unwrap()]).collect();

    let out = common::lorafit(t, &args);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(message.contains(&gguf.display().to_string()) && message.contains("--force"), "{message}");
    assert_eq!(std::fs::read_to_string(&gguf).unwrap(), "an earlier export", "the file was replaced");

    let forced: Vec<&str> = args.iter().copied().chain(["--force"]).collect();
    let out = common::lorafit(t, &forced);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(&std::fs::read(&gguf).unwrap()[..4], b"GGUF");
}

#[test]
fn export_merge_and_eval_take_the_base_model_the_adapter_names() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = common::fixture("llama3");
    let m = model.to_str().unwrap();
    let named = adapter_naming(&t.join("named"), m);
    let a = named.to_str().unwrap();

    // export: the same file as with --model, and the model used is said.
    let run = |args: &[&str]| {
        let out = common::lorafit(t, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stderr(&out)
    };
    run(&["export", "--adapter", a, "--model", m, "--out", "given.gguf"]);
    let said = run(&["export", "--adapter", a, "--out", "found.gguf"]);
    assert!(said.contains(&format!("using the base model {m}")), "{said}");
    assert_eq!(std::fs::read(t.join("given.gguf")).unwrap(), std::fs::read(t.join("found.gguf")).unwrap());

    // merge: the same weights as with --model.
    run(&["merge", "--adapter", a, "--model", m, "--out", "merged-given"]);
    run(&["merge", "--adapter", a, "--out", "merged-found"]);
    let weights = |dir: &str| std::fs::read(t.join(dir).join("model.safetensors")).unwrap();
    assert_eq!(weights("merged-given"), weights("merged-found"));

    // eval: the same loss as with --model.
    let rows = (0..4)
        .map(|i| {
            format!(
                "{{\"instruction\": \"Count to {i}.\", \"input\": \"\", \"output\": \"{i} and done.\"}}\n"
            )
        })
        .collect::<String>();
    common::write(&t.join("eval.jsonl"), &rows);
    let eval = |args: &[&str]| {
        let out = common::lorafit(t, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let given = eval(&["eval", "--adapter", a, "--model", m, "--data", "eval.jsonl"]);
    let found = eval(&["eval", "--adapter", a, "--data", "eval.jsonl"]);
    assert!(given.starts_with("eval loss "), "{given}");
    assert_eq!(given, found);
}

#[test]
fn an_adapter_whose_base_is_not_here_needs_model() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let elsewhere = adapter_naming(&t.join("hub"), "meta-llama/Llama-3.2-1B");
    let out = common::lorafit(t, &["export", "--adapter", elsewhere.to_str().unwrap(), "--out", "x.gguf"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let message = stderr(&out);
    let config = elsewhere.join(peft::CONFIG_FILE);
    for words in [config.display().to_string().as_str(), "meta-llama/Llama-3.2-1B", "--model DIR"] {
        assert!(message.contains(words), "{words:?} not in {message}");
    }
    assert!(!t.join("x.gguf").exists());
}
