//! Examples → right-padded batch tensors, in a seeded order per epoch.

use super::format::{Example, IGNORE};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{Device, Tensor};

/// One micro-batch: `[batch, seq]` ids and labels, right-padded.
pub struct Batch {
    pub input_ids: Tensor,
    pub labels: Tensor,
    /// Tokens that count in the loss (labels other than IGNORE, after the shift).
    pub label_tokens: i64,
    /// Real (non-pad) tokens.
    pub real_tokens: i64,
    /// Tokens including padding.
    pub padded_tokens: i64,
}

impl Batch {
    /// Pads `examples` on the right with `pad_id` (labels IGNORE). Padding is invisible to real
    /// tokens under causal attention.
    pub fn collate(examples: &[&Example], pad_id: i64, device: Device) -> Batch {
        let seq = examples
            .iter()
            .map(|e| e.input_ids.len())
            .max()
            .unwrap_or(0);
        let mut ids = Vec::with_capacity(examples.len() * seq);
        let mut labels = Vec::with_capacity(examples.len() * seq);
        let mut label_tokens = 0;
        for e in examples {
            let pad = seq - e.input_ids.len();
            ids.extend_from_slice(&e.input_ids);
            ids.extend(std::iter::repeat_n(pad_id, pad));
            labels.extend_from_slice(&e.labels);
            labels.extend(std::iter::repeat_n(IGNORE, pad));
            label_tokens += e.labels.iter().skip(1).filter(|&&l| l != IGNORE).count() as i64;
        }
        let shape = [examples.len() as i64, seq as i64];
        Batch {
            input_ids: Tensor::from_slice(&ids).view(shape).to_device(device),
            labels: Tensor::from_slice(&labels).view(shape).to_device(device),
            label_tokens,
            real_tokens: examples.iter().map(|e| e.input_ids.len() as i64).sum(),
            padded_tokens: shape[0] * shape[1],
        }
    }
}

/// Which examples each optimizer step of an epoch uses: a seeded shuffle cut into steps of
/// `grad_accum_steps` micro-batches of `micro_batch_size` (the last step may be shorter).
pub struct EpochPlan {
    /// steps → micro-batches → example indices
    pub steps: Vec<Vec<Vec<usize>>>,
}

impl EpochPlan {
    pub fn new(
        n_examples: usize,
        micro_batch_size: usize,
        grad_accum_steps: usize,
        shuffle: bool,
        seed: u64,
        epoch: usize,
    ) -> EpochPlan {
        let mut order: Vec<usize> = (0..n_examples).collect();
        if shuffle {
            // One independent stream per epoch, so any epoch's order can be recomputed alone.
            let mut rng = StdRng::seed_from_u64(
                seed.wrapping_add(epoch as u64)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            order.shuffle(&mut rng);
        }
        let micro: Vec<Vec<usize>> = order.chunks(micro_batch_size).map(|c| c.to_vec()).collect();
        EpochPlan {
            steps: micro.chunks(grad_accum_steps).map(|c| c.to_vec()).collect(),
        }
    }

    pub fn steps_per_epoch(
        n_examples: usize,
        micro_batch_size: usize,
        grad_accum_steps: usize,
    ) -> usize {
        n_examples.div_ceil(micro_batch_size * grad_accum_steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_covers_every_example_once_per_epoch_in_seeded_order() {
        let a = EpochPlan::new(10, 3, 2, true, 7, 0);
        let flat: Vec<usize> = a.steps.iter().flatten().flatten().copied().collect();
        let mut sorted = flat.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(a.steps.len(), EpochPlan::steps_per_epoch(10, 3, 2));
        assert_eq!(a.steps[0].len(), 2);
        let again: Vec<usize> = EpochPlan::new(10, 3, 2, true, 7, 0)
            .steps
            .iter()
            .flatten()
            .flatten()
            .copied()
            .collect();
        assert_eq!(flat, again);
        let next: Vec<usize> = EpochPlan::new(10, 3, 2, true, 7, 1)
            .steps
            .iter()
            .flatten()
            .flatten()
            .copied()
            .collect();
        assert_ne!(flat, next);
    }

    #[test]
    fn collate_pads_right_and_counts_label_tokens_after_the_shift() {
        let a = Example {
            input_ids: vec![1, 5, 6, 2],
            labels: vec![IGNORE, IGNORE, 6, 2],
        };
        let b = Example {
            input_ids: vec![1, 7],
            labels: vec![1, 7],
        };
        let batch = Batch::collate(&[&a, &b], 0, Device::Cpu);
        assert_eq!(batch.input_ids.size(), vec![2, 4]);
        assert_eq!(
            Vec::<i64>::try_from(batch.labels.view([-1])).unwrap(),
            vec![IGNORE, IGNORE, 6, 2, 1, 7, IGNORE, IGNORE]
        );
        assert_eq!(batch.label_tokens, 3);
        assert_eq!((batch.real_tokens, batch.padded_tokens), (6, 8));
    }
}
