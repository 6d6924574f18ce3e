//! The microkernels on AVX2 with FMA: a channel block is two 256-bit registers.

use std::arch::x86_64::*;

use super::{isa_entry_points, F32x16};

/// Lanes 0-7 and 8-15.
#[derive(Clone, Copy)]
pub(super) struct Avx2(__m256, __m256);

impl F32x16 for Avx2 {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Self(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm256_storeu_ps(p, self.0);
        _mm256_storeu_ps(p.add(8), self.1);
    }

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        let v = _mm256_set1_ps(x);
        Self(v, v)
    }

    #[inline(always)]
    unsafe fn add(self, other: Self) -> Self {
        Self(
            _mm256_add_ps(self.0, other.0),
            _mm256_add_ps(self.1, other.1),
        )
    }

    #[inline(always)]
    unsafe fn sub(self, other: Self) -> Self {
        Self(
            _mm256_sub_ps(self.0, other.0),
            _mm256_sub_ps(self.1, other.1),
        )
    }

    #[inline(always)]
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self {
        Self(
            _mm256_fmadd_ps(self.0, b.0, acc.0),
            _mm256_fmadd_ps(self.1, b.1, acc.1),
        )
    }

    #[inline(always)]
    unsafe fn max(self, other: Self) -> Self {
        Self(
            _mm256_max_ps(self.0, other.0),
            _mm256_max_ps(self.1, other.1),
        )
    }

    #[inline(always)]
    unsafe fn permute(self, indices: &[u32; 16]) -> Self {
        // Each half permutes within itself (the trait's promise); the instruction reads
        // the low three bits of each index.
        let low = _mm256_loadu_si256(indices.as_ptr().cast());
        let high = _mm256_loadu_si256(indices.as_ptr().add(8).cast());
        Self(
            _mm256_permutevar8x32_ps(self.0, low),
            _mm256_permutevar8x32_ps(self.1, high),
        )
    }
}

isa_entry_points! {
    Avx2, "avx2,fma";
    // 16 registers of 8 lanes: a block is two registers, so one block x 6 pixels
    // (12 accumulators) beside the block's weights and a broadcast.
    calls: [1 x [1 2 3 4 5 6]];
    // Narrow groups: G accumulator sets of 2 registers per pixel, so 4 channels per group
    // take 1 pixel a tile. Groups of 8 (8 sets, 16 registers) run as dense blocks with
    // zeros instead; ResNeXt-50 32x4d's layers, dense against rotated: 28x28 at batch 1
    // 0.38 against 0.94 ms, at batch 8 3.5-4.7 against 4.9-5.2; the strided 56x56 one
    // 0.50 against 1.15 at batch 1, 7.9-8.5 against 6.8-7.5 at batch 8 (Zen 3).
    rotated: [1 => 6, 2 => 3, 4 => 1];
    // The weight gradient's 16 input channels in three calls of 6, 6 and 4 accumulator
    // blocks (the gradient vector and a broadcast beside them).
    grad: [0 + 6, 6 + 6, 12 + 4];
}
