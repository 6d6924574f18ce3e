//! SGD and AdamW as PyTorch defines them, written once over a list of named parameters,
//! behind one [`Optimizer`] trait and one constructor from a name and settings.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{bail, DType, Result, Tensor, Var};
use candle_nn::VarMap;

/// A trainable tensor: its name (torchvision's), the variable, and whether weight decay
/// applies to it.
#[derive(Debug, Clone)]
pub struct Parameter {
    /// The tensor's name, as in the VarMap.
    pub name: String,
    /// The variable the optimizer updates.
    pub var: Var,
    /// Whether weight decay applies.
    pub decay: bool,
}

/// Every trainable variable of `varmap`, sorted by name: all but BatchNorm's running
/// statistics. With `no_decay_on_norm_and_bias`, BatchNorm weights and every bias (the
/// one-dimensional tensors) get no weight decay, as timm's `param_groups_weight_decay`.
pub fn parameters(varmap: &VarMap, no_decay_on_norm_and_bias: bool) -> Vec<Parameter> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut parameters: Vec<Parameter> = data
        .iter()
        .filter(|(name, _)| !name.ends_with("running_mean") && !name.ends_with("running_var"))
        .map(|(name, var)| Parameter {
            name: name.clone(),
            var: var.clone(),
            decay: !(no_decay_on_norm_and_bias && var.rank() <= 1),
        })
        .collect();
    parameters.sort_by(|a, b| a.name.cmp(&b.name));
    parameters
}

/// What a training loop needs of an optimizer: a step on the gradients of a backward
/// pass, the learning rate, and its state as named tensors (for a checkpoint).
///
/// Implemented by [`Sgd`] and [`AdamW`]; [`optimizer`] builds either from a name.
pub trait Optimizer: Send {
    /// Its name, as [`OptimizerKind`] parses it (`sgd`, `adamw`): recorded in the
    /// training state so that a resume with another optimizer is refused.
    fn name(&self) -> &'static str;
    /// The learning rate of the next step.
    fn lr(&self) -> f64;
    /// Sets the learning rate (a schedule calls this before each step).
    fn set_lr(&mut self, lr: f64);
    /// The parameters it updates.
    fn parameters(&self) -> &[Parameter];
    /// One update from the gradients of a backward pass (parameters the loss does not
    /// reach are left as they are).
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    /// Its state (momentum buffers, moments) as named tensors.
    fn state(&self) -> Result<HashMap<String, Tensor>>;
    /// Restores [`Optimizer::state`], checked against the parameters.
    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()>;
    /// The settings that decide its updates, by `resnet train` flag (the rate apart: a
    /// schedule changes it), recorded in the training state so that a resumed run with
    /// other settings is refused.
    fn settings(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// The parameter groups: how many parameters are updated, how many without decay.
fn group_settings(parameters: &[Parameter]) -> Vec<(String, String)> {
    let no_decay = parameters.iter().filter(|p| !p.decay).count();
    vec![
        ("parameters".to_string(), parameters.len().to_string()),
        ("parameters without decay".to_string(), no_decay.to_string()),
    ]
}

/// The optimizers there are, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    /// [`Sgd`].
    Sgd,
    /// [`AdamW`].
    AdamW,
}

impl std::str::FromStr for OptimizerKind {
    type Err = candle_core::Error;

    fn from_str(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "sgd" => Ok(Self::Sgd),
            "adamw" => Ok(Self::AdamW),
            _ => bail!("unknown optimizer '{name}', expected sgd or adamw"),
        }
    }
}

/// The settings of either optimizer; each takes what applies to it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerSettings {
    /// Base learning rate.
    pub lr: f64,
    /// Weight decay: L2 for SGD, decoupled for AdamW.
    pub weight_decay: f64,
    /// SGD's momentum.
    pub momentum: f64,
    /// SGD's Nesterov momentum.
    pub nesterov: bool,
    /// AdamW's betas.
    pub betas: (f64, f64),
    /// AdamW's epsilon.
    pub eps: f64,
}

impl Default for OptimizerSettings {
    /// The paper's SGD recipe (lr 0.1, momentum 0.9, weight decay 1e-4), PyTorch's
    /// AdamW betas and epsilon.
    fn default() -> Self {
        let adamw = AdamWConfig::default();
        let sgd = SgdConfig::default();
        Self {
            lr: sgd.lr,
            weight_decay: sgd.weight_decay,
            momentum: sgd.momentum,
            nesterov: sgd.nesterov,
            betas: (adamw.beta1, adamw.beta2),
            eps: adamw.eps,
        }
    }
}

/// An optimizer of `kind` over `parameters`, its settings checked.
pub fn optimizer(
    kind: OptimizerKind,
    parameters: Vec<Parameter>,
    settings: &OptimizerSettings,
) -> Result<Box<dyn Optimizer>> {
    Ok(match kind {
        OptimizerKind::Sgd => Box::new(Sgd::new(
            parameters,
            SgdConfig {
                lr: settings.lr,
                momentum: settings.momentum,
                dampening: 0.0,
                nesterov: settings.nesterov,
                weight_decay: settings.weight_decay,
            },
        )?),
        OptimizerKind::AdamW => Box::new(AdamW::new(
            parameters,
            AdamWConfig {
                lr: settings.lr,
                beta1: settings.betas.0,
                beta2: settings.betas.1,
                eps: settings.eps,
                weight_decay: settings.weight_decay,
            },
        )?),
    })
}

