//! Keeping freed memory in the process, for batched CPU inference.
#![allow(unsafe_code)] // one FFI call to glibc's mallopt

/// Asks the C allocator to keep freed memory for reuse instead of handing it back to the
/// operating system. Returns whether it could (glibc on Linux only).
///
/// Why: every layer's output is a fresh tensor of megabytes (a CIFAR batch of 128, a
/// ResNet-50 batch of 8). glibc serves such blocks with `mmap` and unmaps them when freed,
/// so each forward pass page-faults all its activations back in, zero-filled by the
/// kernel: measured here, 20-25% of a batch-128 ResNet-20 pass. With blocks up to 32 MiB
/// kept on the heap and the heap never trimmed, the second pass reuses the first pass's
/// pages. The cost: the process keeps its peak memory until it exits, which is what a
/// long-running inference process wants. Process-wide, so it is opt-in: the `resnet`
/// command calls it; call it early in `main` to do the same.
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc caps the mmap threshold at half its 64 MiB heap size.
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        // SAFETY: mallopt only sets allocator parameters; these are valid values.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn applies_on_glibc() {
        assert_eq!(
            super::retain_freed_memory(),
            cfg!(all(target_os = "linux", target_env = "gnu"))
        );
    }
}
