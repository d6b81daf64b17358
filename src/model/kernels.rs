//! Single-pass CPU kernels for elementwise parts of a block (src/model/fused_kernels.cpp), each
//! with its own autograd node: rotary embeddings and the SwiGLU product. Other devices take the
//! composed libtorch ops, which the kernels are tested against.

use std::ffi::{c_char, c_void, CStr};
use tch::{Device, Tensor};

extern "C" {
    fn lorafit_rope(x: *const c_void, cos: *const c_void, sin: *const c_void) -> *mut c_void;
    fn lorafit_silu_mul(gate: *const c_void, up: *const c_void) -> *mut c_void;
    fn lorafit_kernels_last_error() -> *const c_char;
}

/// The rotary embedding of `x` `[batch, seq, heads, head_dim]` (last dimension contiguous) with
/// tables `[batch, seq, rotary_dim]` in fp32: a new contiguous tensor in `x`'s kind,
/// bit-identical to the composed ops in the forward pass.
pub(super) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    debug_assert_eq!(x.device(), Device::Cpu);
    tensor(unsafe { lorafit_rope(ptr(x), ptr(cos), ptr(sin)) })
}

/// `silu(gate) · up` in fp32, rounded once to their kind.
pub(super) fn silu_mul(gate: &Tensor, up: &Tensor) -> Tensor {
    debug_assert_eq!(gate.device(), Device::Cpu);
    tensor(unsafe { lorafit_silu_mul(ptr(gate), ptr(up)) })
}

fn ptr(t: &Tensor) -> *const c_void {
    t.as_ptr().cast()
}

/// The tensor a call returned. A null handle is a libtorch failure: it panics as tch does on one
/// (`torch_errors::catch` turns that into an error naming what ran out).
fn tensor(handle: *mut c_void) -> Tensor {
    if handle.is_null() {
        let message = unsafe { CStr::from_ptr(lorafit_kernels_last_error()) }.to_string_lossy().into_owned();
        panic!("called `Result::unwrap()` on an `Err` value: {:?}", tch::TchError::Torch(message));
    }
    // SAFETY: a handle the C++ side allocated with `new at::Tensor`, owned from here on.
    unsafe { Tensor::from_ptr(handle.cast()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// The one-pass SwiGLU product and its gradients equal `silu(gate) · up` composed from
    /// libtorch's ops: to fp32 rounding in fp32 (its exp is not libtorch's), and within one bf16
    /// rounding in bf16 (it rounds once where the composed ops round after each op); for a
    /// strided gate and up as the joined gate/up output gives them.
    #[test]
    fn silu_mul_matches_composed_ops() {
        tch::manual_seed(5);
        for kind in [Kind::Float, Kind::BFloat16] {
            let both = (Tensor::randn([3, 7, 2 * 50], (Kind::Float, Device::Cpu)) * 4.0).to_kind(kind);
            let grad = Tensor::randn([3, 7, 50], (Kind::Float, Device::Cpu)).to_kind(kind);
            let run = |fused: bool| {
                let both = both.detach().set_requires_grad(true);
                let (gate, up) = (both.narrow(-1, 0, 50), both.narrow(-1, 50, 50));
                let out = if fused { silu_mul(&gate, &up) } else { gate.silu() * &up };
                (&out * &grad).sum(Kind::Float).backward();
                (out.detach().to_kind(Kind::Float), both.grad().to_kind(Kind::Float))
            };
            let ((out, grads), (want, want_grads)) = (run(true), run(false));
            let tolerance = if kind == Kind::Float { 1e-6 } else { 1.0 / 128.0 };
            for (ours, reference, what) in [(&out, &want, "output"), (&grads, &want_grads, "gradient")] {
                let scale = reference.abs().max().double_value(&[]);
                let diff = (ours - reference).abs().max().double_value(&[]);
                assert!(
                    scale > 0.0 && diff <= tolerance * scale,
                    "{kind:?} {what}: differs by {diff:e} (scale {scale:e})"
                );
            }
        }
    }
}
