//! The recipe pieces timm's `train.py` users expect, each as PyTorch/timm computes it:
//! gradient accumulation, clipping by global norm (`torch.nn.utils.clip_grad_norm_`),
//! an exponential moving average of the weights (timm's `ModelEmaV3`), and mixup/cutmix
//! (timm's `Mixup` in batch mode).

use candle_core::backprop::GradStore;
use candle_core::{bail, DType, IndexOp, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use resnet_core::ResNet;

use crate::data::Random;
use crate::optim::Parameter;

/// Sums the gradients of several backward passes, as PyTorch's `.grad` accumulates:
/// the first pass's gradients are taken as they are, each later one added.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sum: Option<GradStore>,
    passes: usize,
}

impl GradAccumulator {
    /// Adds the gradients of one backward pass.
    pub fn add(&mut self, grads: GradStore) -> Result<()> {
        self.passes += 1;
        match &mut self.sum {
            None => self.sum = Some(grads),
            Some(sum) => sum.extend(grads)?,
        }
        Ok(())
    }

    /// Backward passes added since the last [`GradAccumulator::take`].
    pub fn passes(&self) -> usize {
        self.passes
    }

    /// The summed gradients, leaving the accumulator empty.
    pub fn take(&mut self) -> Option<GradStore> {
        self.passes = 0;
        self.sum.take()
    }
}

/// Scales the gradients of `parameters` in `grads` so that their global L2 norm is at
/// most `max_norm`, as `torch.nn.utils.clip_grad_norm_(parameters, max_norm)`: the
/// norm of the per-tensor norms, every gradient multiplied by
/// `min(max_norm / (norm + 1e-6), 1)`. Returns the norm before clipping.
pub fn clip_grad_norm(
    grads: &mut GradStore,
    parameters: &[Parameter],
    max_norm: f64,
) -> Result<f64> {
    if !max_norm.is_finite() || max_norm < 0.0 {
        bail!("the gradient clipping norm must be a finite number >= 0, found {max_norm}");
    }
    let mut squares = 0f32;
    let mut present = Vec::new();
    for parameter in parameters {
        if let Some(grad) = grads.get(parameter.var.as_tensor()) {
            let norm = grad.to_dtype(DType::F32)?.sqr()?.sum_all()?.sqrt()?;
            let norm = norm.to_scalar::<f32>()?;
            squares += norm * norm;
            present.push(parameter.var.as_tensor().clone());
        }
    }
    let total = squares.sqrt();
    // In f32, as PyTorch computes it for f32 gradients.
    let coefficient = (max_norm as f32 / (total + 1e-6)).min(1.0);
    for tensor in present {
        if let Some(grad) = grads.remove(&tensor) {
            let scaled = (grad.to_dtype(DType::F32)? * f64::from(coefficient))?;
            grads.insert(&tensor, scaled.to_dtype(grad.dtype())?);
        }
    }
    Ok(f64::from(total))
}

/// An exponential moving average of a network's tensors (parameters and BatchNorm
/// statistics), as timm's `ModelEmaV3` with a fixed decay (no warm-up) updated as
/// timm's train.py does after each optimizer step: `ema = lerp(ema, model, 1 − decay)`,
/// the first update a copy. The average is a network of its own, to
/// validate and to save.
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    model: ResNet,
    /// (name, the average's variable), in the model's order.
    tensors: Vec<(String, Var)>,
}

