//! Distillation from a cached teacher (`lorafit distill-cache`, `distill.cache`): with k the whole
//! vocabulary the cached loss and gradients equal those of the teacher run beside the student;
//! with a small k the loss (D over the top k and one bucket for the rest) is never negative and
//! training lowers it; a cache made for other settings is refused naming what differs.

mod common;

use lorafit::config::{Config, Divergence};
use lorafit::data::Batch;
use lorafit::files::{read_safetensors, safetensors_bytes};
use lorafit::lora;
use lorafit::model::{load_model, ModelSpec};
use lorafit::train::activations::Activations;
use lorafit::train::distill::{load_teacher, DistillLoss, Distiller, Teacher};
use lorafit::train::memory::MemoryEstimate;
use lorafit::train::optim::zero_grads;
use lorafit::train::run::load_run_data;
use lorafit::train::Backward;
use serde_json::Value;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The shipped default model's vocabulary.
const VOCAB: usize = 768;

/// A distillation config on the default model and data with the default model as the teacher
/// (the student differs by its adapter), T 2, and `extra` YAML lines; written as `run.yaml`.
fn write_config(dir: &Path, extra: &str) -> Config {
    let repo = common::repo();
    let yaml = format!(
        "model: {{path: {}}}\n\
         lora: {{r: 4, alpha: 8, dropout: 0.0, target_modules: all-linear}}\n\
         data: {{train: {}, validation: {}, format: alpaca, shuffle: false}}\n\
         train: {{objective: distill, max_steps: 2, micro_batch_size: 4, precision: fp32, threads: 2}}\n\
         distill: {{teacher: {}, temperature: 2.0, cache: {}}}\n\
         output: {{dir: {}, run_name: distill}}\n{extra}",
        repo.join("data/default-model").display(),
        repo.join("data/default/train.jsonl").display(),
        repo.join("data/default/val.jsonl").display(),
        repo.join("data/default-model").display(),
        dir.join("cache").display(),
        dir.join("runs").display(),
    );
    common::write(&dir.join("run.yaml"), &yaml);
    Config::load(&dir.join("run.yaml"), &[]).unwrap()
}

/// A teacher unlike the default model: a copy of it with seeded noise (5% of each tensor's
/// standard deviation) on every weight, as scripts/interop/distill_check.py makes one.
fn noisy_teacher(dir: &Path) -> std::path::PathBuf {
    let (base, teacher) = (common::repo().join("data/default-model"), dir.join("noisy-teacher"));
    std::fs::create_dir_all(&teacher).unwrap();
    for entry in std::fs::read_dir(&base).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, teacher.join(path.file_name().unwrap())).unwrap();
    }
    tch::manual_seed(3);
    let noisy: Vec<(String, Tensor)> = read_safetensors(&base.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let f = t.to_kind(Kind::Float);
            let noise = Tensor::randn_like(&f) * 0.05 * f.std(true).double_value(&[]);
            (name, (f + noise).to_kind(t.kind()))
        })
        .collect();
    std::fs::write(teacher.join("model.safetensors"), safetensors_bytes(&noisy, &[]).unwrap()).unwrap();
    teacher
}

