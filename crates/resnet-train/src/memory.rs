//! Keeping freed memory for the next step.
//!
//! A training step allocates and frees tensors of megabytes (activations, gradients,
//! im2col buffers). glibc's malloc serves blocks above its mmap threshold (128 KiB,
//! rising to the largest block freed) with fresh mappings and gives freed heap memory
//! back to the system above 128 KiB, so every step pays page faults, page zeroing and
//! TLB shootdowns again: about a quarter of a CIFAR ResNet-20 step at batch 128 on two
//! threads (`perf record`). Raising both thresholds keeps the memory in the process,
//! where the next step finds it.

/// Tells the C allocator to keep freed memory for reuse (glibc on Linux: the mmap
/// threshold to 32 MiB, heap trimming off); elsewhere it does nothing. The process's
/// peak memory is unchanged (the memory was in use at the peak); it is simply not
/// returned between steps. [`crate::Trainer::new`] calls it; call it yourself in a loop
/// written by hand. Returns whether the allocator took the settings. The same setting
/// as [`resnet_core::retain_freed_memory`], which it calls.
///
/// Blocks above 32 MiB (a ResNet-50 batch of 16 at 224x224 has many), and heaps of
/// rayon's threads once they empty, are still mapped afresh each time: install
/// [`resnet_core::RetainingAllocator`] as the program's global allocator for those, as
/// the `resnet` command does.
pub fn reuse_freed_memory() -> bool {
    resnet_core::retain_freed_memory()
}
