//! Distillation (`train.objective: distill`): on the shipped default model with an adapter and a
//! teacher made from the same model, the loss `alpha · CE + (1 − alpha) · T² · D` of each
//! divergence, its reported KL and CE, and its gradients w.r.t. the adapter equal a PyTorch
//! reference of the formula on the student PEFT loads (scripts/interop/distill_check.py, which
//! also compares D with TRL's GKD loss and torchtune's `ForwardKLLoss`); a teacher with another
//! vocabulary is refused before training.

mod common;

use lorafit::config::{Config, Divergence};
use lorafit::data::Batch;
use lorafit::files::safetensors_bytes;
use lorafit::lora::{self, peft};
use lorafit::model::{load_model, ModelSpec};
use lorafit::train::distill::{DistillLoss, Distiller};
use lorafit::train::optim::zero_grads;
use lorafit::train::run::load_run_data;
use lorafit::train::Backward;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use tch::{Device, Kind, Tensor};

/// A distillation config for the default model and data, with `teacher`.
fn config(dir: &Path, teacher: &Path) -> Config {
    let repo = common::repo();
    let yaml = format!(
        "model: {{path: {}}}\n\
         lora: {{r: 4, alpha: 8, dropout: 0.0, target_modules: all-linear}}\n\
         data: {{train: {}, validation: {}, format: alpaca, shuffle: false}}\n\
         train: {{objective: distill, max_steps: 2, micro_batch_size: 4, precision: fp32}}\n\
         distill: {{teacher: {}}}\n\
         output: {{dir: {}, run_name: distill}}\n",
        repo.join("data/default-model").display(),
        repo.join("data/default/train.jsonl").display(),
        repo.join("data/default/val.jsonl").display(),
        teacher.display(),
        dir.join("runs").display(),
    );
    common::write(&dir.join("run.yaml"), &yaml);
    Config::load(&dir.join("run.yaml"), &[]).unwrap()
}