/// `torch.optim.SGD`'s settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0: plain SGD).
    pub momentum: f64,
    /// Dampening of the momentum's new term.
    pub dampening: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 penalty, added to the gradient before momentum.
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    /// The paper's recipe: lr 0.1, momentum 0.9, weight decay 1e-4.
    fn default() -> Self {
        Self {
            lr: 0.1,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 1e-4,
        }
    }
}

/// Stochastic gradient descent as `torch.optim.SGD`: `d = g + wd·p`; with momentum
/// `b = d` on the first step, then `b = μ·b + (1 − dampening)·d`; `d = d + μ·b` (Nesterov)
/// or `d = b`; `p = p − lr·d`.
#[derive(Debug)]
pub struct Sgd {
    config: SgdConfig,
    parameters: Vec<Parameter>,
    momentum_buffers: HashMap<String, Tensor>,
}

fn check_finite_non_negative(name: &str, value: f64) -> Result<()> {
    if !value.is_finite() || value < 0.0 {
        bail!("{name} must be a finite number >= 0, found {value}");
    }
    Ok(())
}

/// The gradient of `var` in f32, detached; `None` where the loss does not reach it.
fn gradient(grads: &GradStore, var: &Var) -> Result<Option<Tensor>> {
    grads
        .get(var.as_tensor())
        .map(|g| g.detach().to_dtype(DType::F32))
        .transpose()
}

/// Writes `value` (f32) into `var` in its own dtype.
fn assign(var: &Var, value: &Tensor) -> Result<()> {
    var.set(&value.to_dtype(var.dtype())?)
}

impl Sgd {
    /// An optimizer over `parameters`; the settings are checked as PyTorch checks them.
    pub fn new(parameters: Vec<Parameter>, config: SgdConfig) -> Result<Self> {
        check_finite_non_negative("the learning rate", config.lr)?;
        check_finite_non_negative("momentum", config.momentum)?;
        check_finite_non_negative("weight decay", config.weight_decay)?;
        if !config.dampening.is_finite() {
            bail!("dampening must be finite, found {}", config.dampening);
        }
        if config.nesterov && (config.momentum <= 0.0 || config.dampening != 0.0) {
            bail!("Nesterov momentum requires a momentum > 0 and zero dampening");
        }
        Ok(Self {
            config,
            parameters,
            momentum_buffers: HashMap::new(),
        })
    }

    /// Its settings.
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }
}

impl Optimizer for Sgd {
    fn name(&self) -> &'static str {
        "sgd"
    }

    fn settings(&self) -> Vec<(String, String)> {
        let c = &self.config;
        let mut settings = vec![
            ("--momentum".to_string(), c.momentum.to_string()),
            ("dampening".to_string(), c.dampening.to_string()),
            ("--nesterov".to_string(), c.nesterov.to_string()),
            ("--weight-decay".to_string(), c.weight_decay.to_string()),
        ];
        settings.extend(group_settings(self.parameters()));
        settings
    }

    fn lr(&self) -> f64 {
        self.config.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    fn parameters(&self) -> &[Parameter] {
        &self.parameters
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let SgdConfig {
            lr,
            momentum,
            dampening,
            nesterov,
            weight_decay,
        } = self.config;
        for parameter in &self.parameters {
            let Some(mut d_p) = gradient(grads, &parameter.var)? else {
                continue;
            };
            let p = parameter.var.as_tensor().detach().to_dtype(DType::F32)?;
            if weight_decay != 0.0 && parameter.decay {
                d_p = (d_p + (&p * weight_decay)?)?;
            }
            if momentum != 0.0 {
                let buffer = match self.momentum_buffers.get(&parameter.name) {
                    None => d_p.clone(),
                    Some(buffer) => ((buffer * momentum)? + (&d_p * (1.0 - dampening))?)?,
                };
                d_p = if nesterov {
                    (d_p + (&buffer * momentum)?)?
                } else {
                    buffer.clone()
                };
                self.momentum_buffers.insert(parameter.name.clone(), buffer);
            }
            assign(&parameter.var, &(p - (d_p * lr)?)?)?;
        }
        Ok(())
    }

    /// The momentum buffers, as `momentum_buffer.NAME`.
    fn state(&self) -> Result<HashMap<String, Tensor>> {
        Ok(self
            .momentum_buffers
            .iter()
            .map(|(name, buffer)| (format!("momentum_buffer.{name}"), buffer.clone()))
            .collect())
    }

    /// A buffer for an unknown parameter or of another shape is an error.
    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let mut buffers = HashMap::new();
        for (key, buffer) in state {
            let Some(name) = key.strip_prefix("momentum_buffer.") else {
                continue;
            };
            let Some(parameter) = self.parameters.iter().find(|p| p.name == name) else {
                bail!("optimizer state for '{name}', which is not a parameter");
            };
            if buffer.dims() != parameter.var.dims() {
                bail!(
                    "momentum buffer of '{name}': expected shape {:?}, found {:?}",
                    parameter.var.dims(),
                    buffer.dims()
                );
            }
            let buffer = buffer
                .to_dtype(DType::F32)?
                .to_device(parameter.var.device())?;
            buffers.insert(name.to_string(), buffer);
        }
        self.momentum_buffers = buffers;
        Ok(())
    }
}

