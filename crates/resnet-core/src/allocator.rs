//! Keeping freed memory in the process, for batched CPU inference and training.
#![allow(unsafe_code)] // glibc's mallopt, and a global allocator (which is unsafe to implement)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

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

/// A global allocator that keeps freed blocks of 256 KiB or more and hands them out
/// again for the same size, so a training step reuses the previous step's pages.
///
/// Why: glibc serves every block above 32 MiB (the most [`retain_freed_memory`] can set)
/// with a fresh `mmap` and unmaps it when freed. A ResNet-50 step at batch 16 frees and
/// allocates its 51 MB activations and gradients dozens of times, and each time the
/// kernel faults in and zeroes every page again: 31% of the step in `clear_page_erms`
/// (`perf record`, Zen 3, 2 threads). Smaller blocks churn too when the step runs on
/// rayon's threads, whose glibc arenas unmap a heap once it empties: 300,000 page faults
/// a step with only blocks of 1 MiB+ kept, none with 256 KiB+ (`perf stat -e
/// page-faults`, one step against four). Training allocates the same sizes in the same
/// order every step, so an exact-size cache finds nearly every block. The cost: up to
/// `max_cached` bytes stay in the process after use; [`RetainingAllocator::release`]
/// gives them back. Smaller blocks go straight to the system allocator.
///
/// Install it in a binary (the `resnet` command does):
///
/// ```
/// #[global_allocator]
/// static ALLOCATOR: resnet_core::RetainingAllocator = resnet_core::RetainingAllocator::new(4 << 30);
/// # fn main() {}
/// ```
pub struct RetainingAllocator {
    max_cached: usize,
    cache: Mutex<Cache>,
}

/// Blocks below this go to the system allocator untouched: glibc keeps them in its arenas.
const MIN_CACHED_BLOCK: usize = 256 << 10;
/// A fixed table: the allocator must not allocate while it holds its lock.
const SLOTS: usize = 1024;

struct Cache {
    /// (address, size, alignment) of each kept block, the most recently freed last.
    blocks: [(usize, usize, usize); SLOTS],
    len: usize,
    bytes: usize,
}

impl RetainingAllocator {
    /// An allocator that keeps at most `max_cached` bytes of freed blocks.
    pub const fn new(max_cached: usize) -> Self {
        Self {
            max_cached,
            cache: Mutex::new(Cache {
                blocks: [(0, 0, 0); SLOTS],
                len: 0,
                bytes: 0,
            }),
        }
    }

    /// How many bytes of freed blocks it keeps now.
    pub fn cached_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Gives every kept block back to the system allocator (e.g. after training).
    pub fn release(&self) {
        let mut cache = self.lock();
        while cache.len > 0 {
            cache.len -= 1;
            let (address, size, align) = cache.blocks[cache.len];
            // SAFETY: the block came from `System` with this size and alignment and is
            // owned by the cache alone.
            unsafe {
                System.dealloc(
                    address as *mut u8,
                    Layout::from_size_align_unchecked(size, align),
                )
            };
        }
        cache.bytes = 0;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // Nothing panics while the lock is held; a poisoned lock still holds valid data.
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A kept block of exactly this layout, if there is one.
    fn take(&self, layout: Layout) -> Option<*mut u8> {
        let mut cache = self.lock();
        let wanted = (layout.size(), layout.align());
        let len = cache.len;
        let found = (0..len)
            .rev()
            .find(|&i| (cache.blocks[i].1, cache.blocks[i].2) == wanted)?;
        let (address, size, _) = cache.blocks[found];
        cache.blocks.copy_within(found + 1..len, found);
        cache.len -= 1;
        cache.bytes -= size;
        Some(address as *mut u8)
    }

    /// Keeps a freed block if there is room; false if the caller must free it.
    fn keep(&self, block: *mut u8, layout: Layout) -> bool {
        let mut cache = self.lock();
        if cache.len == SLOTS || cache.bytes + layout.size() > self.max_cached {
            return false;
        }
        let len = cache.len;
        cache.blocks[len] = (block as usize, layout.size(), layout.align());
        cache.len += 1;
        cache.bytes += layout.size();
        true
    }
}

// SAFETY: every block handed out comes from `System` with the caller's exact layout
// (kept blocks are matched on size and alignment), and a kept block is owned by the
// cache alone until it is handed out again.
unsafe impl GlobalAlloc for RetainingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MIN_CACHED_BLOCK {
            if let Some(block) = self.take(layout) {
                return block;
            }
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MIN_CACHED_BLOCK {
            if let Some(block) = self.take(layout) {
                block.write_bytes(0, layout.size());
                return block;
            }
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        if layout.size() >= MIN_CACHED_BLOCK && self.keep(block, layout) {
            return;
        }
        System.dealloc(block, layout)
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < MIN_CACHED_BLOCK && new_size < MIN_CACHED_BLOCK {
            return System.realloc(block, layout, new_size);
        }
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let moved = self.alloc(new_layout);
        if !moved.is_null() {
            std::ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
            self.dealloc(block, layout);
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_large_blocks_and_hands_them_out_for_the_same_layout_only() {
        let allocator = RetainingAllocator::new(8 << 20);
        let large = Layout::from_size_align(2 << 20, 64).unwrap();
        let other = Layout::from_size_align(3 << 20, 64).unwrap();
        // SAFETY: every block is used within the layout it was allocated with and freed
        // once, with that layout.
        unsafe {
            let first = allocator.alloc(large);
            first.write_bytes(7, large.size());
            allocator.dealloc(first, large);
            assert_eq!(allocator.cached_bytes(), large.size());
            // Another size is not served from the cache.
            let unrelated = allocator.alloc(other);
            assert_ne!(unrelated, first);
            assert_eq!(allocator.cached_bytes(), large.size());
            // The same layout gets the kept block back, zeroed when asked for zeros.
            let again = allocator.alloc_zeroed(large);
            assert_eq!(again, first);
            assert!(std::slice::from_raw_parts(again, large.size())
                .iter()
                .all(|&b| b == 0));
            assert_eq!(allocator.cached_bytes(), 0);
            // Over the limit, freed blocks go back to the system.
            allocator.dealloc(unrelated, other);
            allocator.dealloc(again, large);
            assert_eq!(allocator.cached_bytes(), other.size() + large.size());
            let third = allocator.alloc(other);
            let fourth = allocator.alloc(Layout::from_size_align(7 << 20, 64).unwrap());
            allocator.dealloc(fourth, Layout::from_size_align(7 << 20, 64).unwrap());
            assert_eq!(allocator.cached_bytes(), large.size());
            // Small blocks never enter the cache; realloc keeps the contents.
            let small = Layout::from_size_align(4096, 8).unwrap();
            let block = allocator.alloc(small);
            block.write_bytes(3, small.size());
            let grown = allocator.realloc(block, small, 4 << 20);
            assert!(std::slice::from_raw_parts(grown, 4096)
                .iter()
                .all(|&b| b == 3));
            allocator.dealloc(grown, Layout::from_size_align(4 << 20, 8).unwrap());
            allocator.dealloc(third, other);
            allocator.release();
            assert_eq!(allocator.cached_bytes(), 0);
        }
    }

    #[test]
    fn applies_on_glibc() {
        assert_eq!(
            super::retain_freed_memory(),
            cfg!(all(target_os = "linux", target_env = "gnu"))
        );
    }
}