impl Ema {
    /// An average starting as a copy of `model`; `decay` in [0, 1).
    pub fn new(model: &ResNet, decay: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&decay) {
            bail!("the EMA decay must be in [0, 1), found {decay}");
        }
        let varmap = VarMap::new();
        let mut tensors = Vec::new();
        let mut dtype = DType::F32;
        {
            let mut data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            for (name, tensor) in model.named_tensors()? {
                dtype = tensor.dtype();
                let var = Var::from_tensor(&tensor.copy()?)?;
                data.insert(name.clone(), var.clone());
                tensors.push((name, var));
            }
        }
        let average = ResNet::new(
            model.config(),
            VarBuilder::from_varmap(&varmap, dtype, model.device()),
        )?;
        Ok(Self {
            decay,
            model: average,
            tensors,
        })
    }

    /// The decay.
    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// The decay of update number `step` (1-based), as `ModelEmaV3.get_decay(step)`
    /// without warm-up: 0 for the first (the average becomes a copy), then the decay.
    pub fn decay_at(&self, step: u64) -> f64 {
        if step <= 1 {
            0.0
        } else {
            self.decay
        }
    }

    /// Update number `step` (1-based: the optimizer steps done, as timm's train.py
    /// passes `num_updates`) towards `model`'s current tensors.
    pub fn update(&mut self, model: &ResNet, step: u64) -> Result<()> {
        let current: std::collections::HashMap<String, Tensor> =
            model.named_tensors()?.into_iter().collect();
        // torch.lerp(start, end, w) in f32: start + w·(end − start) for w < 0.5, else
        // end − (end − start)·(1 − w).
        let weight = (1.0 - self.decay_at(step)) as f32;
        let complement = 1.0f32 - weight;
        for (name, var) in &self.tensors {
            let Some(value) = current.get(name) else {
                bail!("the model has no tensor '{name}' to average");
            };
            let average = var.as_tensor();
            let difference = (value - average)?;
            let next = if weight < 0.5 {
                (average + (difference * f64::from(weight))?)?
            } else {
                (value - (difference * f64::from(complement))?)?
            };
            var.set(&next)?;
        }
        Ok(())
    }

    /// The averaged network.
    pub fn model(&self) -> &ResNet {
        &self.model
    }

    /// The average's tensors by name (to keep in a training state).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.tensors
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect()
    }

    /// Sets the average's tensors (a resumed run); every tensor must be there.
    pub fn load(&mut self, tensors: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        let vars = self.tensors.iter().map(|(name, var)| (name, var));
        set_all(vars, tensors, "the saved average")
    }
}