/// `torch.optim.AdamW`'s settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay rate of the gradient's running average.
    pub beta1: f64,
    /// Decay rate of the squared gradient's running average.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW as `torch.optim.AdamW`: `p = p·(1 − lr·wd)`; `m = β1·m + (1 − β1)·g`;
/// `v = β2·v + (1 − β2)·g²`; `p = p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)`.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    parameters: Vec<Parameter>,
    /// Per parameter: (step count, m, v).
    moments: HashMap<String, (u64, Tensor, Tensor)>,
}

impl AdamW {
    /// An optimizer over `parameters`; the settings are checked as PyTorch checks them.
    pub fn new(parameters: Vec<Parameter>, config: AdamWConfig) -> Result<Self> {
        check_finite_non_negative("the learning rate", config.lr)?;
        check_finite_non_negative("epsilon", config.eps)?;
        check_finite_non_negative("weight decay", config.weight_decay)?;
        for (name, beta) in [("beta1", config.beta1), ("beta2", config.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                bail!("{name} must be in [0, 1), found {beta}");
            }
        }
        Ok(Self {
            config,
            parameters,
            moments: HashMap::new(),
        })
    }

    /// Its settings.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }
}

impl Optimizer for AdamW {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn settings(&self) -> Vec<(String, String)> {
        let c = &self.config;
        let mut settings = vec![
            ("betas".to_string(), format!("{}, {}", c.beta1, c.beta2)),
            ("eps".to_string(), c.eps.to_string()),
            ("--weight-decay".to_string(), c.weight_decay.to_string()),
        ];
        settings.extend(group_settings(self.parameters()));
        settings
    }

    fn lr(&self) -> f64 {
        self.config.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    fn parameters(&self) -> &[Parameter] {
        &self.parameters
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let AdamWConfig {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        for parameter in &self.parameters {
            let Some(g) = gradient(grads, &parameter.var)? else {
                continue;
            };
            let mut p = parameter.var.as_tensor().detach().to_dtype(DType::F32)?;
            if weight_decay != 0.0 && parameter.decay {
                p = (p * (1.0 - lr * weight_decay))?;
            }
            let (step, m, v) = match self.moments.remove(&parameter.name) {
                Some(state) => state,
                None => (0, g.zeros_like()?, g.zeros_like()?),
            };
            let step = step + 1;
            let m = ((m * beta1)? + (&g * (1.0 - beta1))?)?;
            let v = ((v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let bias_correction1 = 1.0 - beta1.powi(step as i32);
            let bias_correction2 = 1.0 - beta2.powi(step as i32);
            let step_size = lr / bias_correction1;
            let denominator = ((v.sqrt()? / bias_correction2.sqrt())? + eps)?;
            let update = ((&m / denominator)? * step_size)?;
            assign(&parameter.var, &(p - update)?)?;
            self.moments.insert(parameter.name.clone(), (step, m, v));
        }
        Ok(())
    }

    /// The moments and step counts, as `exp_avg.NAME`, `exp_avg_sq.NAME`, `step.NAME`.
    fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut state = HashMap::new();
        for (name, (step, m, v)) in &self.moments {
            state.insert(format!("exp_avg.{name}"), m.clone());
            state.insert(format!("exp_avg_sq.{name}"), v.clone());
            let step = Tensor::new(&[*step as f32], m.device())?;
            state.insert(format!("step.{name}"), step);
        }
        Ok(state)
    }

    /// Moments for an unknown parameter, of another shape, or without their step count
    /// are an error.
    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let mut moments = HashMap::new();
        for parameter in &self.parameters {
            let name = &parameter.name;
            let get = |prefix: &str| state.get(&format!("{prefix}.{name}"));
            let (m, v, step) = match (get("exp_avg"), get("exp_avg_sq"), get("step")) {
                (None, None, None) => continue,
                (Some(m), Some(v), Some(step)) => (m, v, step),
                _ => bail!("optimizer state for '{name}' is incomplete"),
            };
            for moment in [m, v] {
                if moment.dims() != parameter.var.dims() {
                    bail!(
                        "moments of '{name}': expected shape {:?}, found {:?}",
                        parameter.var.dims(),
                        moment.dims()
                    );
                }
            }
            let step = step.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let Some(&step) = step.first().filter(|s| s.is_finite() && **s >= 0.0) else {
                bail!("step count of '{name}' is not a count");
            };
            let device = parameter.var.device();
            let to = |t: &Tensor| t.to_dtype(DType::F32)?.to_device(device);
            moments.insert(name.clone(), (step as u64, to(m)?, to(v)?));
        }
        self.moments = moments;
        Ok(())
    }
}
