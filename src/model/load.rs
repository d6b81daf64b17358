//! Loading the base model as a command needs it: the device `train.device` names, the dtypes of
//! the frozen weights and of the activations for a resolved precision, and the frozen decoder.

use super::{Decoder, ModelSpec, Weights};
use crate::config::{Config, DeviceName, Precision, QuantFormat, WeightDtype};
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::{Device, Kind};

/// The device named by `train.device`.
pub fn resolve_device(name: &str) -> Result<Device> {
    let device = match DeviceName::parse(name) {
        Some(DeviceName::Auto) => Device::cuda_if_available(),
        Some(DeviceName::Cpu) => Device::Cpu,
        Some(DeviceName::Cuda(i)) => Device::Cuda(i),
        None => bail!("train.device `{name}` is not one of auto, cpu, cuda, cuda:N"),
    };
    if let Device::Cuda(i) = device {
        if !tch::Cuda::is_available() || i >= tch::Cuda::device_count() as usize {
            bail!(
                "train.device `{name}`: no such CUDA device here (libtorch sees {}); \
                 use `auto` or `cpu`, or install the CUDA libtorch with scripts/setup/libtorch.sh --cuda",
                tch::Cuda::device_count()
            );
        }
    }
    Ok(device)
}

/// The dtype frozen weights are held in, for a resolved `precision`.
pub fn weight_kind(dtype: WeightDtype, precision: Precision) -> Kind {
    match dtype {
        WeightDtype::Fp32 => Kind::Float,
        WeightDtype::Bf16 => Kind::BFloat16,
        WeightDtype::Fp16 => Kind::Half,
        WeightDtype::Auto => activation_kind(precision),
    }
}

/// The dtype of the activations inside each block for a resolved `precision` (every command
/// resolves `auto` before it loads the model).
pub fn activation_kind(precision: Precision) -> Kind {
    match precision {
        Precision::Fp32 => Kind::Float,
        Precision::Bf16Mixed => Kind::BFloat16,
        Precision::Fp16Mixed => Kind::Half,
        Precision::Auto => unreachable!("train.precision auto is resolved when a run starts"),
    }
}

/// Loads the base model from `dir`, frozen, with weights in `kind`.
pub fn load_model(dir: &Path, kind: Kind, device: Device) -> Result<Decoder> {
    load_model_quantized(dir, kind, device, None)
}

/// [`load_model`], with the linear layers' weights quantized to a 4-bit format (and their
/// scales to 8 bits when the flag is set) tensor by tensor as they are read.
pub fn load_model_quantized(
    dir: &Path,
    kind: Kind,
    device: Device,
    quantization: Option<(QuantFormat, bool)>,
) -> Result<Decoder> {
    let spec = ModelSpec::from_dir(dir)?;
    let mut weights = Weights::open(dir, kind, device)?;
    weights.set_quantization(quantization);
    let context = || format!("loading the model in {}", dir.display());
    // Decoder::load is the one place that knows which tensors a model takes: run on the headers
    // alone, it checks every name, dtype and shape before any data is read.
    Decoder::load(spec.clone(), weights.headers_only()).with_context(context)?;
    Decoder::load(spec, weights).with_context(context)
}

/// The run's base model: weights in `model.dtype`, activations in `train.precision`'s kind
/// (already resolved).
pub fn load_model_for(cfg: &Config, device: Device) -> Result<Decoder> {
    let kind = weight_kind(cfg.model.dtype, cfg.train.precision);
    let quantization = cfg.model.quantize.map(|format| (format, cfg.model.double_quant));
    let mut model = load_model_quantized(&cfg.model.path, kind, device, quantization)?;
    model.activations = activation_kind(cfg.train.precision);
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names config validation rejects are rejected here too, as names rather than as
    /// missing GPUs.
    #[test]
    fn rejects_what_config_rejects() {
        for bad in ["cuda:+1", "cuda:x", "gpu"] {
            let err = resolve_device(bad).unwrap_err().to_string();
            assert!(err.contains("is not one of auto, cpu, cuda, cuda:N"), "{bad}: {err}");
        }
        assert_eq!(resolve_device("cpu").unwrap(), Device::Cpu);
    }
}
