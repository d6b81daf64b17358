//! Keeps freed host memory inside the process for the next allocation instead of handing it
//! back to the kernel.
//!
//! A training step allocates and frees the same activation-sized blocks on every step. With
//! glibc's defaults, blocks above the mmap threshold are unmapped when freed and the top of the
//! heap is trimmed, so every step faults gigabytes of pages back in and the kernel zeroes each
//! one: on a 135M-parameter model that was over a third of a CPU step. Serving every block from
//! the heap and not trimming it lets a step reuse the pages of the one before. The peak resident
//! size is the same (the heap grows to what a step needs either way); the process simply does not
//! shrink between steps. CUDA memory has its own caching allocator and is not affected.

/// Applies the policy above; call once at start-up, before the first tensor. A no-op where the
/// C library is not glibc.
pub fn retain_freed_memory() {
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
            // No block is served by its own mmap (freed, it would be unmapped at once)...
            mallopt(M_MMAP_MAX, 0);
            // ...and the free top of the heap is never trimmed: glibc converts the threshold to
            // size_t, so -1 is the largest threshold there is.
            mallopt(M_TRIM_THRESHOLD, -1);
        }
    }
}