/// `lorafit distill-cache run.yaml` in `dir` with `args`; asserts it succeeded.
fn distill_cache(dir: &Path, args: &[&str]) {
    let out = common::lorafit(dir, &[&["distill-cache", "run.yaml"], args].concat());
    assert!(out.status.success(), "distill-cache failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The adapter parameters' gradients, in order.
fn grads(params: &[Tensor]) -> Vec<Tensor> {
    params.iter().map(|p| p.grad().copy()).collect()
}

#[test]
fn a_cache_of_the_whole_vocabulary_gives_the_online_loss_and_gradients() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = write_config(dir, "");
    distill_cache(dir, &["--top-k", &VOCAB.to_string()]);
    let spec = ModelSpec::from_dir(&cfg.model.path).unwrap();
    let data = load_run_data(&cfg, &spec).unwrap();

    let mut student = load_model(&cfg.model.path, Kind::Float, Device::Cpu).unwrap();
    let adapters = lora::inject(&mut student, &cfg.lora, Device::Cpu).unwrap();
    tch::manual_seed(7);
    tch::no_grad(|| {
        for t in adapters.trainables.iter().filter(|t| t.peft_key.contains("lora_B")) {
            t.tensor.shallow_clone().copy_(&(Tensor::randn_like(&t.tensor) * 0.05));
        }
    });
    let params: Vec<Tensor> = adapters.trainables.iter().map(|t| t.tensor.shallow_clone()).collect();
    let mut cached = Distiller::load(&cfg, &spec, &data, Device::Cpu).unwrap();
    assert!(matches!(cached.teacher, Teacher::Cache(_)), "distill.cache did not make a cached teacher");
    let teacher = load_teacher(&cfg, &spec, &data.tokenizer, Device::Cpu).unwrap();
    let mut online = Distiller::new(teacher, cached.loss);

    // Packed rows of examples out of order: the cache is keyed by example, not by batch.
    let order = [[5usize, 0].as_slice(), &[3], &[9, 2, 7]];
    let examples = &data.train.examples;
    let rows: Vec<Vec<_>> = order.iter().map(|row| row.iter().map(|&i| &examples[i]).collect()).collect();
    let mut batch = Batch::pack(&rows, data.tokenizer.eos_id, Device::Cpu);
    let cache = cached.cache().unwrap();
    batch.soft_targets = Some(cache.train_targets(order.iter().flat_map(|row| row.iter().copied())));

    let backward = Some(Backward { scale: 1.0 / batch.label_tokens as f64, checkpointing: false });
    for divergence in [Divergence::ForwardKl, Divergence::ReverseKl, Divergence::Jsd] {
        let loss = DistillLoss { temperature: 2.0, alpha: 0.3, divergence, jsd_beta: 0.3 };
        (cached.loss, online.loss) = (loss, loss);
        zero_grads(&params);
        let (cached_sum, cached_metrics) = cached.batch_loss(&student, &batch, backward);
        let cached_grads = grads(&params);
        zero_grads(&params);
        let (online_sum, online_metrics) = online.batch_loss(&student, &batch, backward);
        let online_grads = grads(&params);
        let n = batch.label_tokens as f64;
        let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        let (loss_diff, metric_diff) =
            (diff(&cached_sum, &online_sum) / n, diff(&cached_metrics, &online_metrics) / n);
        let kl = online_metrics.double_value(&[0]) / n;
        let grad_max = online_grads.iter().map(|g| g.abs().max().double_value(&[])).fold(0.0, f64::max);
        let grad_diff = cached_grads.iter().zip(&online_grads).map(|(a, b)| diff(a, b)).fold(0.0, f64::max);
        println!("{divergence:?}: kl {kl:.4}, loss diff {loss_diff:.2e}, grad max {grad_max:.2e}, diff {grad_diff:.2e}");
        assert!(kl > 1e-3, "{divergence:?}: the student is too close to the teacher to compare ({kl})");
        assert!(
            loss_diff <= 1e-6 && metric_diff <= 1e-6,
            "{divergence:?}: loss {loss_diff}, metrics {metric_diff}"
        );
        assert!(grad_max > 1e-4, "{divergence:?}: the gradient is too small to compare ({grad_max})");
        assert!(grad_diff <= 1e-6, "{divergence:?}: the gradients differ by {grad_diff}");
    }
}

#[test]
fn a_small_top_k_gives_a_loss_that_is_never_negative_and_that_training_lowers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // alpha 0: the loss is T² · D alone, from a teacher unlike the student.
    let steps = "train: {objective: distill, max_steps: 12, micro_batch_size: 8, precision: fp32, \
                 threads: 2, eval_every: 12}\n";
    write_config(dir, "");
    let teacher = noisy_teacher(dir);
    let yaml = std::fs::read_to_string(dir.join("run.yaml")).unwrap();
    let yaml: String =
        yaml.lines().filter(|l| !l.starts_with("train:")).map(|l| format!("{l}\n")).collect::<String>()
            + steps;
    let yaml = yaml.replace("temperature: 2.0", "temperature: 2.0, alpha: 0.0");
    let yaml = yaml.replace(&common::repo().join("data/default-model").display().to_string(), "BASE");
    let yaml = yaml.replacen("BASE", &common::repo().join("data/default-model").display().to_string(), 1);
    common::write(&dir.join("run.yaml"), &yaml.replace("BASE", &teacher.display().to_string()));
    distill_cache(dir, &["--top-k", "4"]);

    // Every row's D over the top 4 and the rest is ≥ 0, for each divergence, on the base model.
    let cfg = Config::load(&dir.join("run.yaml"), &[]).unwrap();
    let spec = ModelSpec::from_dir(&cfg.model.path).unwrap();
    let data = load_run_data(&cfg, &spec).unwrap();
    let distiller = Distiller::load(&cfg, &spec, &data, Device::Cpu).unwrap();
    let student = load_model(&cfg.model.path, Kind::Float, Device::Cpu).unwrap();
    let examples: Vec<_> = data.train.examples.iter().take(8).collect();
    let batch = Batch::collate(&examples, data.tokenizer.eos_id, Device::Cpu);
    let soft = distiller.cache().unwrap().train_targets(0..8);
    let blocks = tch::no_grad(|| Activations::forward(&student, &batch, false, false).output);
    let hidden = student.final_norm(&blocks).reshape([-1, spec.hidden_size]);
    let logits = student.logits(&hidden.index_select(0, &batch.target_positions), false);
    // The student with its logits sharpened: far from the teacher, so D is large.
    let logits = logits * 3.0;
    for divergence in [Divergence::ForwardKl, Divergence::ReverseKl, Divergence::Jsd] {
        let loss = DistillLoss { temperature: 2.0, alpha: 0.0, divergence, jsd_beta: 0.5 };
        let d = loss.top_k_divergence(&logits, &soft.ids, &soft.logprobs);
        let min = d.min().double_value(&[]);
        println!(
            "{divergence:?}: D over the top 4 and the rest: min {min:.3e}, mean {:.4}",
            d.mean(Kind::Float).double_value(&[])
        );
        assert!(min >= -1e-6, "{divergence:?}: a row's D is negative: {min}");
        assert!(d.isfinite().all().int64_value(&[]) == 1, "{divergence:?}: D is not finite");
    }

    // `lorafit eval` reports the divergence before and after training, as the run logs it.
    let eval_kl = |adapter: &str| -> f64 {
        let out = common::lorafit(dir, &["eval", "run.yaml", "--adapter", adapter]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "eval failed: {}", String::from_utf8_lossy(&out.stderr));
        let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        for key in ["eval_loss", "eval_kl", "eval_ce"] {
            assert!(report[key].is_f64(), "eval does not report {key}: {stdout}");
        }
        report["eval_kl"].as_f64().unwrap()
    };
    let before = eval_kl("none");
    let out = common::lorafit(dir, &["train", "run.yaml", "--log-format", "quiet"]);
    assert!(out.status.success(), "training from the cache failed: {}", String::from_utf8_lossy(&out.stderr));
    let after = eval_kl(&dir.join("runs/distill/adapter").display().to_string());
    let metrics = std::fs::read_to_string(dir.join("runs/distill/metrics.jsonl")).unwrap();
    let records: Vec<Value> = metrics.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let series = |key: &str| -> Vec<f64> { records.iter().filter_map(|r| r[key].as_f64()).collect() };
    let (kl, logged) = (series("train/kl"), series("eval/kl"));
    println!("train/kl {kl:?}\neval/kl {before} → {after}, logged {logged:?}");
    assert_eq!(kl.len(), 12, "a train/kl per step: {metrics}");
    assert!(kl.iter().all(|&v| v >= 0.0), "a negative train/kl: {kl:?}");
    assert!(after < 0.8 * before, "eval/kl did not go down: {before} → {after}");
    assert!((logged[0] - after).abs() < 1e-5, "eval's KL {after} is not the run's {logged:?}");
}

