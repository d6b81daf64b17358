//! The CUDA paths, run where libtorch sees a GPU (the GPU check runs this binary) and skipped
//! with a count elsewhere: attention through the fused SDPA kernels gives the CPU's logits, and
//! the loss scaler on the GPU follows the CPU's (which tests/mixed_precision.rs checks against
//! torch.amp.GradScaler).

mod common;

use lorafit::model::attention::AttentionPath;
use lorafit::model::load_model;
use lorafit::packing::Packing;
use lorafit::train::scaler::{LossScaler, ScalerSettings};
use tch::{Device, Kind, Tensor};

/// The first GPU, or `None` after a skip.
fn gpu() -> Option<Device> {
    if tch::Cuda::is_available() {
        return Some(Device::Cuda(0));
    }
    common::skip_without_hardware("no CUDA device (this test runs in scripts/gpu/check.sh)");
    None
}

/// The tiny model's fp32 logits on the GPU (through the fused SDPA paths, which it reports)
/// equal those on the CPU, for unpacked and packed rows.
#[test]
fn fused_attention_matches_cpu() {
    let Some(cuda) = gpu() else { return };
    // The shipped default model: the GPU machine has the repository but not the test assets.
    let dir = common::repo().join("data/default-model");
    let ids = Tensor::randint(500, [2, 96], (Kind::Int64, Device::Cpu));
    let segments = vec![vec![40, 1, 55], vec![96]];
    for packed in [false, true] {
        let path = AttentionPath::choose(cuda, Kind::Float, 96, false, packed);
        println!("attention path on CUDA (fp32, packed: {packed}): {}", path.name());
        assert!(matches!(path, AttentionPath::FusedCausal | AttentionPath::FusedMasked));
        for kind in [Kind::BFloat16, Kind::Half] {
            println!(
                "attention path on CUDA ({kind:?}, 1024 tokens, packed: {packed}): {}",
                AttentionPath::choose(cuda, kind, 1024, false, packed).name()
            );
        }
        let logits = |device: Device| {
            let model = load_model(&dir, Kind::Float, device).unwrap();
            let packing = packed.then(|| Packing::from_segments(segments.clone(), device));
            model.forward_packed(&ids.to_device(device), packing.as_ref(), false).to_device(Device::Cpu)
        };
        let diff = (logits(cuda) - logits(Device::Cpu)).abs().max().double_value(&[]);
        assert!(diff < 1e-3, "packed: {packed}: CUDA logits differ from the CPU's by {diff:.2e}");
    }
}

/// The scale sequence of an overflow pattern is the same on the GPU as on the CPU.
#[test]
fn loss_scaler_on_gpu() {
    let Some(cuda) = gpu() else { return };
    let settings =
        ScalerSettings { init_scale: 1024.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 3 };
    let scales = |device: Device| {
        let mut scaler = LossScaler::new(settings, device);
        let p = Tensor::ones([4], (Kind::Float, device)).set_requires_grad(true);
        let mut out = Vec::new();
        for step in 0..20 {
            let x = if [4, 9, 10].contains(&step) { f64::INFINITY } else { 1.0 };
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
            ((&p * x).sum(Kind::Float) * scaler.scale()).backward();
            let found_inf = scaler.unscale(std::slice::from_ref(&p));
            scaler.update(&found_inf);
            out.push(scaler.scale());
        }
        out
    };
    assert_eq!(scales(cuda), scales(Device::Cpu));
}
