//! Shared by the integration tests: where the real assets and the Python venv are, and small
//! helpers to run the binary.
#![allow(dead_code)]

pub mod peft_check;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The real-model assets, from `LORAFIT_ASSETS` (scripts/test.sh sets it when they exist), or
/// `None` after [`skip`] when it is not set.
pub fn assets() -> Option<PathBuf> {
    match std::env::var_os("LORAFIT_ASSETS").filter(|v| !v.is_empty()) {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            assert!(dir.join("README.md").exists(), "LORAFIT_ASSETS={} has no README.md", dir.display());
            Some(dir)
        }
        None => {
            skip("LORAFIT_ASSETS is not set (scripts/test.sh sets it when ../shared/assets exists)");
            None
        }
    }
}

pub fn stories260k(assets: &Path) -> PathBuf {
    assets.join("models/stories260K/hf")
}

/// The Python of the interop venv, from `LORAFIT_INTEROP_PYTHON` (scripts/test.sh installs it and
/// sets it), or `None` after [`skip`] when it is not set.
pub fn python() -> Option<PathBuf> {
    match std::env::var_os("LORAFIT_INTEROP_PYTHON").filter(|v| !v.is_empty()) {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            skip("LORAFIT_INTEROP_PYTHON is not set (scripts/test.sh installs the venv and sets it)");
            None
        }
    }
}

/// The one way a test declines to run for want of something this machine lacks; the caller
/// returns right after. A bare skip would pass silently, so it is made visible:
/// - with `LORAFIT_REQUIRE_ASSETS=1` (set by .ci/run, where everything is present) the test fails;
/// - otherwise it prints why, and appends `<test binary>::<test>\t<reason>` to the file named by
///   `LORAFIT_SKIP_LOG`, from which scripts/test.sh reports how many tests did not run.
pub fn skip(reason: &str) {
    record_skip(reason, true);
}

/// A skip for want of hardware the test machines do not have (a CUDA GPU): counted and reported
/// like [`skip`], but not failed by `LORAFIT_REQUIRE_ASSETS=1`, since no asset can supply it.
/// These tests run in scripts/gpu/check.sh on a GPU machine.
pub fn skip_without_hardware(reason: &str) {
    record_skip(reason, false);
}

fn record_skip(reason: &str, required_by_ci: bool) {
    let thread = std::thread::current();
    // libtest names each test's thread after the test.
    let test = format!("{}::{}", env!("CARGO_CRATE_NAME"), thread.name().unwrap_or("?"));
    if required_by_ci && std::env::var_os("LORAFIT_REQUIRE_ASSETS").is_some_and(|v| v == "1") {
        panic!("{test} cannot run: {reason}; LORAFIT_REQUIRE_ASSETS=1 requires every test to run");
    }
    eprintln!("skipped: {reason}");
    if let Some(log) = std::env::var_os("LORAFIT_SKIP_LOG").filter(|v| !v.is_empty()) {
        use std::io::Write;
        // One write of one short line to a file opened for appending: lines from tests running
        // in parallel do not interleave.
        let line = format!("{test}\t{}\n", reason.replace(['\n', '\t'], " "));
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!("cannot record the skip in LORAFIT_SKIP_LOG={}: {e}", Path::new(&log).display());
        }
    }
}

/// The repository: where the test was built, or the working directory when the test binary
/// runs on another machine (scripts/gpu/check.sh takes the CUDA tests to a GPU machine and runs
/// them in its copy of the repository).
pub fn repo() -> PathBuf {
    let built_in = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if built_in.join("Cargo.toml").exists() {
        built_in
    } else {
        std::env::current_dir().expect("the working directory")
    }
}

/// Runs the `lorafit` binary with `args` in `cwd`.
pub fn lorafit(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lorafit")).args(args).current_dir(cwd).output().expect("run lorafit")
}

pub fn write(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, text).unwrap();
}

/// A few short completion rows of children's-story text, matching what stories260K knows.
pub const STORY_ROWS: &str = r#"{"text": "Once upon a time, there was a little dog named Max. Max loved to run in the park."}
{"text": "Lily had a red ball. She played with it every day in the sun."}
{"text": "One day, a bird flew into the garden and sang a happy song."}
{"text": "Tom and his mom went to the store to buy some milk and bread. They were very happy."}
"#;