/// Runs distill_check.py with `args`, returning its standard output.
fn check_script(python: &Path, args: &[&std::ffi::OsStr]) -> Vec<u8> {
    let script = common::repo().join("scripts/interop/distill_check.py");
    let out = Command::new(python).arg(&script).args(args).output().expect("run the interop python");
    assert!(out.status.success(), "distill_check.py failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

#[test]
fn distillation_losses_and_gradients_equal_a_pytorch_reference() {
    let Some(python) = common::python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model_dir = common::repo().join("data/default-model");
    let teacher_dir = dir.join("teacher");
    check_script(
        &python,
        &[
            "teacher".as_ref(),
            "--model".as_ref(),
            model_dir.as_os_str(),
            "--out".as_ref(),
            teacher_dir.as_os_str(),
        ],
    );
    let cfg = config(dir, &teacher_dir);
    let spec = ModelSpec::from_dir(&cfg.model.path).unwrap();
    let data = load_run_data(&cfg, &spec).unwrap();
    let examples: Vec<_> = data.train.examples.iter().take(6).collect();
    let batch = Batch::collate(&examples, data.tokenizer.eos_id, Device::Cpu);

    // A fresh adapter's B is zero; random values make the student differ from the base and give
    // every A a gradient.
    let mut student = load_model(&cfg.model.path, Kind::Float, Device::Cpu).unwrap();
    let adapters = lora::inject(&mut student, &cfg.lora, Device::Cpu).unwrap();
    tch::manual_seed(7);
    tch::no_grad(|| {
        for t in adapters.trainables.iter().filter(|t| t.peft_key.contains("lora_B")) {
            t.tensor.shallow_clone().copy_(&(Tensor::randn_like(&t.tensor) * 0.05));
        }
    });
    let adapter_dir = dir.join("adapter");
    peft::save(&adapter_dir, &cfg.lora, &adapters, &model_dir.display().to_string()).unwrap();
    let params: Vec<Tensor> = adapters.trainables.iter().map(|t| t.tensor.shallow_clone()).collect();

    let mut distiller = Distiller::load(&cfg, &spec, &data, Device::Cpu).unwrap();
    let mean = 1.0 / batch.label_tokens as f64;
    let mut jobs = Vec::new();
    for (name, divergence) in [
        ("forward_kl", Divergence::ForwardKl),
        ("reverse_kl", Divergence::ReverseKl),
        ("jsd", Divergence::Jsd),
    ] {
        distiller.loss = DistillLoss { temperature: 2.0, alpha: 0.3, divergence, jsd_beta: 0.3 };
        zero_grads(&params);
        let (sum, metrics) =
            distiller.batch_loss(&student, &batch, Some(Backward { scale: mean, checkpointing: false }));
        let grads: Vec<(String, Tensor)> =
            adapters.trainables.iter().map(|t| (t.peft_key.clone(), t.tensor.grad().copy())).collect();
        let grads_file = dir.join(format!("grads-{name}.safetensors"));
        std::fs::write(&grads_file, safetensors_bytes(&grads, &[]).unwrap()).unwrap();
        let rows: Vec<Value> =
            examples.iter().map(|e| json!({"input_ids": e.input_ids, "labels": e.labels})).collect();
        jobs.push(json!({
            "name": name, "loss": name, "temperature": 2.0, "alpha": 0.3, "jsd_beta": 0.3, "rows": rows,
            "loss_mean": sum.double_value(&[]) * mean, "kl_mean": metrics.double_value(&[0]) * mean,
            "ce_mean": metrics.double_value(&[1]) * mean, "grads": grads_file,
        }));
    }
    common::write(&dir.join("jobs.json"), &serde_json::to_string(&jobs).unwrap());

    let stdout = check_script(
        &python,
        &[
            "check".as_ref(),
            "--model".as_ref(),
            model_dir.as_os_str(),
            "--adapter".as_ref(),
            adapter_dir.as_os_str(),
            "--teacher".as_ref(),
            teacher_dir.as_os_str(),
            "--jobs".as_ref(),
            dir.join("jobs.json").as_os_str(),
        ],
    );
    let reports: Vec<Value> = serde_json::from_slice(&stdout).expect("distill_check.py prints JSON");
    assert_eq!(reports.len(), jobs.len());
    for report in &reports {
        println!("{report}");
        let name = &report["name"];
        let num = |key: &str| report[key].as_f64().unwrap_or_else(|| panic!("{name}: no {key} in {report}"));
        for key in ["loss_diff", "kl_diff", "ce_diff"] {
            assert!(num(key) <= 1e-6, "{name}: {key} above 1e-6: {report}");
        }
        assert_eq!(report["unmatched_grads"], json!([]), "{name}: {report}");
        assert_eq!(report["grads_compared"], 2 * 7 * 4, "{name}: every adapter tensor is compared");
        assert!(
            num("grad_max_abs") > 1e-4,
            "{name}: the reference gradient is too small to compare: {report}"
        );
        assert!(num("grad_max_abs_diff") <= 1e-6, "{name}: the gradients differ: {report}");
        if name == "jsd" {
            assert!(num("trl_jsd_diff") <= 1e-5, "jsd: D differs from TRL's GKD loss: {report}");
        }
        if report.get("torchtune_value").is_some() {
            assert!(num("torchtune_kl_diff") <= 1e-6, "{name}: torchtune's KL less the entropy: {report}");
            assert!(num("torchtune_grad_max_abs_diff") <= 1e-6, "{name}: torchtune's gradient: {report}");
        }
    }
}

#[test]
fn a_teacher_with_another_vocabulary_is_refused_naming_both_models() {
    let Some(assets) = common::assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let student = common::repo().join("data/default-model");

    // Another vocabulary size: stories260K has 512 tokens, the default model 768.
    let other_family = common::stories260k(&assets);
    config(dir, &other_family);
    let out = common::lorafit(dir, &["train", "run.yaml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a 512-token teacher was accepted: {stderr}");
    for part in [&other_family.display().to_string(), &student.display().to_string(), "512", "768"] {
        assert!(stderr.contains(part), "the error does not name {part}: {stderr}");
    }
    assert!(!dir.join("runs/distill").exists(), "a refused run left a run directory");

    // The same size, two tokens' ids swapped in the teacher's tokenizer.
    let swapped = dir.join("swapped");
    std::fs::create_dir(&swapped).unwrap();
    for entry in std::fs::read_dir(&student).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, swapped.join(path.file_name().unwrap())).unwrap();
    }
    let mut tokenizer: Value =
        serde_json::from_str(&std::fs::read_to_string(swapped.join("tokenizer.json")).unwrap()).unwrap();
    let vocab = tokenizer["model"]["vocab"].as_object_mut().unwrap();
    let (a, b) = (vocab["("].clone(), vocab[")"].clone());
    vocab.insert("(".into(), b);
    vocab.insert(")".into(), a);
    common::write(&swapped.join("tokenizer.json"), &tokenizer.to_string());
    config(dir, &swapped);
    let out = common::lorafit(dir, &["train", "run.yaml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a teacher with a different token map was accepted: {stderr}");
    for part in
        [&swapped.display().to_string(), &student.display().to_string(), "\"(\" is 11 in the student, 12"]
    {
        assert!(stderr.contains(part), "the error does not name {part}: {stderr}");
    }
}

/// `distill.quantize: nf4` holds the teacher's linear layers in 4 bits: every one the student's
/// `model.quantize` would quantize is (all but an untied output head), the teacher's logits are those of the same model loaded
/// with the base's 4-bit loading (and not the dense model's), and the memory estimate counts
/// the 4-bit sizes.
#[test]
fn a_teacher_held_in_4_bits_is_quantized_and_estimated_so() {
    use lorafit::config::QuantFormat;
    use lorafit::model::load_model_quantized;
    use lorafit::model::quantized::{model_bytes, quantized_sites, FrozenWeight};
    use lorafit::train::distill::{load_teacher, TEACHER_DOUBLE_QUANT};
    use lorafit::train::memory::MemoryEstimate;

    let tmp = tempfile::tempdir().unwrap();
    let teacher_dir = common::repo().join("data/default-model");
    let mut cfg = config(tmp.path(), &teacher_dir);
    let spec = ModelSpec::from_dir(&cfg.model.path).unwrap();
    let data = load_run_data(&cfg, &spec).unwrap();
    let dense_estimate = MemoryEstimate::of(&cfg, &spec, &cfg.lora, 64).unwrap().teacher;
    cfg.distill.quantize = Some(QuantFormat::Nf4);

    let mut teacher = load_teacher(&cfg, &spec, &data.tokenizer, Device::Cpu).unwrap();
    // Every linear layer but the output head, which bitsandbytes keeps in the compute dtype.
    let want_four_bit = quantized_sites(&teacher.sites).count();
    let layers = teacher.linear_layers_mut();
    let four_bit = layers.iter().filter(|(_, l)| matches!(l.weight, FrozenWeight::Quantized(_))).count();
    assert!(
        four_bit > 0 && four_bit == want_four_bit,
        "{four_bit} of {want_four_bit} teacher layers in 4 bits"
    );

    let ids = Tensor::from_slice(&[5i64, 17, 42, 99, 3, 250, 7]).unsqueeze(0);
    let logits = tch::no_grad(|| teacher.forward(&ids, false));
    let quantization = Some((QuantFormat::Nf4, TEACHER_DOUBLE_QUANT));
    let base = load_model_quantized(&teacher_dir, Kind::Float, Device::Cpu, quantization).unwrap();
    assert!(logits.equal(&tch::no_grad(|| base.forward(&ids, false))), "not the 4-bit model's logits");
    let dense = load_model(&teacher_dir, Kind::Float, Device::Cpu).unwrap();
    let shift = (&logits - tch::no_grad(|| dense.forward(&ids, false))).abs().max().double_value(&[]);
    assert!(shift > 0.0, "the 4-bit teacher's logits are the dense teacher's");

    let estimate = MemoryEstimate::of(&cfg, &spec, &cfg.lora, 64).unwrap().teacher;
    let sites = lorafit::model::LinearSites::of(&spec);
    let want = model_bytes(spec.parameter_count() as u64, Kind::Float, &sites, TEACHER_DOUBLE_QUANT);
    assert_eq!(estimate, want, "4-bit teacher estimate");
    assert!(estimate < dense_estimate, "4-bit {estimate} B not below dense {dense_estimate} B");
}
