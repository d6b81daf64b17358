//! A test that cannot run here must say so: it is counted in `LORAFIT_SKIP_LOG` (scripts/test.sh
//! reports the count), and with `LORAFIT_REQUIRE_ASSETS=1` (CI) it fails instead of passing.
//! Each case runs this binary's `needs_the_assets` in a child process with its own environment.

use std::path::Path;
use std::process::{Command, Output};

mod common;

/// Stands for every test that needs the assets; run only by the tests below, in a child process
/// started without them.
#[test]
#[ignore = "run by the other tests of this file, in a child process"]
fn needs_the_assets() {
    let Some(_assets) = common::assets() else { return };
}

fn run_needs_the_assets(skip_log: &Path, require: Option<&str>) -> Output {
    let mut cmd = Command::new(std::env::current_exe().expect("the test binary's path"));
    cmd.args(["--ignored", "--exact", "needs_the_assets", "--test-threads=1"])
        .env_remove("LORAFIT_ASSETS")
        .env_remove("LORAFIT_REQUIRE_ASSETS")
        .env("LORAFIT_SKIP_LOG", skip_log);
    if let Some(value) = require {
        cmd.env("LORAFIT_REQUIRE_ASSETS", value);
    }
    cmd.output().expect("run the test binary")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn a_skipped_test_passes_and_is_logged_with_its_name_and_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("skips.tsv");
    for require in [None, Some("0")] {
        let out = run_needs_the_assets(&log, require);
        assert!(
            out.status.success(),
            "LORAFIT_REQUIRE_ASSETS={require:?}: the skipped test failed:\n{}",
            text(&out)
        );
        assert!(text(&out).contains("1 passed"), "the test did not run at all:\n{}", text(&out));
    }
    let logged = std::fs::read_to_string(&log).expect("the skip log was not written");
    let lines: Vec<&str> = logged.lines().collect();
    assert_eq!(lines.len(), 2, "one line per skip:\n{logged}");
    for line in lines {
        let (test, reason) = line.split_once('\t').unwrap_or_else(|| panic!("no tab in {line:?}"));
        assert_eq!(test, "skips::needs_the_assets");
        assert!(reason.contains("LORAFIT_ASSETS is not set"), "{reason}");
    }
}

#[test]
fn with_lorafit_require_assets_a_test_that_would_skip_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("skips.tsv");
    let out = run_needs_the_assets(&log, Some("1"));
    assert!(!out.status.success(), "the test passed without its assets:\n{}", text(&out));
    let text = text(&out);
    assert!(
        text.contains("skips::needs_the_assets cannot run: LORAFIT_ASSETS is not set")
            && text.contains("LORAFIT_REQUIRE_ASSETS=1 requires every test to run"),
        "the failure does not say why:\n{text}"
    );
    assert!(!log.exists(), "a failing test is not a skip, yet it was logged");
}
