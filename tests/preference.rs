//! Preference objectives as TRL computes them: on the shipped default model with an adapter
//! `lorafit train` trained for 2 DPO steps, and the same batch of pairs lorafit builds, the DPO
//! (sigmoid and robust) and IPO losses, their gradients w.r.t. the adapter and the logged
//! `rewards/*` and `logps/*` equal those of TRL's `DPOTrainer._compute_loss`; the ORPO loss and
//! metrics those of `ORPOTrainer.get_batch_loss_metrics`, the KTO ones those of
//! `KTOTrainer._compute_loss` (scripts/interop/dpo_check.py); so are the validation loss and
//! metrics a run logs.

mod common;

use lorafit::config::{Config, Objective};
use lorafit::data::Batch;
use lorafit::files::safetensors_bytes;
use lorafit::lora::peft;
use lorafit::model::load_model;
use lorafit::model::ModelSpec;
use lorafit::train::preference::{PreferenceLoss, PAIR_METRICS};
use lorafit::train::run::load_run_data;
use lorafit::train::Backward;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use tch::{Device, Kind};

/// Pairs from the default data: each question's answer chosen, the next question's answer rejected.
fn write_pairs(path: &Path, n: usize) {
    let text = std::fs::read_to_string(common::repo().join("data/default/train.jsonl")).unwrap();
    let rows: Vec<Value> = text.lines().take(n + 1).map(|l| serde_json::from_str(l).unwrap()).collect();
    let pairs: Vec<String> = rows
        .windows(2)
        .map(|w| {
            json!({"prompt": w[0]["instruction"], "chosen": w[0]["output"], "rejected": w[1]["output"]})
                .to_string()
        })
        .collect();
    common::write(path, &(pairs.join("\n") + "\n"));
}

/// lorafit's loss, metrics and adapter gradients for one loss on `pairs` pairs of the data:
/// the job dpo_check.py recomputes with TRL.
fn lorafit_job(
    cfg: &Config,
    adapter: &Path,
    loss: PreferenceLoss,
    name: &str,
    pairs: usize,
    dir: &Path,
) -> Value {
    let spec = ModelSpec::from_dir(&cfg.model.path).unwrap();
    let data = load_run_data(cfg, &spec).unwrap();
    let examples = &data.train.examples;
    let chosen_rejected: Vec<_> = (0..pairs).map(|i| (&examples[2 * i], &examples[2 * i + 1])).collect();
    let batch = Batch::collate_pairs(&chosen_rejected, data.tokenizer.eos_id, Device::Cpu);

    let mut model = load_model(&cfg.model.path, Kind::Float, Device::Cpu).unwrap();
    let adapters = peft::load(adapter, &mut model, Device::Cpu).unwrap();
    for t in &adapters.trainables {
        let _ = t.tensor.shallow_clone().set_requires_grad(true);
    }
    let mean = 1.0 / loss.units(&batch) as f64;
    let (sum, metrics) = loss.pair_loss(&model, &batch, Some(Backward { scale: mean, checkpointing: false }));
    let grads: Vec<(String, tch::Tensor)> =
        adapters.trainables.iter().map(|t| (t.peft_key.clone(), t.tensor.grad())).collect();
    let grads_file = dir.join(format!("grads-{name}.safetensors"));
    std::fs::write(&grads_file, safetensors_bytes(&grads, &[]).unwrap()).unwrap();

    let rows = batch.input_ids.size()[0];
    let lengths = chosen_rejected.iter().map(|p| p.0).chain(chosen_rejected.iter().map(|p| p.1));
    let rows: Vec<Value> = (0..rows)
        .zip(lengths)
        .map(|(i, e)| {
            let n = e.input_ids.len() as i64;
            let ids = Vec::<i64>::try_from(batch.input_ids.get(i).narrow(0, 0, n)).unwrap();
            let labels = Vec::<i64>::try_from(batch.labels.get(i).narrow(0, 0, n)).unwrap();
            json!({"input_ids": ids, "labels": labels})
        })
        .collect();
    let metrics: serde_json::Map<String, Value> = loss
        .metric_names()
        .iter()
        .enumerate()
        .map(|(i, m)| (m.to_string(), json!(metrics.double_value(&[i as i64]) * mean)))
        .collect();
    let loss_type = match (loss.objective, loss.label_smoothing > 0.0) {
        (Objective::Ipo, _) => "ipo",
        (Objective::Orpo, _) => "orpo",
        (Objective::Kto, _) => "kto",
        (_, true) => "robust",
        _ => "sigmoid",
    };
    json!({
        "name": name, "loss_type": loss_type, "beta": loss.beta, "label_smoothing": loss.label_smoothing,
        "desirable_weight": loss.desirable_weight, "undesirable_weight": loss.undesirable_weight,
        "rows": rows, "loss": sum.double_value(&[]) * mean, "metrics": metrics, "grads": grads_file,
    })
}

