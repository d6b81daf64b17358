//! The decoder's blocks run for training, either keeping every activation for autograd, or with
//! activation checkpointing: keeping only each block's input during the forward pass and running
//! the block again, one at a time from the last, during the backward pass.

use crate::data::Batch;
use crate::model::{Decoder, TokenPositions};
use tch::{Device, Kind, Tensor};

/// The forward activations of the blocks kept for the backward pass: all of autograd's graph, or
/// with checkpointing only each block's input, from which the block is recomputed.
pub struct Activations<'a> {
    /// With activation checkpointing a leaf that collects the gradient from the head; otherwise
    /// the end of the whole forward pass's autograd graph.
    pub output: Tensor,
    recompute: Option<Recompute<'a>>,
}

/// What running the blocks again needs.
struct Recompute<'a> {
    inputs: Vec<Tensor>,
    pass: TokenPositions<'a>,
    /// See [`Activations::forward`]; `None` without dropout.
    seed: Option<i64>,
}

impl<'a> Activations<'a> {
    /// Runs the blocks. When training applies dropout (the adapters' or the model's own), it draws
    /// one seed from the global generator and seeds each block's run with `seed + block`, with or
    /// without checkpointing, so that dropout draws the same masks when a block runs again, and
    /// the same masks in both modes. (Dropout on the embeddings draws before that, once: they are
    /// the first block's kept input.) Without dropout nothing random happens and the generator is
    /// left alone.
    pub fn forward(model: &Decoder, batch: &'a Batch, train: bool, checkpointing: bool) -> Activations<'a> {
        let (mut x, pass) = model.embed(&batch.input_ids, batch.packing.as_ref(), 0, train);
        let seed = (train && model.has_dropout())
            .then(|| Tensor::randint(i64::MAX, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]));
        let run = |i: usize, x: &Tensor| {
            if let Some(seed) = seed {
                tch::manual_seed(seed.wrapping_add(i as i64));
            }
            model.block(i, x, &pass, None, train)
        };
        if !(train && checkpointing) {
            for i in 0..model.num_blocks() {
                x = run(i, &x);
            }
            return Activations { output: x, recompute: None };
        }
        let mut inputs = Vec::with_capacity(model.num_blocks());
        tch::no_grad(|| {
            for i in 0..model.num_blocks() {
                let next = run(i, &x);
                inputs.push(std::mem::replace(&mut x, next));
            }
        });
        Activations { output: x.set_requires_grad(true), recompute: Some(Recompute { inputs, pass, seed }) }
    }

    /// Carries the gradient that has reached `output` back through the blocks, when they were
    /// run with activation checkpointing (otherwise autograd has already done so).
    pub fn backward(self, model: &Decoder) {
        let Some(r) = self.recompute else {
            return;
        };
        let mut grad = self.output.grad();
        for (i, input) in r.inputs.iter().enumerate().rev() {
            if !grad.defined() {
                break;
            }
            // The embeddings are frozen: the first block's input needs no gradient.
            let x = if i == 0 { input.shallow_clone() } else { input.detach().set_requires_grad(true) };
            if let Some(seed) = r.seed {
                tch::manual_seed(seed.wrapping_add(i as i64));
            }
            let out = model.block(i, &x, &r.pass, None, true);
            if out.requires_grad() {
                (out * &grad).sum(Kind::Float).backward();
            }
            grad = if i == 0 { Tensor::new() } else { x.grad() };
        }
    }
}
