//! Examples → batch tensors, in a seeded order per epoch: either packed (several examples per
//! row of `max_seq_len` tokens, positions restarting per example, attention kept within each
//! example) or one example per row, grouped by length to minimise padding.

use super::format::{Example, IGNORE};
use crate::packing::{upload, Packing};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{Device, Tensor};

/// Example indices laid end to end in one row.
pub type Row = Vec<usize>;
/// Rows that go through the model together.
pub type MicroBatch = Vec<Row>;

/// One micro-batch: `[batch, seq]` ids and labels, right-padded.
pub struct Batch {
    pub input_ids: Tensor,
    pub labels: Tensor,
    /// Positions and example boundaries, when rows hold several examples.
    pub packing: Option<Packing>,
    /// The loss's view of `labels`: flat indices into `[batch · seq]` of the positions whose
    /// next token is a target, and those targets, in the same order (computed here on the host,
    /// so the loss needs no device-to-host read to find them).
    pub target_positions: Tensor,
    pub target_ids: Tensor,
    /// Tokens that count in the loss (labels other than IGNORE, after the shift).
    pub label_tokens: i64,
    /// Real (non-pad) tokens.
    pub real_tokens: i64,
    /// Tokens including padding.
    pub padded_tokens: i64,
    /// Each row's real tokens, and the untrained tokens at its start (its prompt, for rows of
    /// one example).
    pub lengths: Vec<i64>,
    pub prompt_lengths: Vec<i64>,
    /// Whether each row's (first) example is a desirable answer ([`Example::desirable`]): KTO's
    /// labels; false where the example carries none.
    pub desirable: Vec<bool>,
    /// Each row's reference log-probability (`[rows]`) when computed ahead (preference
    /// objectives with `train.precompute_ref`); `None`: computed with the batch.
    pub reference_logps: Option<Tensor>,
    /// A teacher's cached distribution at each target, in `target_ids`' order (distillation from
    /// a cache); `None`: the teacher runs with the batch.
    pub soft_targets: Option<SoftTargets>,
}

/// A teacher's top-k at each of a batch's targets: `ids` (int64 `[targets, k]`) and `logprobs`
/// (fp32 `[targets, k + 1]`): the log-probabilities of those tokens, then the log of the mass of
/// all the others.
pub struct SoftTargets {
    pub ids: Tensor,
    pub logprobs: Tensor,
}

impl Batch {
    /// One example per row, padded on the right with `pad_id` (labels IGNORE). Padding is
    /// invisible to real tokens under causal attention.
    pub fn collate(examples: &[&Example], pad_id: i64, device: Device) -> Batch {
        let rows: Vec<Vec<&Example>> = examples.iter().map(|e| vec![*e]).collect();
        Self::build(&rows, pad_id, device, false)
    }

    /// Preference pairs `(chosen, rejected)`: the chosen rows first, then the rejected ones in
    /// the same order, as TRL's DPOTrainer concatenates them.
    pub fn collate_pairs(pairs: &[(&Example, &Example)], pad_id: i64, device: Device) -> Batch {
        let rows: Vec<&Example> = pairs.iter().map(|p| p.0).chain(pairs.iter().map(|p| p.1)).collect();
        Self::collate(&rows, pad_id, device)
    }

    /// Rows of several examples each (see [`Packing`]), padded on the right to the longest row.
    pub fn pack(rows: &[Vec<&Example>], pad_id: i64, device: Device) -> Batch {
        Self::build(rows, pad_id, device, true)
    }

    fn build(rows: &[Vec<&Example>], pad_id: i64, device: Device, packed: bool) -> Batch {
        let row_len = |r: &Vec<&Example>| r.iter().map(|e| e.input_ids.len()).sum::<usize>();
        let seq = rows.iter().map(row_len).max().unwrap_or(0);
        let cells = rows.len() * seq;
        let (mut ids, mut labels) = (Vec::with_capacity(cells), Vec::with_capacity(cells));
        let mut segments = Vec::with_capacity(rows.len());
        for row in rows {
            for e in row {
                ids.extend_from_slice(&e.input_ids);
                // An example's first token is never a target: in a packed row it would otherwise
                // be predicted from the end of the previous example.
                labels.push(IGNORE);
                labels.extend_from_slice(&e.labels[1..]);
            }
            let pad = seq - row_len(row);
            let mut lengths: Vec<i64> = row.iter().map(|e| e.input_ids.len() as i64).collect();
            if pad > 0 {
                lengths.push(pad as i64);
            }
            segments.push(lengths);
            ids.extend(std::iter::repeat_n(pad_id, pad));
            labels.extend(std::iter::repeat_n(IGNORE, pad));
        }
        let prompt_lengths = rows
            .iter()
            .map(|row| {
                let labels = row.first().map_or(&[][..], |e| &e.labels[1..]);
                1 + labels.iter().take_while(|&&l| l == IGNORE).count() as i64
            })
            .collect();
        let (mut target_positions, mut target_ids) = (Vec::new(), Vec::new());
        for (flat, &label) in labels.iter().enumerate() {
            // Position `flat - 1` predicts this label; a row's first label is always IGNORE.
            if label != IGNORE {
                target_positions.push(flat as i64 - 1);
                target_ids.push(label);
            }
        }
        let shape = [rows.len() as i64, seq as i64];
        let tensor = |v: &[i64]| upload(v, &shape, device);
        let flat = |v: &[i64]| upload(v, &[-1], device);
        Batch {
            input_ids: tensor(&ids),
            label_tokens: target_ids.len() as i64,
            labels: tensor(&labels),
            target_positions: flat(&target_positions),
            target_ids: flat(&target_ids),
            packing: packed.then(|| Packing::from_segments(segments, device)),
            real_tokens: rows.iter().map(row_len).sum::<usize>() as i64,
            padded_tokens: shape[0] * shape[1],
            lengths: rows.iter().map(|r| row_len(r) as i64).collect(),
            prompt_lengths,
            desirable: rows.iter().map(|row| row.first().and_then(|e| e.desirable) == Some(true)).collect(),
            reference_logps: None,
            soft_targets: None,
        }
    }

