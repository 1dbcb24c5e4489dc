//! Optimizer (SGD with momentum and weight decay, one fused pass over a flat buffer) and
//! learning-rate schedules (cosine, step, linear warmup).
use crate::backend::Backend;
use crate::error::{Error, Result};

/// SGD with momentum and weight decay, PyTorch semantics (no dampening, no Nesterov):
/// `g = grad + wd p; buf = momentum buf + g; p -= lr buf` (the first step sees `buf = 0`,
/// the same as PyTorch's `buf = g`).
pub struct Sgd<B: Backend> {
    backend: B,
    buf: B::Buf,
    /// Momentum (MoCo: 0.9).
    pub momentum: f64,
    /// Weight decay (MoCo: 1e-4; CIFAR recipe 5e-4).
    pub weight_decay: f64,
}

impl<B: Backend> Sgd<B> {
    /// An optimizer for a flat buffer of `n` parameters, momentum buffer zeroed.
    pub fn new(backend: B, n: usize, momentum: f64, weight_decay: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&momentum) {
            return Err(Error::invalid(format!(
                "sgd: momentum must be in [0, 1], got {momentum}"
            )));
        }
        if !(weight_decay as f32).is_finite() || weight_decay < 0.0 {
            return Err(Error::invalid(format!(
                "sgd: weight decay must be finite and >= 0, got {weight_decay}"
            )));
        }
        let buf = backend.zeros(n)?;
        Ok(Sgd {
            backend,
            buf,
            momentum,
            weight_decay,
        })
    }
    /// One step over the whole flat buffer (one fused pass on the GPU), with the
    /// hyper-parameters rounded to the backend's scalar.
    pub fn step(&mut self, params: &mut B::Buf, grads: &B::Buf, lr: f64) -> Result<()> {
        self.backend.sgd_step(
            params,
            grads,
            &mut self.buf,
            lr,
            self.momentum,
            self.weight_decay,
        )
    }
    /// The momentum buffer (for checkpoints).
    pub fn momentum_buffer(&self) -> &B::Buf {
        &self.buf
    }
    /// The momentum buffer, mutable (checkpoint restore).
    pub fn momentum_buffer_mut(&mut self) -> &mut B::Buf {
        &mut self.buf
    }
}

/// The shape of a learning-rate schedule after warmup.
#[derive(Debug, Clone, PartialEq)]
pub enum Decay {
    /// Constant learning rate.
    Constant,
    /// Half-cosine from the base rate to 0 over the run; `per_step` updates it every step,
    /// otherwise once per epoch (as the MoCo reference does).
    Cosine {
        /// Update every step instead of every epoch.
        per_step: bool,
    },
    /// Multiply by `gamma` at each milestone epoch (MoCo v1: 120 and 160, gamma 0.1).
    Step {
        /// Epochs at which the rate drops.
        milestones: Vec<usize>,
        /// Factor per milestone.
        gamma: f64,
    },
}

/// A learning-rate schedule: optional linear warmup, then a [`Decay`].
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    /// Base learning rate.
    pub base_lr: f64,
    /// Total epochs.
    pub epochs: usize,
    /// Steps (iterations) per epoch.
    pub steps_per_epoch: usize,
    /// Linear warmup length in epochs (0 for none): step `i` of the warmup uses
    /// `base_lr (i + 1) / warmup_steps`.
    pub warmup_epochs: usize,
    /// Decay after warmup.
    pub decay: Decay,
}

impl LrSchedule {
    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if !self.base_lr.is_finite() || self.base_lr < 0.0 {
            return Err(Error::invalid(format!(
                "learning rate must be finite and >= 0, got {}",
                self.base_lr
            )));
        }
        if self.epochs == 0 || self.steps_per_epoch == 0 {
            return Err(Error::invalid(
                "schedule needs at least one epoch and one step per epoch",
            ));
        }
        if self.warmup_epochs >= self.epochs && self.warmup_epochs > 0 {
            return Err(Error::invalid(format!(
                "warmup ({} epochs) must be shorter than the run ({} epochs)",
                self.warmup_epochs, self.epochs
            )));
        }
        if let Decay::Step { gamma, .. } = &self.decay {
            if !gamma.is_finite() || *gamma < 0.0 {
                return Err(Error::invalid(format!(
                    "step gamma must be finite and >= 0, got {gamma}"
                )));
            }
        }
        Ok(())
    }

    /// The learning rate at global step `step` (0-based; epoch = step / steps_per_epoch).
    pub fn lr_at(&self, step: usize) -> f64 {
        let spe = self.steps_per_epoch.max(1);
        let warm = self.warmup_epochs * spe;
        if step < warm {
            return self.base_lr * (step + 1) as f64 / warm as f64;
        }
        let epoch = step / spe;
        match &self.decay {
            Decay::Constant => self.base_lr,
            Decay::Cosine { per_step } => {
                // Saturating: an unvalidated schedule (warmup >= epochs) never panics.
                let (t, total) = if *per_step {
                    (
                        step.saturating_sub(warm) as f64,
                        (self.epochs * spe).saturating_sub(warm) as f64,
                    )
                } else {
                    (
                        epoch.saturating_sub(self.warmup_epochs) as f64,
                        self.epochs.saturating_sub(self.warmup_epochs) as f64,
                    )
                };
                let t = (t / total.max(1.0)).min(1.0);
                self.base_lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
            Decay::Step { milestones, gamma } => {
                let k = milestones.iter().filter(|&&m| epoch >= m).count();
                self.base_lr * gamma.powi(k as i32)
            }
        }
    }
}
