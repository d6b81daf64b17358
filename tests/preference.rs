//! Preference objectives as TRL computes them: on the shipped default model with an adapter
//! `lorafit train` trained for 2 DPO steps, and the same batch of pairs lorafit builds, the DPO
//! (sigmoid and robust) and IPO losses, their gradients w.r.t. the adapter and the logged
//! `rewards/*` and `logps/*` equal those of TRL's `DPOTrainer._compute_loss`; the ORPO loss and
//! metrics those of `ORPOTrainer.get_batch_loss_metrics`, the KTO ones those of
//! `KTOTrainer._compute_loss` (scripts/interop/dpo_check.py); so are the validation loss and
//! metrics a run logs.

mod common;

use lorafit::config::{Config, Objective};
use lorafit::data::{Batch, EpochPlan, Example, RowLayout};
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

/// lorafit's loss, metrics and adapter gradients for one loss on the first `pairs` pairs of the
/// data: the job dpo_check.py recomputes with TRL.
fn lorafit_job(
    cfg: &Config,
    adapter: &Path,
    loss: PreferenceLoss,
    name: &str,
    pairs: usize,
    dir: &Path,
) -> Value {
    let spec = ModelSpec::from_dir(&cfg.model.path).unwrap();
    let examples = load_run_data(cfg, &spec).unwrap().train.examples;
    let chosen = (0..pairs).map(|i| &examples[2 * i]);
    let rows: Vec<&Example> = chosen.chain((0..pairs).map(|i| &examples[2 * i + 1])).collect();
    batch_job(cfg, adapter, loss, name, &rows, dir)
}

/// lorafit's loss, metrics and adapter gradients for one loss on a batch of `rows` (collated one
/// example per row, in order, as pairs are: chosen rows first), as a dpo_check.py job.
fn batch_job(
    cfg: &Config,
    adapter: &Path,
    loss: PreferenceLoss,
    name: &str,
    rows: &[&Example],
    dir: &Path,
) -> Value {
    let batch = Batch::collate(rows, 0, Device::Cpu);
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

    let rows: Vec<Value> =
        rows.iter().map(|e| json!({"input_ids": e.input_ids, "labels": e.labels})).collect();
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
        "rows": rows, "desirable": batch.desirable, "loss": sum.double_value(&[]) * mean, "metrics": metrics,
        "grads": grads_file,
    })
}

