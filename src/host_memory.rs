//! Keeps freed host memory inside the process for the next allocation of the same size instead
//! of handing it back to the kernel, without the heap fragmentation that costs peak memory.
//!
//! A training step allocates and frees the same activation-sized blocks on every step. With
//! glibc's defaults, blocks above the mmap threshold are unmapped when freed, so every step faults
//! gigabytes of pages back in and the kernel zeroes each one: on a 135M-parameter model that was
//! over a third of a CPU step. Serving them from glibc's heap instead avoids the faults but lets
//! the heap fragment: the transient blocks of each layer leave holes that the next layer's blocks
//! do not fit, and on that model the heap grew a third beyond the bytes ever live at once.
//!
//! So large CPU tensors (at least [`POOLED_BLOCK_BYTES`]) get a caching allocator of their own
//! (src/host_memory.cpp, installed into libtorch): each block is its own mapping, kept on free in
//! a pool by size class and handed to the next request of that class. The pool never holds more
//! than the most bytes ever live at once. Small blocks stay with glibc, told not to unmap or trim
//! (the few small holes left are cheap). CUDA memory has its own caching allocator and is not
//! affected.

/// The smallest tensor allocation served by the pool.
pub const POOLED_BLOCK_BYTES: usize = 1 << 20;

extern "C" {
    fn lorafit_host_memory_install(min_block: usize) -> i32;
    fn lorafit_host_memory_stats(live: *mut usize, pooled: *mut usize, mappings: *mut usize);
}

/// Applies the policy above; call once at start-up, before the first tensor. Later calls change
/// nothing.
pub fn retain_freed_memory() {
    // SAFETY: installing replaces libtorch's CPU allocator for later allocations only; blocks
    // allocated before keep their own deleter.
    unsafe {
        lorafit_host_memory_install(POOLED_BLOCK_BYTES);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's <malloc.h> parameter numbers.
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_MAX: i32 = -4;
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only changes allocator tunables.
        unsafe {
            // No small block is served by its own mmap (freed, it would be unmapped at once)...
            mallopt(M_MMAP_MAX, 0);
            // ...and the free top of the heap is never trimmed: glibc converts the threshold to
            // size_t, so -1 is the largest threshold there is.
            mallopt(M_TRIM_THRESHOLD, -1);
        }
    }
}

/// What the pool holds: bytes of live blocks, bytes of freed blocks kept for reuse, and the
/// number of mappings behind both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub live_bytes: usize,
    pub pooled_bytes: usize,
    pub mappings: usize,
}

/// The pool's current [`PoolStats`] (all zero before [`retain_freed_memory`]).
pub fn pool_stats() -> PoolStats {
    let (mut live_bytes, mut pooled_bytes, mut mappings) = (0, 0, 0);
    // SAFETY: the three pointers are valid for writes for the duration of the call.
    unsafe { lorafit_host_memory_stats(&mut live_bytes, &mut pooled_bytes, &mut mappings) };
    PoolStats { live_bytes, pooled_bytes, mappings }
}
