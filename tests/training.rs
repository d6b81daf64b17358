//! Training semantics: only adapters change, and gradient accumulation equals one large batch.

mod common;

use lorafit::config::{Config, DataFormat, TargetModules};
use lorafit::data::format::{prepare, Example};
use lorafit::data::{Batch, TextTokenizer};
use lorafit::lora;
use lorafit::model::load_model;
use lorafit::model::quantized::FrozenWeight;
use lorafit::model::{Decoder, ModelSpec};
use lorafit::train::{Backward, Trainer};
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn setup(model_dir: &Path, data: &Path) -> (Config, Decoder, lora::AttachedAdapters, Vec<Example>) {
    let mut cfg = Config::new(model_dir, data);
    cfg.data.format = DataFormat::Completion;
    cfg.lora.dropout = 0.0;
    cfg.lora.target_modules = TargetModules::AllLinear;
    cfg.train.lr = 1e-2;
    cfg.train.max_grad_norm = None;
    let spec = ModelSpec::from_dir(model_dir).unwrap();
    let tok = TextTokenizer::from_model_dir(model_dir, &spec.eos_token_ids).unwrap();
    let examples = prepare(data, &cfg.data, &tok, None).unwrap().examples;
    tch::manual_seed(7);
    let mut model = load_model(model_dir, Kind::Float, Device::Cpu).unwrap();
    let injected = lora::inject(&mut model, &cfg.lora, Device::Cpu).unwrap();
    // Give B non-zero values so that both halves of every adapter get gradients at once.
    tch::no_grad(|| {
        for t in injected.trainables.iter().filter(|t| t.peft_key.contains("lora_B")) {
            let _ = t.tensor.shallow_clone().normal_(0.0, 0.02);
        }
    });
    (cfg, model, injected, examples)
}

fn params(injected: &lora::AttachedAdapters) -> Vec<Tensor> {
    injected.trainables.iter().map(|t| t.tensor.shallow_clone()).collect()
}

fn story_data(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("stories.jsonl");
    common::write(&path, common::STORY_ROWS);
    path
}

#[test]
fn a_step_changes_only_the_adapter() {
    let _turn = common::global_rng_turn();
    let Some(assets) = common::assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, mut model, injected, examples) = setup(&common::stories260k(&assets), &story_data(tmp.path()));
    let frozen_before: Vec<Tensor> = model.frozen_tensors().iter().map(|t| t.copy()).collect();
    let adapter_before: Vec<Tensor> = params(&injected).iter().map(|t| t.detach().copy()).collect();
    let mut trainer = Trainer::new(params(&injected), &cfg.train);
    let batch = Batch::collate(&examples.iter().collect::<Vec<_>>(), 0, Device::Cpu);
    trainer.step(&model, std::slice::from_ref(&batch), None, cfg.train.lr).unwrap();

    let frozen_after = model.frozen_tensors();
    assert_eq!(frozen_before.len(), frozen_after.len());
    for (before, after) in frozen_before.iter().zip(&frozen_after) {
        assert!(!after.requires_grad(), "a base tensor requires grad");
        assert!(!after.grad().defined(), "a base tensor got a gradient");
        assert!(before.equal(after), "a base tensor changed");
    }
    for (t, before) in injected.trainables.iter().zip(&adapter_before) {
        let change = (&t.tensor.detach() - before).abs().max().double_value(&[]);
        assert!(change > 0.0, "{} did not change", t.peft_key);
    }
}

/// Accumulated gradients of a step with micro-batches `groups` (indices into `examples`).
fn step_grads(
    groups: &[&[usize]],
    mean_of_means: bool,
    model_dir: &Path,
    data: &Path,
) -> (Vec<Tensor>, Vec<Tensor>) {
    let (mut cfg, model, injected, examples) = setup(model_dir, data);
    // A typical fine-tuning rate. Adam's first step is lr·g/(|g|+eps), which turns fp32 rounding
    // in near-zero gradient entries into differences of up to ~1e-3·lr; the gradients themselves
    // are compared at 1e-6 relative.
    cfg.train.lr = 1e-3;
    let batches: Vec<Batch> = groups
        .iter()
        .map(|g| Batch::collate(&g.iter().map(|&i| &examples[i]).collect::<Vec<_>>(), 0, Device::Cpu))
        .collect();
    let mut trainer = Trainer::new(params(&injected), &cfg.train);
    if mean_of_means {
        // The wrong way: average per-micro-batch means. Used to show the test can tell.
        for b in &batches {
            let scale = 1.0 / (b.label_tokens as f64 * batches.len() as f64);
            let _ = lorafit::train::token_loss(&model, b, Some(Backward { scale, checkpointing: false }));
        }
    } else {
        let _ = trainer.accumulate(&model, &batches, None, 1.0);
    }
    let grads: Vec<Tensor> = trainer.params.iter().map(|p| p.grad().copy()).collect();
    trainer.optimizer.update(&mut trainer.params, cfg.train.lr);
    let updated: Vec<Tensor> = trainer.params.iter().map(|p| p.detach().copy()).collect();
    (grads, updated)
}

