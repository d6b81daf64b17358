//! Rotary position embeddings as transformers computes them: the cos/sin tables of each family's
//! frequency scaling, and their application to queries and keys.

use super::kernels;
use super::spec::{Rope, RopeScaling};
use tch::{Device, Kind, Tensor};

/// cos/sin tables `[batch, seq, rotary_dim]` for `positions` `[batch, seq]` (Hugging Face's
/// half-split layout), including the family's frequency scaling and its attention factor.
pub(super) fn rope_tables(rope: &Rope, positions: &Tensor) -> (Tensor, Tensor) {
    let device = positions.device();
    let (batch, seq) = positions.size2().expect("positions are [batch, seq]");
    // Longrope picks its factors by sequence length, as transformers does from the positions.
    let span = || positions.max().int64_value(&[]) + 1;
    let dim = rope.rotary_dim;
    // In fp32 exactly as transformers computes them, so far positions rotate identically.
    let exponents =
        Tensor::arange_start_step(0, dim, 2, (Kind::Int64, device)).to_kind(Kind::Float) / dim as f64;
    let powers = Tensor::pow_scalar(rope.theta, &exponents);
    let (inv_freq, attention_factor) = match &rope.scaling {
        RopeScaling::None => (powers.reciprocal(), 1.0),
        RopeScaling::Linear { factor } => (powers.reciprocal() / *factor, 1.0),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let inv_freq = powers.reciprocal();
            let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
            let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
            let scaled = inv_freq.where_self(&wavelen.le(low_wavelen), &(&inv_freq / *factor));
            let smooth =
                (wavelen.reciprocal() * *old - *low_freq_factor) / (high_freq_factor - low_freq_factor);
            let smoothed = (smooth.ones_like() - &smooth) * &scaled / *factor + &smooth * &scaled;
            let medium = wavelen.ge(high_wavelen).logical_and(&wavelen.le(low_wavelen));
            (smoothed.where_self(&medium, &scaled), 1.0)
        }
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            attention_factor,
        } => {
            let factors = if span() > *original_max_position_embeddings { long_factor } else { short_factor };
            let factors = Tensor::from_slice(factors).to_kind(Kind::Float).to_device(device);
            ((factors * powers).reciprocal(), *attention_factor)
        }
    };
    let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq;
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    let shape = [batch, seq, dim];
    ((emb.cos() * attention_factor).view(shape), (emb.sin() * attention_factor).view(shape))
}

/// `x·cos + rotate_half(x)·sin` on the leading `rotary_dim` dimensions of `[batch, seq, heads,
/// head_dim]` (last dimension contiguous), in `x`'s kind: one pass on the CPU
/// ([`kernels::rope`], bit-identical in the forward pass), the composed ops elsewhere.
pub(super) fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    match x.device() {
        Device::Cpu => kernels::rope(x, cos, sin),
        _ => apply_rope_composed(x, cos, sin),
    }
}

/// [`apply_rope`] as libtorch ops: the tables broadcast over the heads.
fn apply_rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let head_dim = x.size()[3];
    let rotary_dim = cos.size()[2];
    let (cos, sin) = (cos.unsqueeze(2), sin.unsqueeze(2));
    let (rot, pass) = (x.narrow(3, 0, rotary_dim), x.narrow(3, rotary_dim, head_dim - rotary_dim));
    let half = rotary_dim / 2;
    let rotated = Tensor::cat(&[&(-rot.narrow(3, half, half)), &rot.narrow(3, 0, half)], 3);
    // In fp32 (the tables' kind), back in x's kind.
    let out = (&rot * cos + rotated * sin).to_kind(x.kind());
    if rotary_dim == head_dim {
        out
    } else {
        Tensor::cat(&[&out, &pass], 3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs and gradients of one case: `x` `[batch, seq, heads, head_dim]` viewed out of a
    /// wider tensor (as q is out of the joined q/k/v output), tables for `rotary_dim`.
    fn case(kind: Kind, head_dim: i64, rotary_dim: i64) -> (Tensor, Tensor, Tensor, Tensor) {
        tch::manual_seed(11);
        let (batch, seq, heads) = (2, 5, 3);
        let wide =
            Tensor::randn([batch, seq, heads * head_dim + 7], (Kind::Float, Device::Cpu)).to_kind(kind);
        let x = wide.narrow(2, 0, heads * head_dim).view([batch, seq, heads, head_dim]);
        let positions = Tensor::arange(seq, (Kind::Int64, Device::Cpu)).unsqueeze(0).repeat([batch, 1]) * 37;
        let rope = Rope { theta: 10000.0, rotary_dim, scaling: RopeScaling::None };
        let (cos, sin) = rope_tables(&rope, &positions);
        let grad = Tensor::randn([batch, seq, heads, head_dim], (Kind::Float, Device::Cpu)).to_kind(kind);
        (x, cos, sin, grad)
    }

    fn forward_backward(
        f: fn(&Tensor, &Tensor, &Tensor) -> Tensor,
        case: &(Tensor, Tensor, Tensor, Tensor),
    ) -> (Tensor, Tensor) {
        let (x, cos, sin, grad) = case;
        let x = x.detach().set_requires_grad(true);
        let out = f(&x, cos, sin);
        (&out * grad).sum(Kind::Float).backward();
        (out.detach(), x.grad())
    }

    /// The one-pass kernel gives the composed ops' output bit for bit, and their gradient (bit for
    /// bit in fp32; in bf16 within one rounding, as it sums in fp32 before rounding once), for
    /// full and partial rotary dimensions and a strided input.
    #[test]
    fn kernel_matches_composed_ops() {
        for kind in [Kind::Float, Kind::BFloat16] {
            for (head_dim, rotary_dim) in [(16, 16), (16, 8), (64, 64)] {
                let case = case(kind, head_dim, rotary_dim);
                let (out, grad) = forward_backward(apply_rope, &case);
                let (want, want_grad) = forward_backward(apply_rope_composed, &case);
                let what = format!("{kind:?} head_dim {head_dim} rotary_dim {rotary_dim}");
                assert!(out.equal(&want), "{what}: outputs differ by {}", (&out - &want).abs().max());
                let diff = (&grad - &want_grad).to_kind(Kind::Float).abs().max().double_value(&[]);
                let scale = want_grad.to_kind(Kind::Float).abs().max().double_value(&[]);
                let tolerance = if kind == Kind::Float { 0.0 } else { scale / 128.0 };
                assert!(diff <= tolerance, "{what}: gradients differ by {diff:e} (scale {scale:e})");
            }
        }
    }
}