#[test]
fn a_cache_made_for_other_settings_is_refused_naming_the_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_config(dir, "");
    distill_cache(dir, &["--top-k", "8"]);
    let refused = |sets: &[&str], wanted: &[&str]| {
        let mut args = vec!["train", "run.yaml", "--dry-run"];
        for set in sets {
            args.extend(["--set", set]);
        }
        let out = common::lorafit(dir, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sets:?} was accepted: {stderr}");
        for part in wanted.iter().chain(&["re-run `lorafit distill-cache"]) {
            assert!(stderr.contains(part), "{sets:?}: the error does not say {part:?}: {stderr}");
        }
    };
    // The cache as made is accepted.
    let out = common::lorafit(dir, &["train", "run.yaml", "--dry-run"]);
    assert!(out.status.success(), "the matching cache was refused: {}", String::from_utf8_lossy(&out.stderr));

    refused(&["distill.temperature=1.0"], &["distill.temperature 2 and this run sets 1"]);
    // Other training data: the same file less its first example.
    let train = std::fs::read_to_string(common::repo().join("data/default/train.jsonl")).unwrap();
    common::write(&dir.join("fewer.jsonl"), train.split_once('\n').unwrap().1);
    let fewer = format!("data.train={}", dir.join("fewer.jsonl").display());
    refused(&[&fewer], &["was made on other data", "467 + 60 examples"]);
    // Another teacher: the default model with a different config.json.
    let teacher = dir.join("teacher");
    std::fs::create_dir(&teacher).unwrap();
    for entry in std::fs::read_dir(common::repo().join("data/default-model")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, teacher.join(path.file_name().unwrap())).unwrap();
    }
    let config = std::fs::read_to_string(teacher.join("config.json")).unwrap();
    std::fs::write(teacher.join("config.json"), config.replacen('{', "{\"note\": 1, ", 1)).unwrap();
    let set_teacher = format!("distill.teacher={}", teacher.display());
    refused(&[&set_teacher], &["distill.teacher names", "whose files differ"]);
    // Without its metadata (a folder not written by distill-cache) it is no cache.
    std::fs::remove_file(dir.join("cache/meta.json")).unwrap();
    refused(&[], &["is not a teacher cache"]);
}

