//! Rotary position embeddings as transformers computes them: the cos/sin tables of each family's
//! frequency scaling, and their application to queries and keys.

use super::spec::{Rope, RopeScaling};
use tch::{Kind, Tensor};

/// cos/sin tables `[batch, 1, seq, rotary_dim]` for `positions` `[batch, seq]` (Hugging Face's
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
    let shape = [batch, 1, seq, dim];
    ((emb.cos() * attention_factor).view(shape), (emb.sin() * attention_factor).view(shape))
}

/// `x·cos + rotate_half(x)·sin` on the leading `rotary_dim` dimensions of `[batch, heads, seq,
/// head_dim]`, in `x`'s kind.
pub(super) fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let head_dim = x.size()[3];
    let rotary_dim = cos.size()[3];
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
