//! The CPU kernels, apart from the model code that calls them.
//!
//! - [`gemm_conv`]: im2col + GEMM convolution with a fused bias/residual/ReLU epilogue
//!   (any CPU, f32/f16), and the task runner the other kernels share.
//! - [`blocked`] and [`winograd`]: the channel-blocked AVX-512 inference kernels.
//! - [`conv_grad`], [`batch_norm_grad`] and [`max_pool_grad`]: training's convolution,
//!   BatchNorm (+ residual + ReLU) and stem pooling, with their backward passes as
//!   kernels rather than candle's op-by-op compositions.

pub(crate) mod batch_norm_grad;
pub(crate) mod blocked;
pub(crate) mod conv_grad;
pub(crate) mod gemm_conv;
pub(crate) mod max_pool_grad;
pub(crate) mod winograd;