/// Sets each variable to the tensor of its name in `values`, converted to its dtype and
/// device; a missing tensor or one of another shape is an error naming `source`.
pub(crate) fn set_all<'a>(
    vars: impl IntoIterator<Item = (&'a String, &'a Var)>,
    values: &std::collections::HashMap<String, Tensor>,
    source: &str,
) -> Result<()> {
    for (name, var) in vars {
        let Some(value) = values.get(name) else {
            bail!("{source} has no tensor '{name}'");
        };
        if value.dims() != var.dims() {
            bail!(
                "{source}: '{name}' has shape {:?}, expected {:?}",
                value.dims(),
                var.dims()
            );
        }
        var.set(&value.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

/// timm's `Mixup` settings (batch mode: one coefficient and one box per batch).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixupConfig {
    /// Mixup's Beta(α, α) parameter; 0 turns mixup off.
    pub mixup_alpha: f64,
    /// CutMix's Beta(α, α) parameter; 0 turns cutmix off.
    pub cutmix_alpha: f64,
    /// The probability that a batch is mixed at all.
    pub prob: f64,
    /// With both on, the probability that a mixed batch uses cutmix.
    pub switch_prob: f64,
    /// Label smoothing of the mixed targets.
    pub label_smoothing: f64,
}

impl Default for MixupConfig {
    /// timm's defaults: both off, prob 1, switch prob 0.5, smoothing 0.1.
    fn default() -> Self {
        Self {
            mixup_alpha: 0.0,
            cutmix_alpha: 0.0,
            prob: 1.0,
            switch_prob: 0.5,
            label_smoothing: 0.1,
        }
    }
}

/// How one batch is mixed: the coefficient of the batch itself (the rest is its
/// reverse), and for cutmix the box pasted from the reversed batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixParams {
    /// The weight of each image's own content and label.
    pub lam: f64,
    /// Cutmix's box `(y0, y1, x0, x1)` (half-open), or `None` for mixup.
    pub cutmix_box: Option<(usize, usize, usize, usize)>,
}

/// Mixup and cutmix of batches, as timm's `Mixup(mode='batch', correct_lam=True)`.
#[derive(Debug, Clone)]
pub struct Mixup {
    config: MixupConfig,
    num_classes: usize,
}

impl Mixup {
    /// Mixing into `num_classes` soft targets; alphas >= 0, probabilities in [0, 1],
    /// smoothing in [0, 1].
    pub fn new(config: MixupConfig, num_classes: usize) -> Result<Self> {
        for (name, alpha) in [
            ("mixup", config.mixup_alpha),
            ("cutmix", config.cutmix_alpha),
        ] {
            if !alpha.is_finite() || alpha < 0.0 {
                bail!("the {name} alpha must be a finite number >= 0, found {alpha}");
            }
        }
        for (name, p) in [
            ("mixup probability", config.prob),
            ("switch probability", config.switch_prob),
            ("label smoothing", config.label_smoothing),
        ] {
            if !(0.0..=1.0).contains(&p) {
                bail!("the {name} must be in [0, 1], found {p}");
            }
        }
        if num_classes == 0 {
            bail!("mixing targets needs at least one class");
        }
        Ok(Self {
            config,
            num_classes,
        })
    }

    /// Whether it mixes at all.
    pub fn enabled(&self) -> bool {
        self.config.mixup_alpha > 0.0 || self.config.cutmix_alpha > 0.0
    }

    /// The coefficient and box for a batch of images `(H, W)`, drawn from `random` as
    /// timm draws them (the probability, the switch, Beta(α, α), the box's centre).
    pub fn draw(&self, random: &mut Random, height: usize, width: usize) -> Result<MixParams> {
        let MixupConfig {
            mixup_alpha,
            cutmix_alpha,
            prob,
            switch_prob,
            ..
        } = self.config;
        let unmixed = MixParams {
            lam: 1.0,
            cutmix_box: None,
        };
        if !self.enabled() || random.uniform() >= prob {
            return Ok(unmixed);
        }
        let use_cutmix = if mixup_alpha > 0.0 && cutmix_alpha > 0.0 {
            random.uniform() < switch_prob
        } else {
            cutmix_alpha > 0.0
        };
        let alpha = if use_cutmix {
            cutmix_alpha
        } else {
            mixup_alpha
        };
        let lam = beta(random, alpha)?;
        if !use_cutmix {
            return Ok(MixParams {
                lam,
                cutmix_box: None,
            });
        }
        let centre_y = random.up_to(height.saturating_sub(1) as u64) as usize;
        let centre_x = random.up_to(width.saturating_sub(1) as u64) as usize;
        Ok(cutmix_params(lam, height, width, centre_y, centre_x))
    }

    /// Mixes `images` `(N, C, H, W)` and turns `labels` `(N,)` into soft targets
    /// `(N, classes)`: each image with the batch reversed (`flip(0)`), as timm's
    /// `_mix_batch` and `mixup_target`. timm asserts an even batch; here an odd one
    /// (an epoch's last) mixes its middle image with itself.
    pub fn apply(
        &self,
        images: &Tensor,
        labels: &Tensor,
        params: &MixParams,
    ) -> Result<(Tensor, Tensor)> {
        let n = images.dim(0)?;
        let reversed_index = Tensor::from_vec(
            (0..n as u32).rev().collect::<Vec<u32>>(),
            n,
            images.device(),
        )?;
        let lam = params.lam;
        let mixed = if lam == 1.0 {
            images.clone()
        } else if let Some((y0, y1, x0, x1)) = params.cutmix_box {
            let reversed = images.index_select(&reversed_index, 0)?;
            let patch = reversed.i((.., .., y0..y1, x0..x1))?;
            if y1 > y0 && x1 > x0 {
                images.slice_assign(&[0..n, 0..images.dim(1)?, y0..y1, x0..x1], &patch)?
            } else {
                images.clone()
            }
        } else {
            let reversed = images.index_select(&reversed_index, 0)?;
            ((images * lam)? + (reversed * (1.0 - lam))?)?
        };
        let labels: Vec<u32> = labels.to_dtype(DType::U32)?.to_vec1()?;
        let targets = self.targets(&labels, lam)?;
        let targets = Tensor::from_vec(targets, (n, self.num_classes), images.device())?;
        Ok((mixed, targets))
    }

    /// timm's `mixup_target`: smoothed one-hot targets, `lam` of each image's own and
    /// `1 − lam` of the reversed batch's, row-major `(N, classes)`.
    fn targets(&self, labels: &[u32], lam: f64) -> Result<Vec<f32>> {
        let classes = self.num_classes;
        let smoothing = self.config.label_smoothing;
        let off = (smoothing / classes as f64) as f32;
        let on = (1.0 - smoothing + smoothing / classes as f64) as f32;
        let (own, other) = (lam as f32, (1.0 - lam) as f32);
        let mut targets = Vec::with_capacity(labels.len() * classes);
        for (i, &label) in labels.iter().enumerate() {
            let reversed = labels[labels.len() - 1 - i];
            for class in 0..classes as u32 {
                if label as usize >= classes || reversed as usize >= classes {
                    bail!("label {label} out of range for {classes} classes");
                }
                let a = if class == label { on } else { off };
                let b = if class == reversed { on } else { off };
                targets.push(a * own + b * other);
            }
        }
        Ok(targets)
    }
}

/// Cutmix's box for coefficient `lam` centred at `(centre_y, centre_x)` in an `H x W`
/// image, and the coefficient corrected to the box's clipped area, as timm's
/// `rand_bbox` and `cutmix_bbox_and_lam(correct_lam=True)`.
pub fn cutmix_params(
    lam: f64,
    height: usize,
    width: usize,
    centre_y: usize,
    centre_x: usize,
) -> MixParams {
    let ratio = (1.0 - lam).max(0.0).sqrt();
    let (cut_h, cut_w) = (
        (height as f64 * ratio) as usize,
        (width as f64 * ratio) as usize,
    );
    let clip = |v: isize, hi: usize| v.clamp(0, hi as isize) as usize;
    let (cy, cx) = (centre_y as isize, centre_x as isize);
    let y0 = clip(cy - (cut_h / 2) as isize, height);
    let y1 = clip(cy + cut_h.div_ceil(2) as isize, height);
    let x0 = clip(cx - (cut_w / 2) as isize, width);
    let x1 = clip(cx + cut_w.div_ceil(2) as isize, width);
    let area = ((y1 - y0) * (x1 - x0)) as f64;
    MixParams {
        lam: 1.0 - area / (height * width).max(1) as f64,
        cutmix_box: Some((y0, y1, x0, x1)),
    }
}

/// A draw from Beta(α, α) as the ratio of two Gamma(α) draws.
fn beta(random: &mut Random, alpha: f64) -> Result<f64> {
    let x = gamma(random, alpha);
    let y = gamma(random, alpha);
    if x + y <= 0.0 || (x + y).is_nan() {
        return Ok(0.5);
    }
    Ok(x / (x + y))
}

/// Gamma(α, 1) by Marsaglia and Tsang's method (α < 1 through α + 1 and `U^(1/α)`).
fn gamma(random: &mut Random, alpha: f64) -> f64 {
    if alpha < 1.0 {
        let u = random.uniform().max(f64::MIN_POSITIVE);
        return gamma(random, alpha + 1.0) * u.powf(1.0 / alpha);
    }
    let d = alpha - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let z = normal(random);
        let v = (1.0 + c * z).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = random.uniform().max(f64::MIN_POSITIVE);
        if u.ln() < 0.5 * z * z + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// A standard normal draw (Box-Muller).
fn normal(random: &mut Random) -> f64 {
    let u1 = random.uniform().max(f64::MIN_POSITIVE);
    let u2 = random.uniform();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Mean cross-entropy of `logits` `(N, K)` against soft `targets` `(N, K)`, as timm's
/// `SoftTargetCrossEntropy`: `mean_n sum_k −t·log_softmax(x)`.
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.dims() != targets.dims() {
        bail!(
            "soft targets of shape {:?} for logits of shape {:?}",
            targets.dims(),
            logits.dims()
        );
    }
    let log_probabilities =
        candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, candle_core::D::Minus1)?;
    let per_image = (targets.to_dtype(DType::F32)? * log_probabilities)?
        .sum(1)?
        .neg()?;
    per_image.mean_all()
}
