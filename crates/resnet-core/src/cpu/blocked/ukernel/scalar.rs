//! The microkernels in plain Rust on `[f32; 16]`: the fallback on any target and the
//! oracle the vector kernels are tested against. The compiler vectorises the lane loops
//! with the target's baseline (SSE2 on x86-64).

use super::{isa_entry_points, F32x16};

/// Sixteen lanes in an array.
#[derive(Clone, Copy)]
pub(super) struct Scalar([f32; 16]);

impl Scalar {
    #[inline(always)]
    fn zip(self, other: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        Self(std::array::from_fn(|i| f(self.0[i], other.0[i])))
    }
}

impl F32x16 for Scalar {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Self(p.cast::<[f32; 16]>().read_unaligned())
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        p.cast::<[f32; 16]>().write_unaligned(self.0)
    }

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Self([x; 16])
    }

    #[inline(always)]
    unsafe fn add(self, other: Self) -> Self {
        self.zip(other, |a, b| a + b)
    }

    #[inline(always)]
    unsafe fn sub(self, other: Self) -> Self {
        self.zip(other, |a, b| a - b)
    }

    #[inline(always)]
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] * b.0[i] + acc.0[i]))
    }

    #[inline(always)]
    unsafe fn max(self, other: Self) -> Self {
        self.zip(other, f32::max)
    }
}

// AVX-512's tiles, so that the oracle checks the same shapes.
isa_entry_points! {
    Scalar;
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
