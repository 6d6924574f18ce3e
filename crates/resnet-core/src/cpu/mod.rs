//! The CPU kernels, apart from the model code that calls them.
//!
//! - [`isa`]: which vector instructions the CPU has, detected once, as a token
//!   ([`CpuIsa`]) the blocked kernels need; `RESNET_CPU_ISA` forces one.
//! - [`gemm_conv`]: im2col + GEMM convolution with a fused bias/residual/ReLU epilogue
//!   (any CPU, f32/f16; the `gemm` crate picks its own instructions).
//! - [`blocked`]: the channel-blocked inference kernels (direct and Winograd), one kernel
//!   source over AVX-512, AVX2, NEON and scalar.
//! - [`conv_grad`], [`batch_norm_grad`] and [`max_pool_grad`]: training's convolution,
//!   BatchNorm (+ residual + ReLU) and stem pooling, with their backward passes as
//!   kernels rather than candle's op-by-op compositions.
//! - [`block_grad`]: a whole residual block (conv-BN-ReLU units and shortcut) as one
//!   training op, on blocked activations inside, built from the kernels above.
#![allow(unsafe_code)] // `Shared`: a pointer that parallel tasks write disjoint parts of

use rayon::prelude::*;

pub(crate) mod batch_norm_grad;
pub(crate) mod block_grad;
pub(crate) mod blocked;
pub(crate) mod conv_grad;
pub(crate) mod gemm_conv;
pub(crate) mod isa;
pub(crate) mod max_pool_grad;
pub(crate) mod storage;

pub use isa::{CpuIsa, Isa, ISA_ENV};

/// Runs `task(0..count)`: over rayon's pool in jobs of at least `min_len` tasks if
/// `parallel`, else on this thread. What every CPU convolution here parallelises with.
pub(crate) fn for_each_task(
    count: usize,
    parallel: bool,
    min_len: usize,
    task: impl Fn(usize) + Sync + Send,
) {
    if parallel && count > 1 {
        (0..count)
            .into_par_iter()
            .with_min_len(min_len.max(1))
            .for_each(task);
    } else {
        (0..count).for_each(task);
    }
}

/// A pointer to a buffer that parallel tasks write in disjoint parts (the CPU
/// convolutions' outputs).
#[derive(Clone, Copy)]
pub(crate) struct Shared<T>(pub *mut T);
// SAFETY: only used for disjoint writes by the tasks of one parallel loop.
unsafe impl<T: Send> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The pointer (a method, so that closures capture the `Send` wrapper, not the field).
    pub fn get(self) -> *mut T {
        self.0
    }
}
