//! Learning-rate schedules, stepped once per iteration (not per epoch), so that a short
//! run and a resumed run see the same rates.

use candle_core::{bail, Result};

/// The shape of the schedule after the warm-up.
#[derive(Debug, Clone, PartialEq)]
pub enum ScheduleKind {
    /// The base rate throughout.
    Constant,
    /// The base rate times `gamma` for every milestone passed (milestones are iteration
    /// numbers, counted from the start of the run), as `torch.optim.lr_scheduler.MultiStepLR`.
    Step {
        /// Iterations at which the rate is multiplied by `gamma`, ascending.
        milestones: Vec<u64>,
        /// The factor.
        gamma: f64,
    },
    /// Cosine from the base rate to zero over the iterations after the warm-up, as
    /// `CosineAnnealingLR(T_max=total - warmup, eta_min=0)` in closed form.
    Cosine,
}

impl ScheduleKind {
    /// Parses `constant`, `cosine`, or `step:M1,M2,...` with an optional `@GAMMA`
    /// (default 0.1), e.g. `step:100,150@0.2`; the milestones are counted in units of
    /// `unit` iterations (1 for iterations, the steps per epoch for epochs).
    pub fn parse(spec: &str, unit: u64) -> Result<Self> {
        let spec = spec.trim();
        match spec {
            "constant" => return Ok(Self::Constant),
            "cosine" => return Ok(Self::Cosine),
            _ => {}
        }
        let Some(rest) = spec.strip_prefix("step:") else {
            bail!("unknown schedule '{spec}', expected constant, cosine or step:M1,M2[@GAMMA]");
        };
        let (milestones, gamma) = match rest.split_once('@') {
            Some((milestones, gamma)) => {
                let gamma: f64 = gamma.trim().parse().map_err(|_| {
                    candle_core::Error::Msg(format!(
                        "schedule '{spec}': gamma '{gamma}' is not a number"
                    ))
                })?;
                (milestones, gamma)
            }
            None => (rest, 0.1),
        };
        let milestones = milestones
            .split(',')
            .map(|m| {
                m.trim()
                    .parse::<u64>()
                    .ok()
                    .and_then(|m| m.checked_mul(unit))
                    .ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "schedule '{spec}': milestone '{m}' is not a count"
                        ))
                    })
            })
            .collect::<Result<Vec<u64>>>()?;
        Ok(Self::Step { milestones, gamma })
    }
}

/// A learning rate for every iteration of a run: a linear warm-up, then `kind`.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    base_lr: f64,
    total_iterations: u64,
    warmup_iterations: u64,
    kind: ScheduleKind,
}

impl Schedule {
    /// `kind` over a run of `total_iterations`, after `warmup_iterations` in which the
    /// rate rises linearly, `base_lr · (t + 1) / warmup` at iteration `t` (never zero; the
    /// base rate at the first iteration after).
    pub fn new(
        base_lr: f64,
        total_iterations: u64,
        warmup_iterations: u64,
        kind: ScheduleKind,
    ) -> Result<Self> {
        if !base_lr.is_finite() || base_lr < 0.0 {
            bail!("the learning rate must be a finite number >= 0, found {base_lr}");
        }
        if warmup_iterations > total_iterations {
            bail!(
                "the warm-up ({warmup_iterations} iterations) is longer than the run ({total_iterations})"
            );
        }
        if let ScheduleKind::Step { milestones, gamma } = &kind {
            if !gamma.is_finite() || *gamma < 0.0 {
                bail!("gamma must be a finite number >= 0, found {gamma}");
            }
            if milestones.windows(2).any(|w| w[0] >= w[1]) {
                bail!("milestones must be strictly increasing, found {milestones:?}");
            }
        }
        Ok(Self {
            base_lr,
            total_iterations,
            warmup_iterations,
            kind,
        })
    }

    /// The rate for iteration `t` (0-based); past the end, the last rate.
    pub fn lr(&self, t: u64) -> f64 {
        let t = t.min(self.total_iterations.saturating_sub(1));
        if t < self.warmup_iterations {
            return self.base_lr * (t + 1) as f64 / self.warmup_iterations as f64;
        }
        match &self.kind {
            ScheduleKind::Constant => self.base_lr,
            ScheduleKind::Step { milestones, gamma } => {
                let passed = milestones.iter().filter(|&&m| m <= t).count();
                self.base_lr * gamma.powi(passed as i32)
            }
            ScheduleKind::Cosine => {
                let span = (self.total_iterations - self.warmup_iterations).max(1) as f64;
                let progress = (t - self.warmup_iterations) as f64 / span;
                self.base_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_then_each_kind() -> Result<()> {
        let constant = Schedule::new(0.1, 10, 4, ScheduleKind::Constant)?;
        let rates: Vec<f64> = (0..6).map(|t| constant.lr(t)).collect();
        for (got, want) in rates.iter().zip([0.025, 0.05, 0.075, 0.1, 0.1, 0.1]) {
            assert!((got - want).abs() < 1e-15, "{rates:?}");
        }

        let step = ScheduleKind::Step {
            milestones: vec![3, 6],
            gamma: 0.1,
        };
        let step = Schedule::new(1.0, 10, 0, step)?;
        let rates: Vec<f64> = (0..8).map(|t| step.lr(t)).collect();
        let expected = [1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1 * 0.1, 0.1 * 0.1];
        for (got, want) in rates.iter().zip(expected) {
            assert!((got - want).abs() < 1e-15, "{rates:?}");
        }

        let cosine = Schedule::new(0.1, 12, 2, ScheduleKind::Cosine)?;
        assert_eq!(cosine.lr(0), 0.05);
        assert_eq!(cosine.lr(2), 0.1);
        assert!(
            (cosine.lr(7) - 0.05).abs() < 1e-12,
            "halfway: {}",
            cosine.lr(7)
        );
        assert!(cosine.lr(11) > 0.0 && cosine.lr(11) < 0.003);
        assert_eq!(cosine.lr(1000), cosine.lr(11));
        Ok(())
    }

    #[test]
    fn kinds_parse_from_strings() -> Result<()> {
        assert_eq!(ScheduleKind::parse("cosine", 10)?, ScheduleKind::Cosine);
        assert_eq!(ScheduleKind::parse("constant", 10)?, ScheduleKind::Constant);
        assert_eq!(
            ScheduleKind::parse("step:3,6", 10)?,
            ScheduleKind::Step {
                milestones: vec![30, 60],
                gamma: 0.1
            }
        );
        assert_eq!(
            ScheduleKind::parse("step:5@0.5", 1)?,
            ScheduleKind::Step {
                milestones: vec![5],
                gamma: 0.5
            }
        );
        for bad in ["linear", "step:", "step:a", "step:3@x", "step:-1"] {
            assert!(ScheduleKind::parse(bad, 1).is_err(), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(Schedule::new(-0.1, 10, 0, ScheduleKind::Constant).is_err());
        assert!(Schedule::new(0.1, 10, 11, ScheduleKind::Constant).is_err());
        let unsorted = ScheduleKind::Step {
            milestones: vec![5, 3],
            gamma: 0.1,
        };
        assert!(Schedule::new(0.1, 10, 0, unsorted).is_err());
    }
}
