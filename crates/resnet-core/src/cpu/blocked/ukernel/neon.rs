//! The microkernels on aarch64 NEON: a channel block is four 128-bit registers.

use std::arch::aarch64::*;

use super::{isa_entry_points, F32x16};

/// Lanes 0-3, 4-7, 8-11, 12-15.
#[derive(Clone, Copy)]
pub(super) struct Neon([float32x4_t; 4]);

impl Neon {
    #[inline(always)]
    unsafe fn zip(self, other: Self, f: impl Fn(float32x4_t, float32x4_t) -> float32x4_t) -> Self {
        Self(std::array::from_fn(|i| f(self.0[i], other.0[i])))
    }
}

impl F32x16 for Neon {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Self(std::array::from_fn(|i| vld1q_f32(p.add(4 * i))))
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        for (i, v) in self.0.into_iter().enumerate() {
            vst1q_f32(p.add(4 * i), v);
        }
    }

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Self([vdupq_n_f32(x); 4])
    }

    #[inline(always)]
    unsafe fn add(self, other: Self) -> Self {
        self.zip(other, |a, b| vaddq_f32(a, b))
    }

    #[inline(always)]
    unsafe fn sub(self, other: Self) -> Self {
        self.zip(other, |a, b| vsubq_f32(a, b))
    }

    #[inline(always)]
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self {
        Self(std::array::from_fn(|i| {
            vfmaq_f32(acc.0[i], self.0[i], b.0[i])
        }))
    }

    #[inline(always)]
    unsafe fn max(self, other: Self) -> Self {
        self.zip(other, |a, b| vmaxq_f32(a, b))
    }
}

isa_entry_points! {
    Neon, "neon";
    // 32 registers of 4 lanes: a block is four registers, so one block x 6 pixels
    // (24 accumulators) beside the block's weights and a broadcast.
    calls: [1 x [1 2 3 4 5 6]];
    rotated: [1 => 6, 2 => 3, 4 => 1, 8 => 1];
    // The weight gradient's 16 input channels in three calls of 6, 6 and 4 accumulator
    // blocks (the gradient vector and a broadcast beside them).
    grad: [0 + 6, 6 + 6, 12 + 4];
}
