//! Greedy decoding, to try a model before and after training.

use crate::model::Decoder;
use tch::{Device, Tensor};

/// Appends up to `max_new_tokens` greedy tokens to `prompt_ids`, stopping after `stop_at` if given.
/// Returns only the new tokens. Each step re-runs the whole sequence (no KV cache): meant for
/// short samples from small models.
pub fn greedy(
    model: &Decoder,
    prompt_ids: &[i64],
    max_new_tokens: usize,
    stop_at: Option<i64>,
    device: Device,
) -> Vec<i64> {
    let mut ids = prompt_ids.to_vec();
    tch::no_grad(|| {
        for _ in 0..max_new_tokens {
            let input = Tensor::from_slice(&ids).view([1, -1]).to_device(device);
            let logits = model.forward(&input, false);
            let next = logits.select(1, -1).argmax(-1, false).int64_value(&[0]);
            ids.push(next);
            if Some(next) == stop_at {
                break;
            }
        }
    });
    ids.split_off(prompt_ids.len())
}
