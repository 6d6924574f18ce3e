//! The microkernels on AVX-512F: one 512-bit register per channel block.

use std::arch::x86_64::*;

use super::{isa_entry_points, F32x16};

/// One `__m512`.
#[derive(Clone, Copy)]
pub(super) struct Avx512(__m512);

impl F32x16 for Avx512 {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Self(_mm512_loadu_ps(p))
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm512_storeu_ps(p, self.0)
    }

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Self(_mm512_set1_ps(x))
    }

    #[inline(always)]
    unsafe fn add(self, other: Self) -> Self {
        Self(_mm512_add_ps(self.0, other.0))
    }

    #[inline(always)]
    unsafe fn sub(self, other: Self) -> Self {
        Self(_mm512_sub_ps(self.0, other.0))
    }

    #[inline(always)]
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self {
        Self(_mm512_fmadd_ps(self.0, b.0, acc.0))
    }

    #[inline(always)]
    unsafe fn max(self, other: Self) -> Self {
        Self(_mm512_max_ps(self.0, other.0))
    }

    #[inline(always)]
    unsafe fn permute(self, indices: &[u32; 16]) -> Self {
        let indices = _mm512_loadu_si512(indices.as_ptr().cast());
        Self(_mm512_permutexvar_ps(indices, self.0))
    }
}

// 32 registers of 16 lanes: a block is one.
isa_entry_points! {
    Avx512, "avx512f";
    // A 1x1 layer takes four blocks by 6 pixels (24 accumulators, 4 weight loads and 6
    // broadcasts per input channel: more multiply-adds per load than 2 x 14); others two
    // blocks by 14 pixels (28 accumulators + 2 weights + 1 broadcast of 32 registers),
    // or one where the channels are an odd number of blocks.
    calls: [4 x [1 2 3 4 5 6] only_1x1, 2 x [1 2 3 4 5 6 7 8 9 10 11 12 13 14], 1 x [1 2 3 4 5 6 7 8 9 10 11 12 13 14]];
    // Narrow groups: `G` accumulator sets of a pixel each, as many pixels as fit.
    rotated: [1 => 14, 2 => 12, 4 => 6, 8 => 2];
    // All 16 input channels of the weight gradient in one call (16 accumulators).
    grad: [0 + 16];
}
