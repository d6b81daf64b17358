//! Data-parallel training (Gloo on loopback) against the single process it must equal: 2 workers
//! × micro-batch 2 take the same examples per step as 1 process × micro-batch 2 × accumulation 2,
//! so the per-step losses and the final adapter agree to fp32 rounding.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// fp32 sums in another order: what the two may differ by.
const TOLERANCE: f64 = 1e-6;

struct Trained {
    losses: Vec<f64>,
    eval_loss: f64,
    adapter: BTreeMap<String, Vec<f32>>,
}

/// Trains the shipped default config for 4 steps of 4 examples in `dir/name` with `args` added.
fn train(dir: &Path, name: &str, args: &[&str]) -> Trained {
    let config = common::repo().join("configs/default.yaml");
    let out_dir = format!("output.dir={}", dir.display());
    let run_name = format!("output.run_name={name}");
    let mut all = vec!["train", config.to_str().unwrap(), "--log-format", "json"];
    for set in
        ["train.max_steps=4", "train.micro_batch_size=2", "train.log_every=1", "output.sample_prompts=[]"]
    {
        all.extend(["--set", set]);
    }
    all.extend(["--set", &out_dir, "--set", &run_name]);
    all.extend(args);
    let out = common::lorafit(&common::repo(), &all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{name}: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let records: Vec<serde_json::Value> =
        stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let losses = records.iter().filter(|r| r["event"] == "train").map(|r| r["train/loss"].as_f64().unwrap());
    let eval_loss =
        records.iter().rev().find(|r| r["event"] == "eval").map(|r| r["eval/loss"].as_f64().unwrap());
    let bytes = std::fs::read(dir.join(name).join("adapter/adapter_model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let adapter = tensors
        .tensors()
        .into_iter()
        .map(|(key, view)| {
            let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            (key, values.collect())
        })
        .collect();
    Trained { losses: losses.collect(), eval_loss: eval_loss.expect("an evaluation at the end"), adapter }
}

/// The single process with accumulation 2 against 2 workers, with `extra` settings on both.
fn assert_two_workers_equal_one(extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    fn with<'a>(extra: &[&'a str], args: &[&'a str]) -> Vec<&'a str> {
        extra.iter().flat_map(|s| ["--set", s]).chain(args.iter().copied()).collect()
    }
    let one = train(tmp.path(), "one", &with(extra, &["--set", "train.grad_accum_steps=2"]));
    let two = train(tmp.path(), "two", &with(extra, &["--nproc-per-node", "2"]));
    assert_eq!(one.losses.len(), 4);
    assert_eq!(one.losses.len(), two.losses.len());
    for (step, (a, b)) in one.losses.iter().zip(&two.losses).enumerate() {
        assert!((a - b).abs() <= TOLERANCE, "step {}: loss {a} with 1 process, {b} with 2 workers", step + 1);
    }
    assert!((one.eval_loss - two.eval_loss).abs() <= TOLERANCE, "{} vs {}", one.eval_loss, two.eval_loss);
    assert_eq!(one.adapter.keys().collect::<Vec<_>>(), two.adapter.keys().collect::<Vec<_>>());
    let mut worst = 0f64;
    for (key, a) in &one.adapter {
        let b = &two.adapter[key];
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs() as f64);
        }
    }
    assert!(worst <= TOLERANCE, "adapters differ by up to {worst}");
    // And training moved the adapter: an equality of two untouched adapters would prove nothing.
    let initial_b_zero =
        one.adapter.iter().filter(|(k, _)| k.contains("lora_B")).all(|(_, v)| v.iter().all(|&x| x == 0.0));
    assert!(!initial_b_zero, "the adapters were not trained");
}

#[test]
fn two_workers_equal_one_process_with_accumulation() {
    assert_two_workers_equal_one(&["train.threads=1"]);
}

#[test]
fn two_workers_equal_one_process_with_packing_and_dropout() {
    assert_two_workers_equal_one(&["train.threads=1", "data.packing=true", "lora.dropout=0.1"]);
}

/// A rank whose peers never come ends within `train.dist_timeout`, saying which rank it is.
#[test]
fn a_rank_alone_gives_up_after_the_timeout_naming_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = common::repo().join("configs/default.yaml");
    let out_dir = format!("output.dir={}", tmp.path().display());
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lorafit"))
        .args(["train", config.to_str().unwrap(), "--set", "train.dist_timeout=3", "--set", &out_dir])
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .current_dir(common::repo())
        .output()
        .unwrap();
    let message = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{message}");
    assert!(message.contains("rank 0 of 2"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none(), "a run directory was written");
}