#[test]
fn preference_losses_and_gradients_equal_trl() {
    let Some(python) = common::python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_pairs(&dir.join("pairs.jsonl"), 9);
    let model = common::repo().join("data/default-model");
    let yaml = format!(
        "model: {{path: {}}}\n\
         lora: {{r: 4, alpha: 8, target_modules: all-linear}}\n\
         data: {{train: {pairs}, validation: {pairs}, format: alpaca, packing: false, shuffle: false}}\n\
         train: {{objective: dpo, max_steps: 2, lr: 0.01, micro_batch_size: 4, precision: fp32}}\n\
         output: {{dir: {}, run_name: pref}}\n",
        model.display(),
        dir.join("runs").display(),
        pairs = dir.join("pairs.jsonl").display(),
    );
    common::write(&dir.join("run.yaml"), &yaml);
    let out = common::lorafit(dir, &["train", "run.yaml"]);
    assert!(out.status.success(), "train failed: {}", String::from_utf8_lossy(&out.stderr));
    let adapter = dir.join("runs/pref/adapter");
    let cfg = Config::load(&dir.join("run.yaml"), &[]).unwrap();

    let loss = |objective, beta, label_smoothing, weights: [f64; 2]| PreferenceLoss {
        objective,
        beta,
        label_smoothing,
        desirable_weight: weights[0],
        undesirable_weight: weights[1],
    };
    // Settings away from the defaults, so that a setting left out shows.
    let losses = [
        ("dpo", loss(Objective::Dpo, 0.1, 0.0, [1.0, 1.0])),
        ("robust", loss(Objective::Dpo, 0.5, 0.2, [1.0, 1.0])),
        ("ipo", loss(Objective::Ipo, 0.1, 0.0, [1.0, 1.0])),
        ("orpo", loss(Objective::Orpo, 0.7, 0.0, [1.0, 1.0])),
        ("kto", loss(Objective::Kto, 0.3, 0.0, [1.5, 0.6])),
    ];
    let jobs: Vec<Value> =
        losses.iter().map(|(name, loss)| lorafit_job(&cfg, &adapter, *loss, name, 9, dir)).collect();
    common::write(&dir.join("jobs.json"), &serde_json::to_string(&jobs).unwrap());

    let script = common::repo().join("scripts/interop/dpo_check.py");
    let out = Command::new(&python)
        .arg(&script)
        .args(["--model".as_ref(), model.as_os_str(), "--adapter".as_ref(), adapter.as_os_str()])
        .args(["--jobs".as_ref(), dir.join("jobs.json").as_os_str()])
        .output()
        .expect("run the interop python");
    assert!(out.status.success(), "dpo_check.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let reports: Vec<Value> = serde_json::from_slice(&out.stdout).expect("dpo_check.py prints JSON");
    assert_eq!(reports.len(), losses.len());
    for report in &reports {
        println!("{report}");
        let name = &report["name"];
        let num = |key: &str| report[key].as_f64().unwrap_or_else(|| panic!("{name}: no {key} in {report}"));
        assert!(num("loss_diff") <= 1e-5, "{name}: the loss differs from TRL's: {report}");
        assert_eq!(report["unmatched_grads"], json!([]), "{name}: {report}");
        assert_eq!(report["grads_compared"], 2 * 7 * 4, "{name}: every adapter tensor is compared");
        assert!(num("grad_max_abs") > 1e-4, "{name}: TRL's gradient is too small to compare: {report}");
        assert!(num("grad_max_abs_diff") <= 1e-5, "{name}: the gradients differ from TRL's: {report}");
        for (metric, diff) in report["metric_diff"].as_object().unwrap() {
            assert!(diff.as_f64().unwrap() <= 1e-5, "{name}: {metric} differs from TRL's: {report}");
        }
    }

    // The run validated on the same 9 pairs after its last step, with the adapter compared here:
    // its eval/loss and eval/rewards/* are TRL's DPO loss and metrics.
    let metrics = std::fs::read_to_string(dir.join("runs/pref/metrics.jsonl")).unwrap();
    let eval: Value = metrics
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .rfind(|v| v.get("eval/loss").is_some())
        .expect("metrics.jsonl has a validation line");
    let dpo = &reports[0];
    let close = |ours: &Value, theirs: &Value, what: &str| {
        let (a, b) = (ours.as_f64().unwrap(), theirs.as_f64().unwrap());
        assert!((a - b).abs() <= 1e-5, "{what}: lorafit validated {a}, TRL computes {b}");
    };
    close(&eval["eval/loss"], &dpo["trl_loss"], "eval/loss");
    for metric in PAIR_METRICS {
        close(&eval[format!("eval/{metric}").as_str()], &dpo["trl_metrics"][metric], metric);
    }
}
