//! Runs scripts/interop/peft_check.py on many adapters in one Python process: importing torch,
//! transformers and peft takes seconds, checking a fixture-sized adapter a fraction of that.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::Tensor;

/// One adapter to check: PEFT must load every tensor of it onto `base` and compute `logits` on
/// `input_ids` within `tol`, before and after `merge_and_unload()`.
pub struct PeftJob {
    pub name: String,
    pub base: PathBuf,
    pub adapter: PathBuf,
    pub input_ids: Tensor,
    pub logits: Tensor,
    pub tol: f64,
}

/// Checks every job and panics naming each one that fails and why; returns the script's report
/// for each job, in order, for further assertions.
pub fn peft_check(python: &Path, scratch: &Path, jobs: &[PeftJob]) -> Vec<Value> {
    let mut spec = vec![];
    for (i, job) in jobs.iter().enumerate() {
        let logits_file = scratch.join(format!("peft-check-logits-{i}.json"));
        let logits = json!({
            "input_ids": Vec::<Vec<i64>>::try_from(&job.input_ids).unwrap(),
            "logits": Vec::<Vec<Vec<f32>>>::try_from(&job.logits).unwrap(),
        });
        std::fs::write(&logits_file, logits.to_string()).unwrap();
        spec.push(json!({
            "name": job.name, "base": job.base, "adapter": job.adapter, "logits": logits_file, "tol": job.tol,
        }));
    }
    let jobs_file = scratch.join("peft-check-jobs.json");
    std::fs::write(&jobs_file, Value::Array(spec).to_string()).unwrap();
    let out = Command::new(python)
        .arg(super::repo().join("scripts/interop/peft_check.py"))
        .arg("--jobs")
        .arg(&jobs_file)
        .output()
        .expect("run scripts/interop/peft_check.py");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("peft_check:\n{stdout}{stderr}");
    let reports: Vec<Value> = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let names: Vec<&str> = reports.iter().map(|r| r["name"].as_str().unwrap_or("?")).collect();
    let wanted: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, wanted, "peft_check.py did not report on every job:\n{stdout}{stderr}");
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| r["status"] != 0 || r["ok"] != true)
        .map(|r| {
            let messages: Vec<&str> =
                r["messages"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            format!("{}: the PEFT check failed: {}", r["name"].as_str().unwrap(), messages.join("; "))
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert!(out.status.success(), "peft_check.py failed:\n{stderr}");
    reports
}