fn max_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs().max().double_value(&[])).fold(0.0, f64::max)
}

#[test]
fn grad_accumulation_equals_one_large_batch() {
    let _turn = common::global_rng_turn();
    let Some(assets) = common::assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (dir, data) = (common::stories260k(&assets), story_data(tmp.path()));
    let lengths: Vec<usize> = setup(&dir, &data).3.iter().map(|e| e.input_ids.len()).collect();
    assert!(lengths.windows(2).any(|w| w[0] != w[1]), "examples must differ in length: {lengths:?}");

    let (big_grads, big_update) = step_grads(&[&[0, 1, 2, 3]], false, &dir, &data);
    let (acc_grads, acc_update) = step_grads(&[&[0], &[1], &[2], &[3]], false, &dir, &data);
    let scale = big_grads.iter().map(|g| g.abs().max().double_value(&[])).fold(0.0, f64::max);
    let grad_diff = max_diff(&big_grads, &acc_grads);
    let update_diff = max_diff(&big_update, &acc_update);
    assert!(grad_diff <= 1e-6 * scale.max(1.0), "gradients differ by {grad_diff} (largest {scale})");
    eprintln!("max gradient difference {grad_diff:e} (largest gradient {scale:e}), update difference {update_diff:e}");
    assert!(update_diff <= 1e-6, "first-step updates differ by {update_diff}");

    let (wrong_grads, _) = step_grads(&[&[0], &[1], &[2], &[3]], true, &dir, &data);
    let wrong_diff = max_diff(&big_grads, &wrong_grads);
    assert!(wrong_diff > 1e-3 * scale, "a mean of micro-batch means should differ, got {wrong_diff}");
}

/// Projections that read the same input (q/k/v, gate/up) run as one GEMM over their joined
/// weights: the loss and every adapter gradient equal those of the layers multiplied one by one
/// (to fp32 rounding), for a family with q/k/v biases (Qwen 2), one without (Llama 3) and one with
/// grouped keys and values of another width (SmolLM2).
#[test]
fn joined_projections_match_separate_ones() {
    let _turn = common::global_rng_turn();
    let ids: Vec<i64> = (0..24).map(|i| (i * 37 + 5) % 250).collect();
    let example = Example { input_ids: ids.clone(), labels: ids, desirable: None };
    let batch = Batch::collate(&[&example, &example], 0, Device::Cpu);
    for family in ["qwen2", "llama3", "smollm2"] {
        tch::manual_seed(3);
        let mut model = load_model(&common::fixture(family), Kind::Float, Device::Cpu).unwrap();
        let cfg = lorafit::config::LoraConfig {
            target_modules: TargetModules::AllLinear,
            dropout: 0.0,
            ..Default::default()
        };
        let injected = lora::inject(&mut model, &cfg, Device::Cpu).unwrap();
        tch::no_grad(|| {
            for p in params(&injected) {
                p.shallow_clone().copy_(&(p.randn_like() * 0.05));
            }
        });
        let run = |model: &Decoder| {
            let backward = Backward { scale: 1.0, checkpointing: false };
            let loss = lorafit::train::token_loss(model, &batch, Some(backward)).double_value(&[]);
            let grads: Vec<Tensor> = params(&injected).iter().map(|p| p.grad().copy()).collect();
            for p in params(&injected) {
                let _ = p.grad().zero_();
            }
            (loss, grads)
        };
        assert_eq!(model.joined_projections(), 2 * model.num_blocks(), "{family}: not joined at load");
        let (loss, grads) = run(&model);
        // A weight replaced after loading leaves its group: every layer then multiplies alone.
        for (_, layer) in model.linear_layers_mut() {
            layer.weight = FrozenWeight::Dense(layer.weight.dense().copy());
        }
        assert_eq!(model.joined_projections(), 0, "{family}: replaced weights still counted as joined");
        let (want_loss, want) = run(&model);
        assert!((loss - want_loss).abs() <= 1e-6 * want_loss.abs(), "{family}: loss {loss} vs {want_loss}");
        for ((g, w), t) in grads.iter().zip(&want).zip(&injected.trainables) {
            let scale = w.abs().max().double_value(&[]);
            assert!(scale > 0.0, "{family}: {} has no gradient", t.peft_key);
            let diff = (g - w).abs().max().double_value(&[]);
            assert!(diff <= 1e-5 * scale, "{family}: {} differs by {diff:e} (scale {scale:e})", t.peft_key);
        }
    }
}
