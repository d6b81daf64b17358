//! What the commands that write or read a run's outputs do with what the user gives them:
//! `export` never replaces a file unasked, and `export`, `merge` and `eval` find the base model
//! an adapter names in its `adapter_config.json` when `--model` is left out (a relative name
//! beside the adapter first, then in the working directory).

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
fn export_merge_eval_and_generate_take_the_base_model_the_adapter_names() {
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

    // generate: the same answer as with --model.
    let answer = |args: &[&str]| {
        let out = common::lorafit(t, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let prompt = ["--prompt", "Count to 3.", "--max-new-tokens", "8"];
    let given = answer(&[&["generate", "--adapter", a, "--model", m][..], &prompt].concat());
    let found = answer(&[&["generate", "--adapter", a][..], &prompt].concat());
    assert!(!given.trim().is_empty());
    assert_eq!(given, found);
}

#[test]
fn a_relative_base_is_found_beside_the_adapter_before_the_working_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // run/adapter names `../model`, which is run/model, not a directory of the working directory.
    std::fs::create_dir_all(t.join("run")).unwrap();
    std::os::unix::fs::symlink(common::fixture("llama3"), t.join("run/model")).unwrap();
    let adapter = adapter_naming(&t.join("run/adapter"), "../model");
    let a = adapter.to_str().unwrap();
    let m = common::fixture("llama3");
    let given = common::lorafit(
        t,
        &["export", "--adapter", a, "--model", m.to_str().unwrap(), "--out", "given.gguf"],
    );
    assert!(given.status.success(), "{}", stderr(&given));
    let found = common::lorafit(t, &["export", "--adapter", a, "--out", "found.gguf"]);
    assert!(found.status.success(), "{}", stderr(&found));
    let said = stderr(&found);
    assert!(said.contains(&format!("using the base model {}", adapter.join("../model").display())), "{said}");
    assert_eq!(std::fs::read(t.join("given.gguf")).unwrap(), std::fs::read(t.join("found.gguf")).unwrap());

    // A name relative to the working directory still works when nothing beside the adapter has it.
    let cwd_named = adapter_naming(&t.join("other/adapter"), "run/model");
    let out = common::lorafit(t, &["export", "--adapter", cwd_named.to_str().unwrap(), "--out", "cwd.gguf"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(t.join("given.gguf")).unwrap(), std::fs::read(t.join("cwd.gguf")).unwrap());
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

/// Runs `lorafit` with `args` in `cwd`, expecting success.
fn succeeds(cwd: &Path, args: &[&str]) -> std::process::Output {
    let out = common::lorafit(cwd, args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    out
}

#[test]
fn an_interrupted_run_with_a_generated_name_says_how_to_continue_and_resumes() {
    let Some(assets) = common::assets() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    common::write(&t.join("stories.jsonl"), &(0..3).map(|_| common::STORY_ROWS).collect::<String>());
    common::write(
        &t.join("run.yaml"),
        &format!(
            "model: {{path: {}}}\ndata: {{train: stories.jsonl, format: completion, max_seq_len: 48}}\n\
             train: {{max_steps: 500, micro_batch_size: 1, save_every: 1, threads: 1}}\n",
            common::stories260k(&assets).display()
        ),
    );
    // A finished run of another config in the same place is not the one to resume.
    succeeds(t, &["train", "run.yaml", "--set", "train.max_steps=1", "--set", "lora.r=2"]);
    let other: Vec<PathBuf> =
        std::fs::read_dir(t.join("checkpoints")).unwrap().map(|e| e.unwrap().path()).collect();

    let child = std::process::Command::new(env!("CARGO_BIN_EXE_lorafit"))
        .args(["train", "run.yaml"])
        .current_dir(t)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let run = loop {
        let runs = std::fs::read_dir(t.join("checkpoints")).unwrap().map(|e| e.unwrap().path());
        if let Some(run) = runs.filter(|r| !other.contains(r)).find(|r| r.join("step-2").exists()) {
            break run;
        }
        assert!(started.elapsed().as_secs() < 120, "no checkpoint 2");
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let kill = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let message = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{message}");
    let name = run.file_name().unwrap().to_str().unwrap();
    let command = format!("lorafit train run.yaml --resume checkpoints/{name}");
    assert!(message.contains(&format!("The run is in checkpoints/{name}")), "{message}");
    assert!(message.contains(&format!("continue it with:\n  {command}\n")), "{message}");
    let step: usize =
        message.split("interrupted after step ").nth(1).unwrap().split(';').next().unwrap().parse().unwrap();

    // `--resume` alone finds the run by its config; the printed command continues it too.
    let more = format!("train.max_steps={}", step + 1);
    succeeds(t, &["train", "run.yaml", "--resume", "--set", &more]);
    assert!(run.join(format!("step-{}", step + 1)).join("trainer_state.json").exists());
    let mut words: Vec<String> = command.split(' ').skip(1).map(str::to_string).collect();
    words.extend(["--set".to_string(), format!("train.max_steps={}", step + 2)]);
    succeeds(t, &words.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(run.join(format!("step-{}", step + 2)).join("trainer_state.json").exists());
    assert!(run.join("adapter").exists());
}

/// `eval --data FILE` without a config reads the file in the format its records have, as
/// `train` with that format set would.
#[test]
fn eval_of_a_bare_data_file_detects_its_format() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    common::write(&t.join("stories.jsonl"), common::STORY_ROWS);
    let model = common::repo().join("data/default-model");
    let m = model.to_str().unwrap();
    let eval = |extra: &[&str]| {
        let args =
            [&["eval", "--model", m, "--data", "stories.jsonl", "--adapter", "none"][..], extra].concat();
        let out = common::lorafit(t, &args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let detected = eval(&[]);
    assert!(detected.starts_with("eval loss "), "{detected}");
    assert_eq!(detected, eval(&["--set", "data.format=completion"]));
}
