//! Shared by the integration tests: where the real assets and the Python venv are, and small
//! helpers to run the binary.
#![allow(dead_code)]

pub mod peft_check;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The real-model assets, from `LORAFIT_ASSETS` (scripts/test.sh always sets it). `None` skips
/// the test with a note when running a bare `cargo test`.
pub fn assets() -> Option<PathBuf> {
    match std::env::var_os("LORAFIT_ASSETS") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            assert!(dir.join("README.md").exists(), "LORAFIT_ASSETS={} has no README.md", dir.display());
            Some(dir)
        }
        None => {
            eprintln!("skipped: LORAFIT_ASSETS is not set (scripts/test.sh sets it)");
            None
        }
    }
}

pub fn stories260k(assets: &Path) -> PathBuf {
    assets.join("models/stories260K/hf")
}

/// The Python of the interop venv, from `LORAFIT_INTEROP_PYTHON` (scripts/test.sh sets it).
pub fn python() -> Option<PathBuf> {
    match std::env::var_os("LORAFIT_INTEROP_PYTHON") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: LORAFIT_INTEROP_PYTHON is not set (scripts/test.sh sets it)");
            None
        }
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
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

/// Every model family fixture in tests/fixtures/models (scripts/make_model_fixtures.py).
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
