//! Keeping freed memory for the next step.
//!
//! A training step allocates and frees tensors of megabytes (activations, gradients,
//! im2col buffers). glibc's malloc serves blocks above its mmap threshold (128 KiB,
//! rising to the largest block freed) with fresh mappings and gives freed heap memory
//! back to the system above 128 KiB, so every step pays page faults, page zeroing and
//! TLB shootdowns again: about a quarter of a CIFAR ResNet-20 step at batch 128 on two
//! threads (`perf record`). Raising both thresholds keeps the memory in the process,
//! where the next step finds it.

/// Blocks up to this size come from the heap (glibc's largest allowed mmap threshold
/// on 64-bit systems).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const HEAP_BLOCK_LIMIT: libc::c_int = 32 << 20;

/// Tells the C allocator to keep freed memory for reuse (glibc on Linux: the mmap
/// threshold to 32 MiB, heap trimming off); elsewhere it does nothing. The process's
/// peak memory is unchanged (the memory was in use at the peak); it is simply not
/// returned between steps. [`crate::Trainer::new`] calls it; call it yourself in a loop
/// written by hand. Returns whether the allocator took the settings.
pub fn reuse_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets two of glibc's allocator parameters; it takes the
        // allocator's lock and is safe to call at any time, from any thread.
        #[allow(unsafe_code)]
        let taken = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
        };
        taken
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
