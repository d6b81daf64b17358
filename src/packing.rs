//! Where the tokens of packed rows sit. The batcher (`data`) makes it and the decoder's attention
//! (`model`) reads it; it lives apart from both so that neither imports the other. Both make
//! the tensors of a batch through [`upload`].

use tch::{Device, Kind, Tensor};

/// Where each token of packed rows sits: `[batch, seq]` position within its example, and the
/// example's index within the row (padding gets its own index, so it attends only to itself).
pub struct Packing {
    pub positions: Tensor,
    pub documents: Tensor,
    /// Per row, the lengths of its examples in order, then of its padding (if any).
    pub segments: Vec<Vec<i64>>,
}

impl Packing {
    /// The packing of rows whose examples (then padding, if any) have these lengths, in order:
    /// positions restart at each, and each gets the next example index.
    pub fn from_segments(segments: Vec<Vec<i64>>, device: Device) -> Packing {
        let per_token = |value: fn(i64, i64) -> i64| {
            let values: Vec<i64> = segments
                .iter()
                .flat_map(|lengths| {
                    lengths
                        .iter()
                        .zip(0..)
                        .flat_map(move |(&n, example)| (0..n).map(move |at| value(example, at)))
                })
                .collect();
            upload(&values, &[segments.len() as i64, -1], device)
        };
        Packing { positions: per_token(|_, at| at), documents: per_token(|example, _| example), segments }
    }
}

/// `values` as an int64 tensor of `shape` on `device`. To a GPU the copy goes from pinned host
/// memory without waiting for it (the caching host allocator keeps the pinned block until the
/// copy is done), so building the next batch overlaps the step before it.
pub fn upload(values: &[i64], shape: &[i64], device: Device) -> Tensor {
    let host = Tensor::from_slice(values).view(shape);
    match device {
        Device::Cuda(_) => host.pin_memory(device).to_device_(device, Kind::Int64, true, false),
        _ => host.to_device(device),
    }
}
