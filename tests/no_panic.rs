//! Nothing a user gives makes lorafit panic: sampling flags out of range and a run too large for
//! the memory it can get are errors (exit 1) that name the flag or setting, with no panic message.
//! (libtorch running out of memory in a step is `torch_errors`' unit test: under `ulimit -v` the
//! process fails in too many places, some of them libtorch's own aborts, for a stable test.)

mod common;

use std::path::Path;
use std::process::{Command, Output};

/// `lorafit args` in `cwd` under `ulimit -v limit_kb` (virtual memory, in KiB).
fn lorafit_limited(cwd: &Path, limit_kb: u64, args: &[&str]) -> Output {
    Command::new("sh")
        .args(["-c", "ulimit -v \"$1\" && shift && exec \"$@\"", "sh", &limit_kb.to_string()])
        .arg(env!("CARGO_BIN_EXE_lorafit"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run sh")
}

/// Asserts `out` is lorafit's error exit (1), not a panic (101), and returns its stderr.
fn error_exit(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{what}: {stderr}");
    stderr
}

#[test]
fn sampling_flags_out_of_range_are_refused_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::repo().join("data/default-model");
    let model = model.to_str().unwrap();
    let generate = |flag: &str, value: &str| {
        let setting = format!("{flag}={value}");
        common::lorafit(
            tmp.path(),
            &["generate", "--model", model, "--prompt", "Hi", "--max-new-tokens", "2", &setting],
        )
    };
    for (flag, value) in [
        ("--temperature", "nan"),
        ("--temperature", "-1"),
        ("--temperature", "inf"),
        ("--top-p", "2"),
        ("--top-p", "0"),
        ("--top-p", "nan"),
        ("--top-k", "-1"),
    ] {
        let stderr = error_exit(&generate(flag, value), &format!("{flag} {value}"));
        assert!(stderr.contains(&format!("{flag} ")), "{flag} {value}: {stderr}");
    }
    // transformers' meanings: top-k 0 is no limit, top-p 1 keeps every token, temperature 0 is greedy.
    for (flag, value) in [("--top-k", "0"), ("--top-p", "1"), ("--temperature", "0")] {
        let out = generate(flag, value);
        assert!(out.status.success(), "{flag} {value}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // A temperature so small that dividing by it overflows samples the most likely token.
    let greedy = generate("--temperature", "0");
    let tiny = generate("--temperature", "1e-300");
    assert!(tiny.status.success(), "{}", String::from_utf8_lossy(&tiny.stderr));
    assert_eq!(tiny.stdout, greedy.stdout);
}

#[test]
fn a_run_too_large_for_its_memory_is_refused_before_it_allocates() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = common::repo();
    let set = |key: &str, path: &str| format!("{key}={}", repo.join(path).display());
    let (model, train, val) = (
        set("model.path", "data/default-model"),
        set("data.train", "data/default/train.jsonl"),
        set("data.validation", "data/default/val.jsonl"),
    );
    let config = repo.join("configs/default.yaml");
    let mut args = vec!["train", config.to_str().unwrap(), "--set", &model, "--set", &train, "--set", &val];
    args.extend(["--set", "lora.r=100000", "--set", "output.dir=out"]);
    let started = std::time::Instant::now();
    let out = lorafit_limited(tmp.path(), 8_000_000, &args);
    let stderr = error_exit(&out, "lora.r 100000 under ulimit -v 8 GB");
    assert!(stderr.contains("lora.r") && stderr.contains("ulimit -v"), "{stderr}");
    assert!(started.elapsed().as_secs() < 30, "refused only after {:?}", started.elapsed());
    assert!(!tmp.path().join("out").exists(), "a refused run writes nothing");
}
