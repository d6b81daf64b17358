//! Dynamic loss scaling for `train.precision: fp16-mixed`, with `torch.amp.GradScaler`'s
//! semantics.
//!
//! fp16 has five exponent bits: small activation gradients underflow to zero unless the loss is
//! multiplied by a large factor first. The step's gradient is computed for `scale · loss`, divided
//! by `scale` again before clipping, and the update is skipped when any gradient came out inf or
//! NaN (the scale was too large); the scale then halves. After `growth_interval` clean steps in a
//! row it doubles. The scale and the count of clean steps live on the device and are updated by
//! libtorch's own `_amp_update_scale_`, the kernel GradScaler calls, so no step waits on the host
//! for them.

use tch::{Kind, Tensor};

/// GradScaler's constructor arguments.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScalerSettings {
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: i64,
}

/// `torch.amp.GradScaler()`'s defaults.
pub const GRAD_SCALER_DEFAULTS: ScalerSettings =
    ScalerSettings { init_scale: 65536.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000 };

/// What a checkpoint keeps of the scaler: the scale and the clean steps since it last changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScalerState {
    pub scale: f64,
    pub growth_tracker: i64,
}

/// The loss scale of an fp16-mixed run.
pub struct LossScaler {
    settings: ScalerSettings,
    /// fp32 `[1]`, on the device of the gradients.
    scale: Tensor,
    /// int32 `[1]`: clean steps in a row since the scale last changed.
    growth_tracker: Tensor,
}

impl LossScaler {
    pub fn new(settings: ScalerSettings, device: tch::Device) -> LossScaler {
        LossScaler {
            settings,
            scale: Tensor::full([1], settings.init_scale, (Kind::Float, device)),
            growth_tracker: Tensor::zeros([1], (Kind::Int, device)),
        }
    }

    /// The factor the next step's loss is multiplied by (reads the device).
    pub fn scale(&self) -> f64 {
        self.scale.double_value(&[0])
    }

    /// Divides every gradient by the scale, in place (GradScaler's `unscale_`), and returns
    /// `found_inf`: an fp32 `[1]` tensor, 1 when any gradient is inf or NaN, else 0.
    pub fn unscale(&self, params: &[Tensor]) -> Tensor {
        // As GradScaler: the reciprocal in double, then rounded to fp32.
        let inv_scale = self.scale.to_kind(Kind::Double).reciprocal().to_kind(Kind::Float);
        tch::no_grad(|| {
            let mut non_finite = Vec::new();
            for p in params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.g_mul_(&inv_scale);
                    non_finite.push(g.isfinite().logical_not().any());
                }
            }
            match non_finite.is_empty() {
                true => self.scale.zeros_like(),
                false => Tensor::stack(&non_finite, 0).any().to_kind(Kind::Float).reshape([1]),
            }
        })
    }

    /// GradScaler's `update`: back off after a step with `found_inf`, grow after
    /// `growth_interval` clean steps in a row.
    pub fn update(&mut self, found_inf: &Tensor) {
        let s = self.settings;
        let _ = self.scale.internal_amp_update_scale_(
            &self.growth_tracker,
            found_inf,
            s.growth_factor,
            s.backoff_factor,
            s.growth_interval,
        );
    }

    pub fn state(&self) -> ScalerState {
        ScalerState { scale: self.scale(), growth_tracker: self.growth_tracker.int64_value(&[0]) }
    }

    pub fn restore(&mut self, state: ScalerState) {
        let _ = self.scale.fill_(state.scale);
        let _ = self.growth_tracker.fill_(state.growth_tracker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpointed state comes back exactly.
    #[test]
    fn state_round_trip() {
        let mut scaler = LossScaler::new(GRAD_SCALER_DEFAULTS, tch::Device::Cpu);
        let clean = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu));
        for _ in 0..3 {
            scaler.update(&clean);
        }
        scaler.update(&clean.ones_like());
        scaler.update(&clean);
        let state = scaler.state();
        let mut restored = LossScaler::new(GRAD_SCALER_DEFAULTS, tch::Device::Cpu);
        assert_ne!(restored.state(), state);
        restored.restore(state);
        assert_eq!(restored.state(), state);
    }
}
