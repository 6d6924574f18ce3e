//! The classification loss.

use candle_core::{bail, DType, Result, Tensor, D};

/// Mean cross-entropy of `logits` `(N, K)` against class indices `targets` `(N,)`, with
/// label smoothing `ε` as `torch.nn.functional.cross_entropy(label_smoothing=ε)`:
/// `(1 − ε)·(−log p_y) + ε·mean_k(−log p_k)`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, label_smoothing: f64) -> Result<Tensor> {
    if !(0.0..=1.0).contains(&label_smoothing) {
        bail!("label smoothing must be in [0, 1], found {label_smoothing}");
    }
    let log_probabilities = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let targets = targets.to_dtype(DType::U32)?;
    let picked = log_probabilities
        .gather(&targets.unsqueeze(1)?, 1)?
        .squeeze(1)?;
    let nll = picked.neg()?.mean_all()?;
    if label_smoothing == 0.0 {
        return Ok(nll);
    }
    let uniform = log_probabilities.mean(D::Minus1)?.neg()?.mean_all()?;
    (nll * (1.0 - label_smoothing))? + (uniform * label_smoothing)?
}