    /// KTO's mismatched rows, as TRL builds them for its KL estimate: each row's prompt with the
    /// previous row's answer (the first row takes the last one's), the answers as targets. For
    /// rows of one example each. Padded with token 0, which causal attention keeps out of every
    /// real token's view.
    pub fn mismatched(&self) -> Batch {
        let host = |t: &Tensor| Vec::<Vec<i64>>::try_from(t).expect("batch ids are int64 [rows, seq]");
        let (ids, labels) = (host(&self.input_ids), host(&self.labels));
        let n = ids.len();
        let examples: Vec<Example> = (0..n)
            .map(|i| {
                let j = (i + n - 1) % n;
                let (p, pj, lj) = (
                    self.prompt_lengths[i] as usize,
                    self.prompt_lengths[j] as usize,
                    self.lengths[j] as usize,
                );
                let mut e =
                    Example { input_ids: ids[i][..p].to_vec(), labels: vec![IGNORE; p], desirable: None };
                e.input_ids.extend_from_slice(&ids[j][pj..lj]);
                e.labels.extend_from_slice(&labels[j][pj..lj]);
                e
            })
            .collect();
        Self::collate(&examples.iter().collect::<Vec<_>>(), 0, self.input_ids.device())
    }
}

/// Examples packed together come from windows of this many consecutive shuffled examples.
const PACKING_WINDOW: usize = 2048;

/// How examples are laid out into rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RowLayout {
    /// Several examples per row of at most this many tokens.
    Packed(usize),
    /// One example per row; rows of similar length batched together.
    ByLength,
    /// Preference pairs (examples `2i`, `2i + 1`), batched by length as `ByLength`; a
    /// micro-batch's chosen rows come first, its rejected rows after ([`Batch::collate_pairs`]).
    Pairs,
}

/// Which examples each optimizer step of an epoch uses: a seeded shuffle laid out into rows,
/// cut into micro-batches of `micro_batch_size` rows and steps of `grad_accum_steps`
/// micro-batches (the last step may be shorter).
pub struct EpochPlan {
    pub steps: Vec<Vec<MicroBatch>>,
}

