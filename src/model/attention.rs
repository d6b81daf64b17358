//! Causal attention kernels: the masks of sliding windows and packed rows, and the paths that
//! compute attention without scoring what the mask hides (per packed example, or by query blocks
//! in bf16 on CPU).

use super::decoder::dropout;
use crate::packing::Packing;
use tch::{Device, Kind, Tensor};

/// How [`causal_attention`] computes attention, chosen by device, dtype and shape
/// ([`AttentionPath::choose`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPath {
    /// bf16 GEMMs over blocks of queries ([`attention_by_query_blocks`]): bf16 on the CPU.
    QueryBlocks,
    /// One call of libtorch's fused SDPA with `is_causal` (flash or memory-efficient kernel on
    /// CUDA): unpacked rows without a sliding window.
    FusedCausal,
    /// One SDPA call with a boolean mask: sliding windows, and packed rows on CUDA, where the
    /// memory-efficient kernel takes the block-diagonal mask in one launch.
    FusedMasked,
    /// One SDPA call per packed example: packed rows on the CPU, where each call is a few large
    /// GEMMs and the masked-out scores are never computed.
    PerExample,
}

impl AttentionPath {
    /// The path for queries of `kind` and length `seq` on `device`, with or without a sliding
    /// window and packed rows.
    pub fn choose(device: Device, kind: Kind, seq: i64, window: bool, packed: bool) -> AttentionPath {
        if device == Device::Cpu && kind == Kind::BFloat16 && seq <= MAX_QUERY_BLOCKED_LEN {
            return AttentionPath::QueryBlocks;
        }
        match (window, packed) {
            (false, false) => AttentionPath::FusedCausal,
            (false, true) if device == Device::Cpu => AttentionPath::PerExample,
            _ => AttentionPath::FusedMasked,
        }
    }

    /// For the run's banner and the GPU check: "fused SDPA (causal)", ...
    pub fn name(self) -> &'static str {
        match self {
            AttentionPath::QueryBlocks => "bf16 query blocks",
            AttentionPath::FusedCausal => "fused SDPA (causal)",
            AttentionPath::FusedMasked => "fused SDPA (block mask)",
            AttentionPath::PerExample => "SDPA per packed example",
        }
    }
}

/// Causal self-attention of queries `[batch, heads, seq, head_dim]` over keys and values
/// `[batch, kv_heads, seq, head_dim]`, within a sliding window where given and within each
/// example in packed rows, with dropout `dropout_p` on the probabilities.
pub(super) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<i64>,
    packing: Option<&Packing>,
    dropout_p: f64,
) -> Tensor {
    let path = AttentionPath::choose(q.device(), q.kind(), q.size()[2], window.is_some(), packing.is_some());
    attend(path, q, k, v, scale, window, packing, dropout_p)
}

/// [`causal_attention`] along `path`.
#[allow(clippy::too_many_arguments)]
fn attend(
    path: AttentionPath,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<i64>,
    packing: Option<&Packing>,
    dropout_p: f64,
) -> Tensor {
    let gqa = q.size()[1] != k.size()[1];
    // With dropout, libtorch's CPU SDPA takes its math path, which drops probabilities as eager
    // attention does.
    match (path, packing) {
        (AttentionPath::QueryBlocks, _) => {
            attention_by_query_blocks(q, k, v, scale, window, packing, dropout_p)
        }
        (AttentionPath::PerExample, Some(packing)) => {
            attention_per_example(q, k, v, &packing.segments, scale, dropout_p)
        }
        (AttentionPath::FusedMasked, _) | (AttentionPath::PerExample, None) => {
            let allowed = attention_mask(q.size()[2], window, packing.map(|p| &p.documents), q.device());
            // CUDA's memory-efficient kernel, the one that takes a mask, does not group heads:
            // the key/value heads are repeated for it rather than falling back to the math kernel.
            let (k, v, gqa) = match q.device() {
                Device::Cuda(_) if gqa => {
                    let groups = q.size()[1] / k.size()[1];
                    (
                        k.repeat_interleave_self_int(groups, 1, None),
                        v.repeat_interleave_self_int(groups, 1, None),
                        false,
                    )
                }
                _ => (k.shallow_clone(), v.shallow_clone(), gqa),
            };
            Tensor::scaled_dot_product_attention(q, &k, &v, Some(allowed), dropout_p, false, scale, gqa)
        }
        (AttentionPath::FusedCausal, _) => {
            Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, dropout_p, true, scale, gqa)
        }
    }
}

