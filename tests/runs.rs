//! Runs people can trust: exact resume, checkpoints that survive SIGKILL, a clean Ctrl-C, and
//! `lorafit eval` reproducing the logged evaluation.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Twelve short stories: with packing into rows of 48 tokens, an epoch is a few steps.
fn project(tmp: &Path, extra: &str) -> PathBuf {
    let assets = common::assets().expect("checked by the caller");
    let rows: String = (0..3).map(|_| common::STORY_ROWS).collect();
    common::write(&tmp.join("stories.jsonl"), &rows);
    common::write(&tmp.join("val.jsonl"), common::STORY_ROWS);
    common::write(
        &tmp.join("run.yaml"),
        &format!(
            "model: {{path: {}}}\n\
             lora: {{r: 4, alpha: 8, dropout: 0.1, target_modules: all-linear}}\n\
             data: {{train: stories.jsonl, validation: val.jsonl, format: completion, max_seq_len: 48, packing: true}}\n\
             train: {{max_steps: 10, micro_batch_size: 1, grad_accum_steps: 2, lr: 0.01, save_every: 1, threads: 1}}\n\
             {extra}",
            common::stories260k(&assets).display()
        ),
    );
    tmp.join("run.yaml")
}

fn train(dir: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["train", "run.yaml"];
    all.extend_from_slice(args);
    let out = common::lorafit(dir, &all);
    assert!(out.status.success(), "lorafit {all:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("train/loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["train/loss"].as_f64().unwrap()))
        .collect()
}

fn state(checkpoint: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(checkpoint.join("trainer_state.json")).unwrap()).unwrap()
}