#[test]
fn a_resume_with_other_distillation_settings_or_another_cache_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let extra = "train: {objective: distill, max_steps: 2, save_every: 2, micro_batch_size: 2, precision: fp32, threads: 2}\n";
    write_config(dir, "");
    let yaml = std::fs::read_to_string(dir.join("run.yaml")).unwrap();
    let yaml: String = yaml.lines().filter(|l| !l.starts_with("train:")).map(|l| format!("{l}\n")).collect();
    common::write(&dir.join("run.yaml"), &(yaml + extra));
    distill_cache(dir, &["--top-k", "8"]);
    let out = common::lorafit(dir, &["train", "run.yaml", "--log-format", "quiet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resume = |sets: &[&str], wanted: &str| {
        let mut args = vec!["train", "run.yaml", "--resume", "--set", "train.max_steps=3"];
        for set in sets {
            args.extend(["--set", set]);
        }
        let out = common::lorafit(dir, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "resuming with {sets:?} was accepted: {stderr}");
        assert!(stderr.contains("cannot resume") && stderr.contains(wanted), "{sets:?}: {stderr}");
    };
    for (set, key) in [("distill.alpha=0.9", "distill.alpha"), ("distill.loss=jsd", "distill.loss")] {
        resume(&[set], key);
    }
    // The same folder written again with another k: the same config, other targets.
    distill_cache(dir, &["--top-k", "4"]);
    resume(&[], "distill.cache files");
}

#[test]
fn the_memory_estimate_holds_the_teacher_unless_it_is_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "");
    let spec = ModelSpec::from_dir(&cfg.model.path).unwrap();
    let teacher = ModelSpec::from_dir(cfg.distill.teacher.as_ref().unwrap()).unwrap();
    let cached = MemoryEstimate::of(&cfg, &spec, &cfg.lora, 64).unwrap();
    let mut online_cfg = cfg.clone();
    online_cfg.distill.cache = None;
    let online = MemoryEstimate::of(&online_cfg, &spec, &cfg.lora, 64).unwrap();
    // fp32 weights: 4 bytes a parameter.
    assert_eq!(online.teacher, 4 * teacher.parameter_count() as u64);
    assert_eq!(cached.teacher, 0);
    assert_eq!(online.total() - cached.total(), online.teacher);
    assert!(online.describe().contains(", teacher "), "{}", online.describe());
}
