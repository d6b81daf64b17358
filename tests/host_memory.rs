//! The caching allocator of large CPU tensors (src/host_memory.rs): a freed large block is kept
//! and handed to the next request of its size class, small blocks never enter the pool, the pool
//! stays within the most bytes ever live at once, and tensors in recycled blocks hold what was
//! written to them.

use lorafit::host_memory::{pool_stats, retain_freed_memory, POOLED_BLOCK_BYTES};
use tch::{Device, Kind, Tensor};

/// One test: the pool is process-wide, so its counts are only meaningful in sequence.
#[test]
fn large_blocks_are_pooled_and_reused() {
    retain_freed_memory();
    let before = pool_stats();

    // 8 MiB of fp32, well above the pooled size.
    let elements = 2 * 1024 * 1024;
    let first = Tensor::arange(elements, (Kind::Float, Device::Cpu));
    let mapped = pool_stats();
    assert_eq!(mapped.mappings, before.mappings + 1, "a large tensor gets its own mapping");
    assert!(mapped.live_bytes >= before.live_bytes + 4 * elements as usize);
    let first_ptr = first.data_ptr();
    drop(first);
    let freed = pool_stats();
    assert_eq!(freed.mappings, mapped.mappings, "a freed block stays mapped for reuse");
    assert!(freed.pooled_bytes > before.pooled_bytes, "the freed block is pooled");

    // The same size class again: the pooled block, not a new mapping.
    let second = Tensor::full([elements], 3.5, (Kind::Float, Device::Cpu));
    let reused = pool_stats();
    assert_eq!(second.data_ptr(), first_ptr, "the pooled block is handed out again");
    assert_eq!(reused.mappings, mapped.mappings);
    assert_eq!(reused.pooled_bytes, before.pooled_bytes);
    assert_holds(&second, 3.5);

    // A small tensor never touches the pool.
    let small = Tensor::ones([(POOLED_BLOCK_BYTES / 8) as i64], (Kind::Float, Device::Cpu));
    assert_eq!(pool_stats(), reused, "small blocks are left to the C library");
    drop(small);

    // Freeing more than was ever live at once cannot grow the pool beyond that peak.
    let peak_live = reused.live_bytes;
    drop(second);
    let blocks: Vec<Tensor> =
        (0..4).map(|i| Tensor::full([elements / 2], i as f64, (Kind::Float, Device::Cpu))).collect();
    for (i, b) in blocks.iter().enumerate() {
        assert_holds(b, i as f64);
    }
    let live = pool_stats().live_bytes;
    drop(blocks);
    let after = pool_stats();
    assert!(
        after.pooled_bytes <= peak_live.max(live),
        "the pool ({} bytes) exceeds the most bytes ever live ({})",
        after.pooled_bytes,
        peak_live.max(live)
    );
}

/// Every element of `t` is `value` (min and max reduce without a large temporary).
fn assert_holds(t: &Tensor, value: f64) {
    assert_eq!((t.min().double_value(&[]), t.max().double_value(&[])), (value, value));
}