/// dpo_check.py's reports on `jobs` (TRL's loss, metrics and gradients with `adapter`), each
/// checked to equal lorafit's within 1e-5.
fn assert_jobs_equal_trl(python: &Path, adapter: &Path, jobs: &[Value], dir: &Path) -> Vec<Value> {
    common::write(&dir.join("jobs.json"), &serde_json::to_string(&jobs).unwrap());
    let model = common::repo().join("data/default-model");
    let script = common::repo().join("scripts/interop/dpo_check.py");
    let out = Command::new(python)
        .arg(&script)
        .args(["--model".as_ref(), model.as_os_str(), "--adapter".as_ref(), adapter.as_os_str()])
        .args(["--jobs".as_ref(), dir.join("jobs.json").as_os_str()])
        .output()
        .expect("run the interop python");
    assert!(out.status.success(), "dpo_check.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let reports: Vec<Value> = serde_json::from_slice(&out.stdout).expect("dpo_check.py prints JSON");
    assert_eq!(reports.len(), jobs.len());
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
    reports
}

#[test]
fn preference_losses_and_gradients_equal_trl() {
    let Some(python) = common::python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_pairs(&dir.join("pairs.jsonl"), 9);
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
    let reports = assert_jobs_equal_trl(&python, &adapter, &jobs, dir);

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

    assert_eval_command_reports(dir, &adapter, dpo);
}

/// `lorafit eval` of the config in `dir` and `adapter` reports TRL's loss and metrics of `trl`
/// (a dpo_check.py report) under TRL's evaluation names.
fn assert_eval_command_reports(dir: &Path, adapter: &Path, trl: &Value) {
    let close = |ours: &Value, theirs: &Value, what: &str| {
        let (a, b) = (ours.as_f64().unwrap(), theirs.as_f64().unwrap());
        assert!((a - b).abs() <= 1e-5, "{what}: lorafit eval reports {a}, TRL computes {b}");
    };
    let out = common::lorafit(dir, &["eval", "run.yaml", "--adapter", adapter.to_str().unwrap()]);
    assert!(out.status.success(), "eval failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = stdout.lines().find_map(|l| serde_json::from_str(l).ok()).expect("eval prints JSON");
    assert_eq!(report["pairs"], 9, "{stdout}");
    close(&report["eval_loss"], &trl["trl_loss"], "eval_loss");
    for metric in PAIR_METRICS {
        close(&report[format!("eval_{metric}").as_str()], &trl["trl_metrics"][metric], metric);
    }
}

/// Each pair of `examples` (chosen, rejected, laid end to end) as TRL's DPO collator takes it:
/// the untrained prompt ids, then each answer's ids.
fn trl_pair(examples: &[lorafit::data::format::Example], pair: usize) -> Value {
    let (chosen, rejected) = (&examples[2 * pair], &examples[2 * pair + 1]);
    let prompt_len = chosen.labels.iter().skip(1).position(|&l| l != -100).map_or(0, |i| i + 1);
    assert_eq!(chosen.input_ids[..prompt_len], rejected.input_ids[..prompt_len], "pair {pair}: one prompt");
    json!({
        "prompt_ids": chosen.input_ids[..prompt_len],
        "chosen_ids": chosen.input_ids[prompt_len..],
        "rejected_ids": rejected.input_ids[prompt_len..],
    })
}

/// The pairs of the first `n` steps of `cfg`'s run, in the order lorafit takes them, as TRL's
/// DPO collator takes them.
fn trl_steps(cfg: &Config, n: usize) -> Vec<Vec<Value>> {
    let spec = ModelSpec::from_dir(&cfg.model.path).unwrap();
    let examples = load_run_data(cfg, &spec).unwrap().train.examples;
    let lengths: Vec<usize> =
        examples.chunks(2).map(|p| p[0].input_ids.len().max(p[1].input_ids.len())).collect();
    let t = &cfg.train;
    let plan = EpochPlan::new(
        &lengths,
        t.micro_batch_size,
        t.grad_accum_steps,
        RowLayout::Pairs,
        cfg.data.shuffle,
        t.seed,
        0,
    );
    plan.steps[..n]
        .iter()
        .map(|step| step.iter().flatten().flatten().map(|&i| trl_pair(&examples, i)).collect())
        .collect()
}

/// 3 DPO steps of lorafit give the adapter TRL's DPOTrainer gives with the same optimizer,
/// schedule, clipping and pairs in the same order, from the same non-zero adapter
/// (scripts/interop/dpo_train_check.py); and the comparison tells a different beta apart.
#[test]
fn three_dpo_steps_give_trl_dpo_trainers_adapter() {
    let Some(python) = common::python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_pairs(&dir.join("pairs.jsonl"), 12);
    let model = common::repo().join("data/default-model");
    let yaml = format!(
        "model: {{path: {}}}\n\
         lora: {{r: 4, alpha: 8, dropout: 0.0, target_modules: all-linear}}\n\
         data: {{train: {}, format: alpaca, packing: false, shuffle: false}}\n\
         train: {{objective: dpo, beta: 0.1, micro_batch_size: 4, precision: fp32, lr: 0.002, \
         lr_scheduler: linear, warmup_steps: 0, weight_decay: 0.01, adam_beta1: 0.9, adam_beta2: 0.99, \
         adam_eps: 1.0e-8, max_grad_norm: 1.0, log_every: 1}}\n\
         output: {{dir: {}, sample_prompts: []}}\n",
        model.display(),
        dir.join("pairs.jsonl").display(),
        dir.join("runs").display(),
    );
    common::write(&dir.join("run.yaml"), &yaml);
    // A first step makes B non-zero, so that every adapter tensor moves in the 3 steps compared.
    let init = dir.join("runs/init/adapter");
    let from = format!("lora.init_from={}", init.display());
    for sets in [
        ["train.max_steps=1", "output.run_name=init", "lora.init_from=null"],
        ["train.max_steps=3", "output.run_name=three", &from],
    ] {
        let args: Vec<&str> =
            ["train", "run.yaml"].into_iter().chain(sets.iter().flat_map(|s| ["--set", s])).collect();
        let out = common::lorafit(dir, &args);
        assert!(out.status.success(), "train failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    let cfg = Config::load(&dir.join("run.yaml"), &[]).unwrap();
    let steps = trl_steps(&cfg, 3);
    let t = &cfg.train;
    let job = json!({
        "steps": steps, "lr": t.lr, "weight_decay": t.weight_decay, "adam_beta1": t.adam_beta1,
        "adam_beta2": t.adam_beta2, "adam_eps": t.adam_eps, "max_grad_norm": t.max_grad_norm,
        "runs": [t.beta, 2.0 * t.beta],
    });
    common::write(&dir.join("job.json"), &job.to_string());
    let script = common::repo().join("scripts/interop/dpo_train_check.py");
    let out = Command::new(&python)
        .arg(&script)
        .args(["--model".as_ref(), model.as_os_str(), "--init".as_ref(), init.as_os_str()])
        .args(["--adapter".as_ref(), dir.join("runs/three/adapter").as_os_str()])
        .args(["--job".as_ref(), dir.join("job.json").as_os_str()])
        .output()
        .expect("run the interop python");
    assert!(out.status.success(), "dpo_train_check.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let reports: Vec<Value> = serde_json::from_slice(&out.stdout).expect("dpo_train_check.py prints JSON");
    println!("{reports:?}");
    let [same, other] = &reports[..] else { panic!("two reports expected: {reports:?}") };
    let num = |r: &Value, key: &str| r[key].as_f64().unwrap_or_else(|| panic!("no {key} in {r}"));
    assert_eq!(same["unmatched"], json!([]), "{same}");
    assert_eq!(same["compared"], 2 * 7 * 4, "every adapter tensor is compared: {same}");
    assert!(num(same, "max_change_from_init") > 1e-3, "the 3 steps barely moved the adapter: {same}");
    assert!(num(same, "max_abs_diff") <= 1e-4, "lorafit's adapter differs from TRL's: {same}");
    let metrics = std::fs::read_to_string(dir.join("runs/three/metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["train/loss"].as_f64())
        .collect();
    let trl_losses: Vec<f64> =
        same["trl_losses"].as_array().unwrap().iter().filter_map(Value::as_f64).collect();
    assert_eq!(losses.len(), 3, "a loss logged per step: {metrics}");
    for (step, (ours, theirs)) in losses.iter().zip(&trl_losses).enumerate() {
        assert!((ours - theirs).abs() <= 1e-5, "step {}: loss {ours}, TRL's {theirs}", step + 1);
    }
    // The check sees a real difference: TRL with twice the beta ends elsewhere.
    assert!(num(other, "max_abs_diff") > 1e-3, "a different beta is not told apart: {other}");
}

/// `data preview` shows each pair's chosen and rejected answer after its prompt, only the answers
/// marked as trained; `data export` writes a line per pair with the prompt and both examples.
#[test]
fn preview_and_export_show_pairs_with_the_prompt_masked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_pairs(&dir.join("pairs.jsonl"), 3);
    let yaml = format!(
        "model: {{path: {}}}\ndata: {{train: pairs.jsonl, format: alpaca, packing: false}}\ntrain: {{objective: dpo}}\n",
        common::repo().join("data/default-model").display()
    );
    common::write(&dir.join("run.yaml"), &yaml);
    let rows: Vec<Value> = std::fs::read_to_string(dir.join("pairs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let text = |v: &Value| v.as_str().unwrap().to_string();

    let out = common::lorafit(dir, &["data", "preview", "run.yaml", "-n", "2"]);
    assert!(out.status.success(), "preview failed: {}", String::from_utf8_lossy(&out.stderr));
    let shown = String::from_utf8_lossy(&out.stdout);
    for (i, row) in rows.iter().take(2).enumerate() {
        for answer in ["chosen", "rejected"] {
            let heading = format!("── pair {}, {answer} (", i + 1);
            let at = shown.find(&heading).unwrap_or_else(|| panic!("no {heading:?} in:\n{shown}"));
            let body = shown[at..].lines().skip(1).take_while(|l| !l.starts_with("──")).collect::<Vec<_>>();
            let body = body.join("\n");
            let prompt_end = body.find("[[").unwrap_or_else(|| panic!("nothing trained in {body}"));
            assert!(body[..prompt_end].contains(&text(&row["prompt"])), "the prompt is untrained: {body}");
            assert!(body[prompt_end + 2..].starts_with(&text(&row[answer])), "{answer} is trained: {body}");
            assert_eq!(body.matches("[[").count(), 1, "one trained stretch, the answer: {body}");
        }
    }

    let out = common::lorafit(dir, &["data", "export", "run.yaml", "--out", "pairs-out.jsonl"]);
    assert!(out.status.success(), "export failed: {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = std::fs::read_to_string(dir.join("pairs-out.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), rows.len(), "a line per pair");
    for (line, row) in lines.iter().zip(&rows) {
        let prompt = text(&line["prompt"]);
        assert!(prompt.contains(&text(&row["prompt"])), "{line}");
        for answer in ["chosen", "rejected"] {
            let ex = &line[answer];
            let ids = ex["input_ids"].as_array().unwrap();
            let untrained = ex["labels"].as_array().unwrap().iter().take_while(|l| **l == -100).count();
            assert_eq!(ids.len(), ex["labels"].as_array().unwrap().len(), "{ex}");
            assert!(
                untrained > 0 && untrained < ids.len(),
                "{answer}: the prompt masked, the answer not: {ex}"
            );
            let whole = text(&ex["text"]);
            assert!(whole.starts_with(&prompt), "{answer} starts with the prompt: {ex}");
            assert!(whole[prompt.len()..].starts_with(&text(&row[answer])), "{answer} follows it: {ex}");
        }
    }
}

/// `train.precompute_ref` trains the very adapter a reference pass per step trains, validates
/// the same, and a run resumed from its checkpoint (computing them again) ends where it would
/// have ended.
#[test]
fn precomputed_reference_gives_the_same_adapter_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_pairs(&dir.join("pairs.jsonl"), 12);
    let yaml = format!(
        "model: {{path: {}}}\n\
         lora: {{r: 4, alpha: 8, dropout: 0.1}}\n\
         data: {{train: pairs.jsonl, validation: pairs.jsonl, format: alpaca, packing: false}}\n\
         train: {{objective: dpo, max_steps: 4, save_every: 2, micro_batch_size: 2, lr: 0.01, precision: fp32, \
         threads: 1}}\n\
         output: {{dir: runs, sample_prompts: []}}\n",
        common::repo().join("data/default-model").display()
    );
    common::write(&dir.join("run.yaml"), &yaml);
    let train = |args: &[&str]| train_run_yaml(dir, args);
    let adapter = |name: &str| adapter_bytes(dir, name);
    let per_step = train(&["--set", "output.run_name=per-step"]);
    let ahead = train(&["--set", "output.run_name=ahead", "--set", "train.precompute_ref=true"]);
    assert!(adapter("per-step") == adapter("ahead"), "precompute_ref changed the adapter");
    for metric in ["eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/logps/chosen"] {
        assert_eq!(per_step[metric], ahead[metric], "{metric}");
    }
    let finished = adapter("ahead");
    let step_2 = dir.join("runs/ahead/step-2");
    train(&["--set", "train.precompute_ref=true", "--resume", step_2.to_str().unwrap()]);
    assert!(adapter("ahead") == finished, "the resumed run ends elsewhere");
}

/// KTO's unpaired layout (`prompt`/`completion`/`label`) as `lorafit train` writes it from the
/// default data: each question with its own answer (desirable) or the next question's (not).
fn write_unpaired(path: &Path, n: usize) -> Vec<Value> {
    let text = std::fs::read_to_string(common::repo().join("data/default/train.jsonl")).unwrap();
    let rows: Vec<Value> = text.lines().take(n + 1).map(|l| serde_json::from_str(l).unwrap()).collect();
    let answers: Vec<Value> = rows
        .windows(2)
        .enumerate()
        .map(|(i, w)| {
            // Not simply alternating, so that a batch's labels are uneven and out of order.
            let desirable = i % 3 != 1;
            let completion = if desirable { &w[0]["output"] } else { &w[1]["output"] };
            json!({"prompt": w[0]["instruction"], "completion": completion, "label": desirable})
        })
        .collect();
    let lines: Vec<String> = answers.iter().map(Value::to_string).collect();
    common::write(path, &(lines.join("\n") + "\n"));
    answers
}

/// On unpaired answers (TRL's KTO layout), read with their labels, the KTO loss, its gradients
/// w.r.t. the adapter and its metrics equal those of TRL's `KTOTrainer._compute_loss`, with an
/// adapter (a few SFT steps on the completions) under which the KL estimate is clearly positive,
/// so that the KL term counts.
#[test]
fn kto_on_unpaired_answers_equals_trl() {
    let Some(python) = common::python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let answers = write_unpaired(&dir.join("kto.jsonl"), 10);
    let sft: Vec<String> = answers
        .iter()
        .map(|a| json!({"instruction": a["prompt"], "input": "", "output": a["completion"]}).to_string())
        .collect();
    common::write(&dir.join("sft.jsonl"), &(sft.join("\n") + "\n"));
    let model = common::repo().join("data/default-model");
    let yaml = |data: &str, train: &str| {
        format!(
            "model: {{path: {}}}\n\
             lora: {{r: 4, alpha: 8, target_modules: all-linear}}\n\
             data: {{train: {}, format: alpaca, packing: false, shuffle: false}}\n\
             train: {{{train}, micro_batch_size: 4, precision: fp32}}\n\
             output: {{dir: {}, run_name: warm, sample_prompts: []}}\n",
            model.display(),
            dir.join(data).display(),
            dir.join("runs").display()
        )
    };
    common::write(&dir.join("sft.yaml"), &yaml("sft.jsonl", "max_steps: 6, lr: 0.01"));
    common::write(&dir.join("kto.yaml"), &yaml("kto.jsonl", "objective: kto"));
    let out = common::lorafit(dir, &["train", "sft.yaml"]);
    assert!(out.status.success(), "train failed: {}", String::from_utf8_lossy(&out.stderr));
    let adapter = dir.join("runs/warm/adapter");

    let cfg = Config::load(&dir.join("kto.yaml"), &[]).unwrap();
    let spec = ModelSpec::from_dir(&cfg.model.path).unwrap();
    let examples = load_run_data(&cfg, &spec).unwrap().train.examples;
    let labels: Vec<Option<bool>> = answers.iter().map(|a| a["label"].as_bool()).collect();
    let read: Vec<Option<bool>> = examples.iter().map(|e| e.desirable).collect();
    assert_eq!(read, labels, "an example per row, with the row's label");
    let loss = PreferenceLoss {
        objective: Objective::Kto,
        beta: 0.3,
        label_smoothing: 0.0,
        desirable_weight: 1.5,
        undesirable_weight: 0.6,
    };
    let rows: Vec<&Example> = examples.iter().take(8).collect();
    let job = batch_job(&cfg, &adapter, loss, "kto-unpaired", &rows, dir);
    let reports = assert_jobs_equal_trl(&python, &adapter, &[job], dir);
    let kl = reports[0]["trl_metrics"]["kl"].as_f64().unwrap();
    assert!(kl > 0.05, "the KL estimate should be positive after SFT on the completions: {kl}");
}

/// KTO on unpaired answers with a held-out share: a second run, which takes the prepared data
/// (and each answer's label) from the data cache, trains the very adapter the first did, and a
/// run resumed from its checkpoint ends there too.
#[test]
fn kto_on_unpaired_answers_reads_the_cache_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_unpaired(&dir.join("kto.jsonl"), 16);
    let yaml = format!(
        "model: {{path: {}}}\n\
         lora: {{r: 4, alpha: 8, dropout: 0.1}}\n\
         data: {{train: kto.jsonl, val_split: 0.25, format: alpaca, packing: false}}\n\
         train: {{objective: kto, max_steps: 4, save_every: 2, micro_batch_size: 3, lr: 0.01, precision: fp32, \
         threads: 1}}\n\
         output: {{dir: runs, sample_prompts: []}}\n",
        common::repo().join("data/default-model").display()
    );
    common::write(&dir.join("run.yaml"), &yaml);
    let train = |args: &[&str]| train_run_yaml(dir, args);
    let adapter = |name: &str| adapter_bytes(dir, name);
    let fresh = train(&["--set", "output.run_name=fresh"]);
    let cached = train(&["--set", "output.run_name=cached"]);
    assert!(adapter("fresh") == adapter("cached"), "the cached data trained another adapter");
    for metric in ["eval/loss", "eval/rewards/chosen", "eval/rewards/rejected", "eval/kl"] {
        assert!(fresh[metric].as_f64().is_some_and(f64::is_finite), "{metric}: {fresh}");
        assert_eq!(fresh[metric], cached[metric], "{metric}");
    }
    let step_2 = dir.join("runs/cached/step-2");
    train(&["--resume", step_2.to_str().unwrap()]);
    assert!(adapter("cached") == adapter("fresh"), "the resumed run ends elsewhere");
}

/// Trains `dir/run.yaml` with `args` and returns the last validation record of its JSON log.
fn train_run_yaml(dir: &Path, args: &[&str]) -> Value {
    let out = common::lorafit(dir, &[&["train", "run.yaml", "--log-format", "json"], args].concat());
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "train {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let eval =
        stdout.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).rfind(|r| r["event"] == "eval");
    eval.expect("a validation at the end")
}

/// The adapter file of the run `name` under `dir/runs`.
fn adapter_bytes(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join("runs").join(name).join("adapter/adapter_model.safetensors")).unwrap()
}