impl EpochPlan {
    pub fn new(
        lengths: &[usize],
        micro_batch_size: usize,
        grad_accum_steps: usize,
        layout: RowLayout,
        shuffle: bool,
        seed: u64,
        epoch: usize,
    ) -> EpochPlan {
        let mut order: Vec<usize> = (0..lengths.len()).collect();
        // One independent stream per epoch, so any epoch's order can be recomputed alone.
        let mut rng =
            StdRng::seed_from_u64(seed.wrapping_add(epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        if shuffle {
            order.shuffle(&mut rng);
        }
        let micro_batches: Vec<MicroBatch> = match layout {
            RowLayout::Packed(max_len) => {
                // First-fit decreasing within windows of the shuffled order fills rows well
                // while the epoch stays shuffled; the rows are then shuffled themselves.
                let mut rows: Vec<Row> = Vec::new();
                for window in order.chunks(PACKING_WINDOW) {
                    let mut window = window.to_vec();
                    window.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
                    rows.extend(pack_first_fit(&window, lengths, max_len));
                }
                if shuffle {
                    rows.shuffle(&mut rng);
                }
                rows.chunks(micro_batch_size).map(<[Row]>::to_vec).collect()
            }
            RowLayout::ByLength | RowLayout::Pairs => {
                // Sort within windows of many batches, so batches hold similar lengths while the
                // epoch stays shuffled; then shuffle the batches themselves.
                let window = micro_batch_size * 64;
                let mut batches: Vec<MicroBatch> = Vec::new();
                for chunk in order.chunks(window) {
                    let mut chunk = chunk.to_vec();
                    chunk.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
                    batches
                        .extend(chunk.chunks(micro_batch_size).map(|c| c.iter().map(|&i| vec![i]).collect()));
                }
                if shuffle {
                    batches.shuffle(&mut rng);
                }
                batches
            }
        };
        EpochPlan { steps: micro_batches.chunks(grad_accum_steps).map(<[MicroBatch]>::to_vec).collect() }
    }

    /// The epoch's real tokens and the tokens of its padded micro-batches (each row padded to
    /// the micro-batch's longest), for examples of `lengths` tokens.
    pub fn tokens(&self, lengths: &[usize]) -> (usize, usize) {
        let (mut real, mut padded) = (0usize, 0usize);
        for mb in self.steps.iter().flatten() {
            let row_len = |row: &Vec<usize>| row.iter().map(|&i| lengths[i]).sum::<usize>();
            real += mb.iter().map(row_len).sum::<usize>();
            padded += mb.len() * mb.iter().map(row_len).max().unwrap_or(0);
        }
        (real, padded)
    }
}

/// First-fit: each example, in `order`, goes into the first row with room for it.
fn pack_first_fit(order: &[usize], lengths: &[usize], max_len: usize) -> Vec<Row> {
    let mut rows: Vec<(usize, Row)> = Vec::new();
    for &i in order {
        let len = lengths[i].min(max_len);
        match rows.iter_mut().find(|(used, _)| used + len <= max_len) {
            Some((used, row)) => {
                *used += len;
                row.push(i);
            }
            None => rows.push((len, vec![i])),
        }
    }
    rows.into_iter().map(|(_, row)| row).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(plan: &EpochPlan) -> Vec<usize> {
        plan.steps.iter().flatten().flatten().flatten().copied().collect()
    }

    #[test]
    fn plan_covers_every_example_once_per_epoch_in_seeded_order() {
        let lengths = [5, 9, 3, 7, 2, 8, 4, 6, 1, 10];
        for layout in [RowLayout::ByLength, RowLayout::Packed(12)] {
            let a = EpochPlan::new(&lengths, 3, 2, layout, true, 7, 0);
            let mut sorted = flat(&a);
            sorted.sort();
            assert_eq!(sorted, (0..10).collect::<Vec<_>>(), "{layout:?}");
            assert_eq!(flat(&a), flat(&EpochPlan::new(&lengths, 3, 2, layout, true, 7, 0)));
            assert_ne!(flat(&a), flat(&EpochPlan::new(&lengths, 3, 2, layout, true, 7, 1)));
        }
    }

    #[test]
    fn packed_rows_never_exceed_the_limit() {
        let lengths = [5, 9, 3, 7, 2, 8, 4, 6, 1, 10];
        let plan = EpochPlan::new(&lengths, 2, 1, RowLayout::Packed(12), true, 3, 0);
        for row in plan.steps.iter().flatten().flatten() {
            assert!(row.iter().map(|&i| lengths[i]).sum::<usize>() <= 12, "{row:?}");
        }
        // 55 tokens in rows of 12: first-fit needs at most one row more than the minimum (5).
        assert!(plan.steps.iter().flatten().flatten().count() <= 6);
    }

    #[test]
    fn collate_pads_right_and_counts_label_tokens_after_the_shift() {
        let a = Example { input_ids: vec![1, 5, 6, 2], labels: vec![IGNORE, IGNORE, 6, 2], desirable: None };
        let b = Example { input_ids: vec![1, 7], labels: vec![1, 7], desirable: None };
        let batch = Batch::collate(&[&a, &b], 0, Device::Cpu);
        assert_eq!(batch.input_ids.size(), vec![2, 4]);
        assert_eq!(
            Vec::<i64>::try_from(batch.labels.view([-1])).unwrap(),
            vec![IGNORE, IGNORE, 6, 2, IGNORE, 7, IGNORE, IGNORE]
        );
        assert_eq!(batch.label_tokens, 3);
        assert_eq!(Vec::<i64>::try_from(&batch.target_positions).unwrap(), vec![1, 2, 4]);
        assert_eq!(Vec::<i64>::try_from(&batch.target_ids).unwrap(), vec![6, 2, 7]);
        assert_eq!((batch.real_tokens, batch.padded_tokens), (6, 8));
    }

    #[test]
    fn packed_rows_restart_positions_and_mask_first_tokens() {
        let a = Example { input_ids: vec![1, 5, 6], labels: vec![1, 5, 6], desirable: None };
        let b = Example { input_ids: vec![1, 7], labels: vec![1, 7], desirable: None };
        let batch = Batch::pack(&[vec![&a, &b], vec![&b]], 0, Device::Cpu);
        let p = batch.packing.as_ref().unwrap();
        let v = |t: &Tensor| Vec::<i64>::try_from(t.view([-1])).unwrap();
        assert_eq!(v(&batch.input_ids), vec![1, 5, 6, 1, 7, 1, 7, 0, 0, 0]);
        assert_eq!(v(&p.positions), vec![0, 1, 2, 0, 1, 0, 1, 0, 1, 2]);
        assert_eq!(v(&p.documents), vec![0, 0, 0, 1, 1, 0, 0, 1, 1, 1]);
        assert_eq!(v(&batch.labels), vec![IGNORE, 5, 6, IGNORE, 7, IGNORE, 7, IGNORE, IGNORE, IGNORE]);
        assert_eq!(batch.label_tokens, 4);
    }
}