fn adapter_bytes(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn resuming_gives_the_same_adapter_and_losses_as_a_straight_run() {
    if common::assets().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    project(tmp.path(), "output: {run_name: straight}\n");
    train(tmp.path(), &[]);
    let straight = tmp.path().join("checkpoints/straight");
    let straight_losses = losses(&straight);
    assert_eq!(straight_losses.len(), 10);

    // One resume point in the middle of an epoch, and one at the end of an epoch (the next
    // step starts a new one).
    let epoch_of = |k: usize| state(&straight.join(format!("step-{k}")))["epoch"].as_u64().unwrap();
    let boundary =
        (1..9).find(|&k| epoch_of(k + 1) > epoch_of(k)).expect("an epoch boundary within 10 steps");
    let middle = (1..9).find(|&k| epoch_of(k + 1) == epoch_of(k) && k != boundary).expect("a mid-epoch step");
    for k in [middle, boundary] {
        let name = format!("resumed-{k}");
        let run = tmp.path().join("checkpoints").join(&name);
        copy_dir(&straight.join(format!("step-{k}")), &run.join(format!("step-{k}")));
        train(tmp.path(), &["--set", &format!("output.run_name={name}"), "--resume"]);
        assert_eq!(adapter_bytes(&run), adapter_bytes(&straight), "resumed at step {k}: adapters differ");
        let resumed: Vec<(u64, f64)> = losses(&run);
        let expected: Vec<(u64, f64)> =
            straight_losses.iter().copied().filter(|(s, _)| *s > k as u64).collect();
        assert_eq!(resumed, expected, "resumed at step {k}: losses differ");
    }
}

/// Starts `lorafit train` and returns it with its run directory.
fn spawn(dir: &Path, name: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_lorafit"))
        .args(["train", "run.yaml", "--set", &format!("output.run_name={name}")])
        .args(["--set", "train.max_steps=40"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for_step(run: &Path, step: usize) {
    let started = Instant::now();
    while !run.join(format!("step-{step}/trainer_state.json")).exists() {
        assert!(started.elapsed() < Duration::from_secs(120), "no checkpoint {step} in {}", run.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_run_killed_at_any_moment_resumes_to_the_uninterrupted_result() {
    if common::assets().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    project(tmp.path(), "");
    train(tmp.path(), &["--set", "output.run_name=straight", "--set", "train.max_steps=40"]);
    let straight = tmp.path().join("checkpoints/straight");

    // SIGKILL right after checkpoints appear and at odd moments in between (mid-step and
    // mid-save), each time resuming from what survived.
    let run = tmp.path().join("checkpoints/killed");
    let mut child = spawn(tmp.path(), "killed");
    for (after_step, extra_ms) in [(2, 0), (6, 3), (11, 7), (17, 1)] {
        wait_for_step(&run, after_step);
        std::thread::sleep(Duration::from_millis(extra_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        // What a kill in the middle of a save leaves behind, whatever moment the kill above hit:
        // a staging directory, and a step directory without its state file (written last).
        common::write(
            &run.join(format!(".step-{}.tmp-99999/adapter_model.safetensors", after_step + 1)),
            "partial",
        );
        common::write(&run.join(format!("step-{}/optimizer.safetensors", after_step + 50)), "partial");
        child = Command::new(env!("CARGO_BIN_EXE_lorafit"))
            .args([
                "train",
                "run.yaml",
                "--set",
                "output.run_name=killed",
                "--set",
                "train.max_steps=40",
                "--resume",
            ])
            .current_dir(tmp.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(adapter_bytes(&run), adapter_bytes(&straight));
    assert_eq!(losses(&run), losses(&straight));
    let leftovers: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.starts_with('.') || n.strip_prefix("step-").is_some_and(|k| k.parse::<usize>().unwrap() > 40)
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_130() {
    if common::assets().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    project(tmp.path(), "");
    let run = tmp.path().join("checkpoints/interrupted");
    let child = spawn(tmp.path(), "interrupted");
    wait_for_step(&run, 2);
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted after step") && stderr.contains("--resume"), "{stderr}");
    let step = stderr.split("interrupted after step ").nth(1).unwrap().split(';').next().unwrap();
    assert!(run.join(format!("step-{step}/trainer_state.json")).exists(), "{stderr}");
    assert!(!run.join("adapter").exists());
}

#[test]
fn eval_reproduces_the_logged_loss_of_the_best_adapter() {
    if common::assets().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    project(tmp.path(), "output: {run_name: evaluated}\n");
    train(
        tmp.path(),
        &["--set", "train.eval_every=3", "--set", "train.save_best=true", "--set", "train.save_every=null"],
    );
    let run = tmp.path().join("checkpoints/evaluated");
    let best = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["eval/loss"].as_f64())
        .fold(f64::INFINITY, f64::min);
    let out =
        common::lorafit(tmp.path(), &["eval", "run.yaml", "--adapter", run.join("best").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    let loss = report["eval_loss"].as_f64().unwrap();
    assert!((loss - best).abs() <= 1e-5, "eval {loss} vs logged best {best}");
}

#[test]
fn an_unwritable_output_directory_fails_before_training() {
    if common::assets().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    project(tmp.path(), "output: {dir: /proc/lorafit-runs}\n");
    let out = common::lorafit(tmp.path(), &["train", "run.yaml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("/proc/lorafit-runs"), "{stderr}");
    assert!(!stderr.contains("step 1"), "{stderr}");
}

#[test]
fn a_damaged_checkpoint_is_refused_before_the_run_directory_is_touched() {
    if common::assets().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    project(tmp.path(), "output: {run_name: damaged}\n");
    train(tmp.path(), &["--set", "train.max_steps=2"]);
    let run = tmp.path().join("checkpoints/damaged");
    let config_before = std::fs::read_to_string(run.join("config.yaml")).unwrap();
    let optimizer = run.join("step-2/optimizer.safetensors");
    std::fs::write(&optimizer, b"not a safetensors file").unwrap();

    let out = common::lorafit(tmp.path(), &["train", "run.yaml", "--resume", "--set", "train.max_steps=4"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("step-2/optimizer.safetensors"), "{stderr}");
    // The resumed run's config (max_steps 4) was not written over the run's own.
    assert_eq!(std::fs::read_to_string(run.join("config.yaml")).unwrap(), config_before);
}

#[test]
fn a_non_finite_loss_stops_the_run_naming_the_step_or_is_skipped() {
    if common::assets().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    project(tmp.path(), "");
    // An absurd learning rate overflows the adapter after the first update.
    let args = ["train", "run.yaml", "--set", "train.lr=1e38", "--set", "train.max_grad_norm=null"];
    let out = common::lorafit(tmp.path(), &[&args[..], &["--set", "output.run_name=stopped"]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("non-finite") && stderr.contains("at step 2"), "{stderr}");
    assert!(stderr.contains("stopped/step-1"), "the last good checkpoint is named: {stderr}");

    let skip = [
        "--set",
        "output.run_name=skipped",
        "--set",
        "train.on_nonfinite=skip",
        "--set",
        "train.max_steps=4",
    ];
    let out = common::lorafit(tmp.path(), &[&args[..], &skip[..]].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("3 non-finite steps skipped"), "{stdout}");
}

#[test]
fn json_log_format_prints_one_object_per_step_on_stdout() {
    if common::assets().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    project(tmp.path(), "");
    let out = train(
        tmp.path(),
        &["--log-format", "json", "--set", "train.max_steps=3", "--set", "train.eval_every=3"],
    );
    let records: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let events: Vec<(&str, u64)> =
        records.iter().map(|r| (r["event"].as_str().unwrap(), r["step"].as_u64().unwrap())).collect();
    assert_eq!(events, vec![("train", 1), ("train", 2), ("train", 3), ("eval", 3)]);
    assert!(records[0]["train/loss"].as_f64().unwrap() > 0.0);
    assert!(String::from_utf8_lossy(&out.stderr).contains("trained 3 steps"));
}

/// `lorafit train run.yaml ARGS...`, started in `dir`.
fn spawn_train(dir: &Path, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_lorafit"))
        .args(["train", "run.yaml"])
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs `lorafit` expecting exit code 1, and returns its stderr.
fn refused(dir: &Path, args: &[&str]) -> String {
    let out = common::lorafit(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "lorafit {args:?} was not refused: {stderr}");
    stderr
}

#[test]
fn a_resume_that_changes_what_the_run_computes_is_refused_before_anything_is_written() {
    if common::assets().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    project(tmp.path(), "output: {run_name: changed}\n");
    train(tmp.path(), &["--set", "train.max_steps=2"]);
    let run = tmp.path().join("checkpoints/changed");
    let config_before = std::fs::read(run.join("config.yaml")).unwrap();
    let metrics_before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    // Other data in a file of another name: the data identity, not the path, is compared.
    common::write(&tmp.path().join("other.jsonl"), common::STORY_ROWS);
    let resume = ["train", "run.yaml", "--resume", "--set", "train.max_steps=4"];
    for (set, key) in [
        ("train.seed=7", "train.seed"),
        ("train.micro_batch_size=2", "train.micro_batch_size"),
        ("train.grad_accum_steps=1", "train.grad_accum_steps"),
        ("lora.r=16", "lora.r"),
        ("data.max_seq_len=32", "data.max_seq_len"),
        ("data.train=other.jsonl", "data "),
    ] {
        let stderr = refused(tmp.path(), &[&resume[..], &["--set", set]].concat());
        assert!(
            stderr.contains(&format!("  {key}")) && stderr.contains("--resume-anyway"),
            "{set}: {stderr}"
        );
        assert_eq!(std::fs::read(run.join("config.yaml")).unwrap(), config_before, "{set}");
        assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), metrics_before, "{set}");
        assert!(!run.join("step-3").exists() && !run.join("resumed_with_changes.txt").exists(), "{set}");
    }

    // Settings that do not change the steps are accepted silently.
    let out = train(tmp.path(), &["--resume", "--set", "train.max_steps=3", "--set", "train.log_every=2"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("changed settings"));
    assert!(!run.join("resumed_with_changes.txt").exists());

    // --resume-anyway accepts a change and records it in the console and the run.
    let out = train(
        tmp.path(),
        &["--resume", "--resume-anyway", "--set", "train.max_steps=4", "--set", "train.seed=7"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("changed settings (--resume-anyway): train.seed ") && stdout.contains(" → 7"),
        "{stdout}"
    );
    let record = std::fs::read_to_string(run.join("resumed_with_changes.txt")).unwrap();
    assert!(
        record.contains("after step 3") && record.contains("train.seed ") && record.contains(" → 7"),
        "{record}"
    );
    assert_eq!(losses(&run).last().unwrap().0, 4);
}

#[test]
fn resuming_a_checkpoint_path_writes_only_into_its_run_directory() {
    if common::assets().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    project(tmp.path(), "output: {run_name: source}\n");
    train(tmp.path(), &["--set", "train.max_steps=2"]);
    let run = tmp.path().join("checkpoints/source");
    let elsewhere = tmp.path().join("kept/step-2");
    copy_dir(&run.join("step-2"), &elsewhere);
    let stderr = refused(tmp.path(), &["train", "run.yaml", "--resume", elsewhere.to_str().unwrap()]);
    assert!(stderr.contains("outside a run directory"), "{stderr}");
    let kept: Vec<_> =
        std::fs::read_dir(tmp.path().join("kept")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(kept, ["step-2"]);

    // A checkpoint inside its run directory resumes that run, whatever the config names.
    let step = run.join("step-2");
    train(
        tmp.path(),
        &["--set", "output.run_name=other", "--set", "train.max_steps=3", "--resume", step.to_str().unwrap()],
    );
    assert_eq!(losses(&run).last().unwrap().0, 3);
    assert!(!tmp.path().join("checkpoints/other").exists());
}

#[test]
fn a_run_killed_before_its_first_checkpoint_says_there_is_none_yet() {
    if common::assets().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    project(tmp.path(), "output: {run_name: early}\n");
    train(tmp.path(), &["--set", "train.max_steps=1"]);
    // What a kill before the first save leaves: the run directory without any step-N/.
    let run = tmp.path().join("checkpoints/early");
    std::fs::remove_dir_all(run.join("step-1")).unwrap();
    std::fs::remove_dir_all(run.join("adapter")).unwrap();
    let stderr = refused(tmp.path(), &["train", "run.yaml", "--resume"]);
    assert!(stderr.contains("no checkpoint yet") && stderr.contains("--overwrite"), "{stderr}");
    assert!(!stderr.contains("set train.save_every"), "{stderr}");
}

#[test]
fn a_run_directory_belongs_to_one_process_and_survives_kills_during_resumes() {
    if common::assets().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    project(tmp.path(), "");
    let steps = ["--set", "train.max_steps=40"];
    train(tmp.path(), &[&steps[..], &["--set", "output.run_name=straight"]].concat());
    let straight = tmp.path().join("checkpoints/straight");

    let named = ["--set", "output.run_name=locked"];
    let run = tmp.path().join("checkpoints/locked");
    let mut child = spawn_train(tmp.path(), &[&steps[..], &named[..]].concat());
    wait_for_step(&run, 2);
    child.kill().unwrap();
    child.wait().unwrap();
    // A resume holds the run: a second resume, a new run and --overwrite are refused naming it,
    // and nothing of the run is removed.
    let resume = [&steps[..], &named[..], &["--resume"]].concat();
    let mut child = spawn_train(tmp.path(), &resume);
    wait_for_step(&run, 4);
    let holder = format!("process {}", child.id());
    let second = [&["train", "run.yaml"][..], &resume[..]].concat();
    let fresh = ["train", "run.yaml", "--set", "output.run_name=locked"];
    let overwrite = [&fresh[..], &["--overwrite"]].concat();
    for args in [&second[..], &fresh[..], &overwrite[..]] {
        let stderr = refused(tmp.path(), args);
        assert!(stderr.contains(&holder) && stderr.contains("checkpoints/locked"), "{args:?}: {stderr}");
        assert!(run.join("step-4/trainer_state.json").exists() && run.join("config.yaml").exists());
    }
    // Killed during the resume, with the staging files of killed writers left behind.
    std::thread::sleep(Duration::from_millis(3));
    child.kill().unwrap();
    child.wait().unwrap();
    for leftover in [".config.yaml.tmp-99999", ".metrics.jsonl.tmp-99999", ".write-test.tmp-99999"] {
        common::write(&run.join(leftover), "partial");
    }
    common::write(&run.join(".adapter.tmp-99999/adapter_model.safetensors"), "partial");
    let out = spawn_train(tmp.path(), &resume).wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(adapter_bytes(&run), adapter_bytes(&straight));
    assert_eq!(losses(&run), losses(&straight));
    let hidden: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
}