/// Causal attention within each example of packed rows: `segments` holds each row's example (and
/// padding) lengths, in order.
fn attention_per_example(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[Vec<i64>],
    scale: f64,
    dropout_p: f64,
) -> Tensor {
    let rows: Vec<Tensor> = segments
        .iter()
        .enumerate()
        .map(|(row, lengths)| {
            let [q, k, v] = [q, k, v].map(|t| t.get(row as i64).split_with_sizes(lengths, 1));
            let parts: Vec<Tensor> = (0..lengths.len())
                .map(|i| {
                    let one = |t: &[Tensor]| t[i].unsqueeze(0);
                    causal_attention(&one(&q), &one(&k), &one(&v), scale, None, None, dropout_p)
                        .squeeze_dim(0)
                })
                .collect();
            Tensor::cat(&parts, 1)
        })
        .collect();
    Tensor::stack(&rows, 0)
}

/// Fewest queries per block of [`attention_by_query_blocks`]; longer sequences use eight blocks.
/// Measured on 2 cores: 128 is the fastest at 512 tokens, 256 at 2048.
const MIN_QUERY_BLOCK: i64 = 128;

/// Longest sequence for [`attention_by_query_blocks`]. It keeps each block's probabilities for the
/// backward pass, and they grow with the square of the length: at 2048 tokens they added 47% to a
/// 135M model's peak memory (still half of PEFT's) for a step a third shorter; at 4096 they would
/// add four times as much. Longer sequences go to SDPA's flash kernel, which keeps none.
const MAX_QUERY_BLOCKED_LEN: i64 = 2048;

/// Causal attention as bf16 GEMMs over blocks of queries, each block scoring only the keys from
/// the earliest one its first query may see (the window's edge, or the first example it touches
/// in packed rows) up to its last query, so most of the mask's empty part is never computed. On
/// CPU, libtorch's bf16 SDPA kernel works through small fp32 tiles and was 2–2.5× slower forward
/// and backward; one SDPA call per packed example also cost more than these few larger GEMMs.
/// Scores and probabilities are bf16 and the softmax accumulates in fp32, as in eager attention
/// under bf16; each score is rounded once, after scaling and masking.
fn attention_by_query_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<i64>,
    packing: Option<&Packing>,
    dropout_p: f64,
) -> Tensor {
    let [batch, heads, seq, dim] = q.size()[..] else { panic!("attention queries are 4-D") };
    let kv_heads = k.size()[1];
    let groups = heads / kv_heads;
    // The query heads that share a key/value head are stacked: one GEMM per key/value head.
    let q = q.reshape([batch, kv_heads, groups, seq, dim]);
    let k = k.reshape([batch * kv_heads, seq, dim]);
    let v = v.reshape([batch * kv_heads, seq, dim]);
    let mut outputs = Vec::new();
    let block = MIN_QUERY_BLOCK.max((seq + 7) / 8);
    for start in (0..seq).step_by(block as usize) {
        let len = block.min(seq - start);
        let end = start + len;
        let first_key = packing
            .map_or(0, |p| first_example_start(&p.segments, start))
            .max(window.map_or(0, |w| start + 1 - w));
        let keys = end - first_key;
        let queries = q.narrow(3, start, len).reshape([batch * kv_heads, groups * len, dim]);
        // The mask is the score GEMM's addend. Query `start + r` sees the keys up to itself, the
        // last `window` of them...
        let offset = start - first_key;
        let blocked = || Tensor::full([len, keys], f64::NEG_INFINITY, (q.kind(), q.device()));
        let unseen = match window {
            None => blocked().triu(offset + 1),
            Some(w) => blocked().triu(offset + 1) + blocked().tril(offset - w),
        };
        let mask = match packing {
            None => unseen.repeat([groups, 1]).expand([batch * kv_heads, groups * len, keys], false),
            // ...and of its own example.
            Some(p) => {
                let documents = |from: i64, n: i64| p.documents.narrow(1, from, n);
                let other =
                    documents(start, len).unsqueeze(2).ne_tensor(&documents(first_key, keys).unsqueeze(1));
                unseen
                    .masked_fill(&other, f64::NEG_INFINITY)
                    .repeat([1, groups, 1])
                    .unsqueeze(1)
                    .expand([batch, kv_heads, groups * len, keys], false)
                    .reshape([batch * kv_heads, groups * len, keys])
            }
        };
        let scores = mask.baddbmm(&queries, &k.narrow(1, first_key, keys).transpose(1, 2), 1.0, scale);
        let probs = dropout(scores.softmax(-1, q.kind()), dropout_p);
        let out = probs.bmm(&v.narrow(1, first_key, keys));
        outputs.push(out.view([batch, kv_heads, groups, len, dim]));
    }
    Tensor::cat(&outputs, 3).view([batch, heads, seq, dim])
}