/// Every model family fixture in tests/fixtures/models (scripts/fixtures/make_model_fixtures.py).
pub const FAMILIES: &[&str] = &[
    "llama3",
    "llama-legacy",
    "smollm2",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
    "gpt2",
    "gpt2-noprefix",
];

/// Trains 6 steps of LoRA (r 4, alpha 8, every linear layer) on [`STORY_ROWS`] in `dir`, with
/// the config's `model:` and `lora:` given as YAML flow mappings' inner text beside the defaults
/// (`model_extra` e.g. `quantize: nf4`, `lora_extra` e.g. `dropout: 0.0`); returns the adapter
/// directory of run `run_name`.
pub fn train_stories_adapter(
    dir: &Path,
    base: &Path,
    model_extra: &str,
    lora_extra: &str,
    run_name: &str,
) -> PathBuf {
    let extra = |s: &str| if s.is_empty() { String::new() } else { format!(", {s}") };
    write(&dir.join("stories.jsonl"), STORY_ROWS);
    write(
        &dir.join("run.yaml"),
        &format!(
            "model: {{path: {}{}}}\n\
             lora: {{r: 4, alpha: 8, target_modules: all-linear{}}}\n\
             data: {{train: stories.jsonl, format: completion}}\n\
             train: {{max_steps: 6, lr: 0.01, micro_batch_size: 2}}\n\
             output: {{run_name: {run_name}}}\n",
            base.display(),
            extra(model_extra),
            extra(lora_extra),
        ),
    );
    let out = lorafit(dir, &["train", "run.yaml"]);
    assert!(out.status.success(), "train failed: {}", String::from_utf8_lossy(&out.stderr));
    dir.join("checkpoints").join(run_name).join("adapter")
}

/// The directory of a model fixture.
pub fn fixture(family: &str) -> PathBuf {
    repo().join("tests/fixtures/models").join(family)
}

/// A JSON array of integers as token ids.
pub fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array().expect("a JSON array").iter().map(|x| x.as_i64().expect("an integer")).collect()
}

/// libtorch's global generator seeds adapters and draws dropout masks; tests of one binary that
/// seed it and rely on what it draws take turns with it through this lock.
pub fn global_rng_turn() -> std::sync::MutexGuard<'static, ()> {
    static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner())
}

/// Pairs from the default data: each question's answer chosen, the next question's answer rejected.
pub fn write_pairs(path: &Path, n: usize) {
    let text = std::fs::read_to_string(repo().join("data/default/train.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> =
        text.lines().take(n + 1).map(|l| serde_json::from_str(l).unwrap()).collect();
    let pairs: Vec<String> = rows
        .windows(2)
        .map(|w| {
            serde_json::json!({"prompt": w[0]["instruction"], "chosen": w[0]["output"], "rejected": w[1]["output"]})
                .to_string()
        })
        .collect();
    write(path, &(pairs.join("\n") + "\n"));
}

/// The bf16 tolerance of the logits checks. lorafit's bf16 mode rounds the frozen weights to bf16
/// and computes each block's projections, attention and MLP in bf16, keeping the residual stream
/// and norms in fp32 (autocast's split); transformers' bf16 model rounds the same weights and
/// every activation. So lorafit's bf16 logits `ours` must be as far from the fp32 logits `exact`
/// as transformers' bf16 logits `theirs` are: mean absolute error at most 1.1× theirs, largest
/// error at most 1.5× theirs.
pub fn assert_within_bf16_rounding(
    label: &str,
    ours: &tch::Tensor,
    theirs: &tch::Tensor,
    exact: &tch::Tensor,
) {
    let error = |t: &tch::Tensor| {
        let diff = (t - exact).abs();
        (diff.mean(tch::Kind::Float).double_value(&[]), diff.max().double_value(&[]))
    };
    let ((ours_mean, ours_max), (theirs_mean, theirs_max)) = (error(ours), error(theirs));
    eprintln!(
        "{label}: bf16 mean {ours_mean:.4} max {ours_max:.4} vs transformers bf16 mean {theirs_mean:.4} max {theirs_max:.4}"
    );
    assert!(ours_mean <= 1.1 * theirs_mean, "{label}: mean logit error {ours_mean} vs {theirs_mean}");
    assert!(ours_max <= 1.5 * theirs_max, "{label}: largest logit error {ours_max} vs {theirs_max}");
}
