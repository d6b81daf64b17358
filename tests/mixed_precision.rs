//! fp16-mixed: the dynamic loss scale behaves as torch.amp.GradScaler's (checked against it by
//! the interop python), an overflowing step leaves the adapter as it was, the scaled gradient
//! unscales to the fp32 one, and the scale survives a checkpoint.

mod common;

use lorafit::config::{Config, DataFormat, Precision, TargetModules};
use lorafit::data::format::prepare;
use lorafit::data::{Batch, TextTokenizer};
use lorafit::lora;
use lorafit::model::{load_model, Decoder, ModelSpec};
use lorafit::train::checkpoint;
use lorafit::train::scaler::{LossScaler, ScalerSettings, ScalerState, GRAD_SCALER_DEFAULTS};
use lorafit::train::Trainer;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use tch::{Device, Kind, Tensor};

/// A step's gradient multiplier that overflows fp32 once multiplied by any scale above ~3.4e3.
const OVERFLOWS: f64 = 1e35;

/// The scales after each update, and whether each step was applied, as torch.amp.GradScaler
/// gives them for these step inputs (see scripts/interop/grad_scaler_reference.py).
fn reference(python: &Path, settings: ScalerSettings, inputs: &[f64]) -> (Vec<f64>, Vec<bool>) {
    let as_json = |x: f64| match x {
        x if x.is_nan() => json!("nan"),
        x if x.is_infinite() => json!("inf"),
        x => json!(x),
    };
    let request = json!({
        "settings": {
            "init_scale": settings.init_scale,
            "growth_factor": settings.growth_factor,
            "backoff_factor": settings.backoff_factor,
            "growth_interval": settings.growth_interval,
        },
        "inputs": inputs.iter().map(|&x| as_json(x)).collect::<Vec<_>>(),
    });
    let script = common::repo().join("scripts/interop/grad_scaler_reference.py");
    let mut child = Command::new(python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the interop python");
    child.stdin.take().unwrap().write_all(request.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    let scales = answer["scales"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let applied = answer["applied"].as_array().unwrap().iter().map(|v| v.as_bool().unwrap()).collect();
    (scales, applied)
}

/// The same steps through [`LossScaler`]: scale the loss, backward, unscale, update.
fn ours(settings: ScalerSettings, inputs: &[f64]) -> (Vec<f64>, Vec<bool>) {
    let mut scaler = LossScaler::new(settings, Device::Cpu);
    let p = Tensor::ones([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let (mut scales, mut applied) = (Vec::new(), Vec::new());
    for &x in inputs {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
        let x = Tensor::full([4], x, (Kind::Float, Device::Cpu));
        ((&p * x).sum(Kind::Float) * scaler.scale()).backward();
        let found_inf = scaler.unscale(std::slice::from_ref(&p));
        applied.push(found_inf.double_value(&[0]) == 0.0);
        scaler.update(&found_inf);
        scales.push(scaler.scale());
    }
    (scales, applied)
}

/// Sequences of clean and overflowing steps (by inf and NaN gradients, and by finite ones the
/// scale pushes past fp32), with GradScaler's defaults over more than one growth interval, with a
/// short interval and other factors, and with growth stopping short of fp32's largest value.
#[test]
fn scale_follows_grad_scaler() {
    let Some(python) = common::python() else {
        return;
    };
    let mut defaults = vec![1.0; 2100];
    for (step, x) in
        [(5, OVERFLOWS), (6, OVERFLOWS), (2040, f64::INFINITY), (2050, f64::NAN), (2090, OVERFLOWS)]
    {
        defaults[step] = x;
    }
    let short =
        ScalerSettings { init_scale: 1024.0, growth_factor: 4.0, backoff_factor: 0.25, growth_interval: 3 };
    let pattern: Vec<f64> =
        (0..40).map(|i| if [4, 5, 11, 12, 13, 30].contains(&i) { OVERFLOWS * 1e-3 } else { 0.5 }).collect();
    let near_max = ScalerSettings { init_scale: 2f64.powi(125), growth_interval: 1, ..GRAD_SCALER_DEFAULTS };
    let saturating = [1e-30, 1e-30, 1e-30, 1e-30, f64::INFINITY, 1e-30, 1e-30];
    for (settings, inputs) in
        [(GRAD_SCALER_DEFAULTS, &defaults[..]), (short, &pattern[..]), (near_max, &saturating[..])]
    {
        let (want_scales, want_applied) = reference(&python, settings, inputs);
        let (got_scales, got_applied) = ours(settings, inputs);
        assert_eq!(got_applied, want_applied, "{settings:?}: which steps were applied");
        assert_eq!(got_scales, want_scales, "{settings:?}: the scale after each step");
        // The sequences exercise both directions.
        assert!(want_applied.contains(&false) && want_scales.windows(2).any(|w| w[1] > w[0]));
    }
}

/// The tiny model in fp16 (`precision` fp16-mixed's weights and activations) with adapters on
/// every linear layer (B non-zero, so that every adapter tensor gets a gradient), its trainer
/// config, and one batch of the stories.
fn fp16_setup(assets: &Path, dir: &Path, kind: Kind) -> (Config, Decoder, lora::AttachedAdapters, Batch) {
    let model_dir = common::stories260k(assets);
    let data = dir.join("stories.jsonl");
    common::write(&data, common::STORY_ROWS);
    let mut cfg = Config::new(&model_dir, &data);
    cfg.data.format = DataFormat::Completion;
    cfg.lora.dropout = 0.0;
    cfg.lora.target_modules = TargetModules::AllLinear;
    cfg.train.precision = Precision::Fp16Mixed;
    let spec = ModelSpec::from_dir(&model_dir).unwrap();
    let tok = TextTokenizer::from_model_dir(&model_dir, &spec.eos_token_ids).unwrap();
    let examples = prepare(&data, &cfg.data, &tok, None).unwrap().examples;
    tch::manual_seed(7);
    let mut model = load_model(&model_dir, kind, Device::Cpu).unwrap();
    model.activations = kind;
    let injected = lora::inject(&mut model, &cfg.lora, Device::Cpu).unwrap();
    tch::no_grad(|| {
        for t in injected.trainables.iter().filter(|t| t.peft_key.contains("lora_B")) {
            let _ = t.tensor.shallow_clone().normal_(0.0, 0.02);
        }
    });
    let batch = Batch::collate(&examples.iter().collect::<Vec<_>>(), 0, Device::Cpu);
    (cfg, model, injected, batch)
}

fn params(injected: &lora::AttachedAdapters) -> Vec<Tensor> {
    injected.trainables.iter().map(|t| t.tensor.shallow_clone()).collect()
}

/// The adapter's bytes as the PEFT file would hold them.
fn adapter_bytes(injected: &lora::AttachedAdapters) -> Vec<Vec<u8>> {
    injected
        .trainables
        .iter()
        .map(|t| {
            let flat = t.tensor.detach().contiguous().view([-1]);
            Vec::<f32>::try_from(&flat).unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
        })
        .collect()
}

/// A step whose scaled gradient overflows is skipped (not an error), leaves the adapter's bytes
/// and the optimizer untouched, and backs the scale off; the next step at a sane scale applies.
#[test]
fn overflowing_step_is_skipped() {
    let _turn = common::global_rng_turn();
    let Some(assets) = common::assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, model, injected, batch) = fp16_setup(&assets, tmp.path(), Kind::Half);
    let mut trainer = Trainer::new(params(&injected), &cfg.train);
    let huge = ScalerState { scale: f32::MAX as f64, growth_tracker: 0 };
    trainer.scaler.as_mut().expect("fp16-mixed has a loss scaler").restore(huge);
    let before = adapter_bytes(&injected);
    let stats = trainer.step(&model, std::slice::from_ref(&batch), None, 1e-2).unwrap();
    assert!(!stats.applied && stats.overflow, "the overflowing step was applied");
    assert!(stats.loss.is_finite(), "the loss itself is finite: {}", stats.loss);
    assert_eq!(stats.loss_scale, Some(huge.scale));
    assert!(adapter_bytes(&injected) == before, "a skipped step changed the adapter");
    assert_eq!(trainer.optimizer.step, 0, "a skipped step counted as an update");
    let after = trainer.scaler.as_ref().unwrap().state();
    assert_eq!(after.scale, huge.scale * GRAD_SCALER_DEFAULTS.backoff_factor);

    trainer.scaler.as_mut().unwrap().restore(ScalerState { scale: GRAD_SCALER_DEFAULTS.init_scale, ..after });
    let stats = trainer.step(&model, std::slice::from_ref(&batch), None, 1e-2).unwrap();
    assert!(stats.applied && !stats.overflow, "a step at the initial scale was skipped");
    assert!(adapter_bytes(&injected) != before, "an applied step left the adapter as it was");
}

/// With the loss scale, fp16's small gradients survive and unscaling gives back the gradient of
/// the fp32 model to fp16 accuracy.
#[test]
fn unscaled_gradient_matches_fp32() {
    let _turn = common::global_rng_turn();
    let Some(assets) = common::assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let grads = |kind: Kind| {
        let (cfg, model, injected, batch) = fp16_setup(&assets, tmp.path(), kind);
        let mut trainer = Trainer::new(params(&injected), &cfg.train);
        let scaler = trainer.scaler.take().unwrap();
        let scale = if kind == Kind::Half { scaler.scale() } else { 1.0 };
        let _ = trainer.accumulate(&model, std::slice::from_ref(&batch), None, scale);
        if kind == Kind::Half {
            let found_inf = scaler.unscale(&trainer.params);
            assert_eq!(found_inf.double_value(&[0]), 0.0, "the initial scale overflowed");
        }
        let flat: Vec<Tensor> = trainer.params.iter().map(|p| p.grad().view([-1])).collect();
        Tensor::cat(&flat, 0)
    };
    let (reference, fp16) = (grads(Kind::Float), grads(Kind::Half));
    let error = (&fp16 - &reference).norm().double_value(&[]) / reference.norm().double_value(&[]);
    assert!(error < 1e-2, "fp16-mixed gradient differs from fp32's by {error:.2e} (relative)");
}

/// A checkpoint keeps the loss scale and its count of clean steps, and resuming restores them.
#[test]
fn checkpoint_keeps_the_scale() {
    let _turn = common::global_rng_turn();
    let Some(assets) = common::assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, _model, injected, _batch) = fp16_setup(&assets, tmp.path(), Kind::Half);
    let mut trainer = Trainer::new(params(&injected), &cfg.train);
    let state = ScalerState { scale: 2048.0, growth_tracker: 17 };
    trainer.scaler.as_mut().unwrap().restore(state);
    let dir = tmp.path().join("step-1");
    let trainer_state = checkpoint::TrainerState::default();
    checkpoint::save(&dir, &trainer_state, &cfg.lora, &injected, &trainer, "base").unwrap();
    let mut resumed = Trainer::new(params(&injected), &cfg.train);
    assert_ne!(resumed.scaler.as_ref().unwrap().state(), state);
    checkpoint::load(&dir, &injected, &mut resumed).unwrap();
    assert_eq!(resumed.scaler.as_ref().unwrap().state(), state);
}