/// Where the earliest example holding position `at` in any row begins; `segments` holds each
/// row's example lengths in order.
fn first_example_start(segments: &[Vec<i64>], at: i64) -> i64 {
    let start_in_row = |lengths: &Vec<i64>| {
        let mut start = 0;
        for length in lengths {
            if start + length > at {
                break;
            }
            start += length;
        }
        start
    };
    segments.iter().map(start_in_row).min().unwrap_or(0)
}

/// Booleans, broadcastable to `[batch, heads, seq, seq]`: query i may see key j when j ≤ i,
/// i − j < window (sliding layers), and both belong to the same example (packed rows).
pub fn attention_mask(seq: i64, window: Option<i64>, documents: Option<&Tensor>, device: Device) -> Tensor {
    attention_mask_offset(seq, seq, window, documents, device)
}

/// [`attention_mask`] for `q_len` queries at the end of `k_len` keys (decoding with a cache).
pub(super) fn attention_mask_offset(
    q_len: i64,
    k_len: i64,
    window: Option<i64>,
    documents: Option<&Tensor>,
    device: Device,
) -> Tensor {
    let queries = Tensor::arange_start(k_len - q_len, k_len, (Kind::Int64, device));
    let keys = Tensor::arange(k_len, (Kind::Int64, device));
    let distance = queries.unsqueeze(1) - keys.unsqueeze(0);
    let mut allowed = distance.ge(0);
    if let Some(w) = window {
        allowed = allowed.logical_and(&distance.lt(w));
    }
    match documents {
        // [batch, 1, seq, seq]
        Some(docs) => {
            allowed.unsqueeze(0).logical_and(&docs.unsqueeze(2).eq_tensor(&docs.unsqueeze(1))).unsqueeze(1)
        }
        None => allowed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mean absolute difference relative to the reference's mean magnitude.
    fn relative_error(ours: &Tensor, reference: &Tensor) -> f64 {
        let ours = ours.to_kind(Kind::Float);
        (ours - reference).abs().mean(Kind::Float).double_value(&[])
            / reference.abs().mean(Kind::Float).double_value(&[])
    }

    /// Packed rows whose examples have these lengths.
    fn packed(segments: &[&[i64]]) -> Packing {
        Packing::from_segments(segments.iter().map(|lengths| lengths.to_vec()).collect(), Device::Cpu)
    }

    /// The query-block attention in bf16 must be as close to fp32 attention as libtorch's own bf16
    /// SDPA, in its output and in the gradients of queries, keys and values: for sequences of one
    /// block, several, and a short last block, with grouped key/value heads, with sliding windows
    /// shorter and longer than a block, and for packed rows whose examples start and end inside
    /// blocks and differ between the rows.
    #[test]
    fn query_block_attention_matches_sdpa() {
        tch::manual_seed(7);
        let (heads, kv_heads, dim, scale) = (6, 2, 16, 0.3);
        let cases: [(i64, i64, Option<i64>, Option<Packing>); 10] = [
            (2, 2, None, None),
            (2, 37, None, None),
            (1, 300, None, None),
            (1, 1100, None, None),
            (2, 37, None, Some(packed(&[&[10, 27], &[37]]))),
            (2, 300, None, Some(packed(&[&[50, 130, 100, 20], &[1, 299]]))),
            (1, 520, None, Some(packed(&[&[7, 200, 129, 1, 183]]))),
            (2, 300, Some(100), None),
            (1, 1100, Some(7), None),
            (2, 300, Some(60), Some(packed(&[&[50, 130, 100, 20], &[1, 299]]))),
        ];
        for (batch, seq, window, packing) in &cases {
            let (batch, seq) = (*batch, *seq);
            let inputs = [heads, kv_heads, kv_heads]
                .map(|h| Tensor::randn([batch, h, seq, dim], (Kind::Float, Device::Cpu)));
            let upstream = Tensor::randn([batch, heads, seq, dim], (Kind::Float, Device::Cpu));
            let documents = packing.as_ref().map(|p| &p.documents);
            let allowed = attention_mask(seq, *window, documents, Device::Cpu);
            let run = |kind: Kind, blocks: bool| {
                let [q, k, v] = inputs.each_ref().map(|t| t.to_kind(kind).detach().set_requires_grad(true));
                let out = if blocks {
                    attention_by_query_blocks(&q, &k, &v, scale, *window, packing.as_ref(), 0.0)
                } else {
                    Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&allowed), 0.0, false, scale, true)
                };
                (out.to_kind(Kind::Float) * &upstream).sum(Kind::Float).backward();
                let grads = [&q, &k, &v].map(|t| t.grad().to_kind(Kind::Float));
                (out.detach().to_kind(Kind::Float), grads)
            };
            let (reference, reference_grads) = run(Kind::Float, false);
            let (sdpa, sdpa_grads) = run(Kind::BFloat16, false);
            let (ours, our_grads) = run(Kind::BFloat16, true);
            let results = std::iter::once((&ours, &sdpa, &reference))
                .chain(our_grads.iter().zip(&sdpa_grads).zip(&reference_grads).map(|((o, s), r)| (o, s, r)));
            for ((ours, sdpa, reference), what) in results.zip(["output", "dq", "dk", "dv"]) {
                let (e_ours, e_sdpa) = (relative_error(ours, reference), relative_error(sdpa, reference));
                let packed = packing.is_some();
                assert!(
                    e_ours <= 2.0 * e_sdpa,
                    "seq {seq} (window {window:?}, packed: {packed}), {what}: error {e_ours:.2e} against bf16 SDPA's {e_sdpa:.2e}"
                );
            }
        }
    }

    /// The paths CUDA takes give what the CPU paths give, on CPU tensors in fp32: the block mask
    /// for packed rows (with grouped key/value heads, examples of every length, padding) as one
    /// SDPA call per example, and the causal call as the masked one.
    #[test]
    fn fused_paths_match_cpu_paths() {
        tch::manual_seed(11);
        let (heads, kv_heads, dim, scale) = (6, 2, 16, 0.25);
        let packing = packed(&[&[10, 1, 26, 27], &[64]]);
        let [q, k, v] = [heads, kv_heads, kv_heads]
            .map(|h| Tensor::randn([2, h, 64, dim], (Kind::Float, Device::Cpu)).set_requires_grad(true));
        let run = |path, packing: Option<&Packing>| {
            let out = attend(path, &q, &k, &v, scale, None, packing, 0.0);
            let grads = Tensor::run_backward(&[out.square().sum(Kind::Float)], &[&q, &k, &v], false, false);
            (out, grads)
        };
        for (fused, reference, packing) in [
            (AttentionPath::FusedMasked, AttentionPath::PerExample, Some(&packing)),
            (AttentionPath::FusedMasked, AttentionPath::FusedCausal, None),
        ] {
            let (ours, our_grads) = run(fused, packing);
            let (theirs, their_grads) = run(reference, packing);
            let results = std::iter::once((&ours, &theirs)).chain(our_grads.iter().zip(&their_grads));
            for ((a, b), what) in results.zip(["output", "dq", "dk", "dv"]) {
                let diff = (a - b).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "{fused:?} against {reference:?}, {what}: differs by {diff:.2e}");
            }
        }
    }

    /// CUDA never takes the CPU-only paths; the CPU keeps the ones it had.
    #[test]
    fn path_by_device() {
        let cuda = Device::Cuda(0);
        for kind in [Kind::BFloat16, Kind::Half, Kind::Float] {
            assert_eq!(AttentionPath::choose(cuda, kind, 512, false, false), AttentionPath::FusedCausal);
            assert_eq!(AttentionPath::choose(cuda, kind, 512, false, true), AttentionPath::FusedMasked);
            assert_eq!(AttentionPath::choose(cuda, kind, 512, true, false), AttentionPath::FusedMasked);
        }
        let cpu = Device::Cpu;
        assert_eq!(AttentionPath::choose(cpu, Kind::BFloat16, 512, false, true), AttentionPath::QueryBlocks);
        assert_eq!(AttentionPath::choose(cpu, Kind::BFloat16, 4096, false, true), AttentionPath::PerExample);
        assert_eq!(AttentionPath::choose(cpu, Kind::Float, 512, false, true), AttentionPath::PerExample);
        assert_eq!(AttentionPath::choose(cpu, Kind::Float, 512, false, false), AttentionPath::FusedCausal);
    }
}
