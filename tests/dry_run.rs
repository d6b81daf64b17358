//! `lorafit train CONFIG --dry-run`: the run's figures, checked against PEFT's count of
//! trainable parameters and the prepared data `data export` writes, with nothing written; and
//! the same figures in a real run's opening lines.

mod common;

use std::process::Output;

fn text(out: &Output) -> String {
    assert!(out.status.success(), "lorafit failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The lines of the opening banner that do not depend on timing or the run directory.
fn figures(banner: &str) -> Vec<String> {
    banner
        .lines()
        .filter(|l| {
            ["memory estimate", "gradient checkpointing", "trainable parameters", "per epoch:"]
                .iter()
                .any(|k| l.contains(k))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn dry_run_prints_the_figures_and_writes_nothing() {
    let repo = common::repo();
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("runs");
    let set_dir = format!("output.dir={}", out_dir.display());
    let banner =
        text(&common::lorafit(&repo, &["train", "configs/default.yaml", "--dry-run", "--set", &set_dir]));
    assert!(!out_dir.exists(), "--dry-run wrote {} (run directory or data cache)", out_dir.display());
    assert_eq!(figures(&banner).len(), 4, "{banner}");

    // Tokens per epoch: the prepared examples, as `data export` writes them.
    let export = dir.path().join("train.jsonl");
    let export_args =
        ["data", "export", "configs/default.yaml", "--set", &set_dir, "--out", export.to_str().unwrap()];
    text(&common::lorafit(&repo, &export_args));
    let tokens: usize = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["input_ids"].as_array().unwrap().len())
        .sum();
    assert!(banner.contains(&format!(" of which {tokens} real (")), "{tokens} tokens expected in:\n{banner}");

    // Trainable parameters: PEFT's count for the same adapter on the same model.
    let Some(python) = common::python() else { return };
    let script = "import sys; from transformers import AutoModelForCausalLM; from peft import LoraConfig, get_peft_model\n\
                  m = get_peft_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]), \
                  LoraConfig(r=8, lora_alpha=16, target_modules='all-linear'))\n\
                  print(*m.get_nb_trainable_parameters())";
    let peft = std::process::Command::new(python)
        .args(["-c", script])
        .arg(repo.join("data/default-model"))
        .output()
        .expect("run the interop python");
    let counts = text(&peft);
    let counts: Vec<u64> = counts.split_whitespace().map(|n| n.parse().unwrap()).collect();
    let trainable_line = format!(
        "{} trainable parameters ({:.3}% of the base)",
        counts[0],
        100.0 * counts[0] as f64 / (counts[1] - counts[0]) as f64
    );
    assert!(banner.contains(&trainable_line), "expected `{trainable_line}` in:\n{banner}");
}

#[test]
fn a_run_opens_with_the_dry_run_figures() {
    let repo = common::repo();
    let dir = tempfile::tempdir().unwrap();
    let set_dir = format!("output.dir={}", dir.path().display());
    let args = [
        "train",
        "configs/default.yaml",
        "--set",
        &set_dir,
        "--set",
        "output.run_name=r",
        "--set",
        "train.max_steps=1",
        "--set",
        "output.sample_prompts=[]",
    ];
    let dry = text(&common::lorafit(&repo, &[&args[..], &["--dry-run"]].concat()));
    let run = text(&common::lorafit(&repo, &args));
    assert_eq!(figures(&dry).len(), 4, "{dry}");
    assert_eq!(figures(&dry), figures(&run));
}
