//! The SGD step over a flat parameter buffer.

use rayon::prelude::*;

use super::{Cpu, Scalar, ELEM_CHUNK};
use crate::error::{Error, Result};

impl<T: Scalar> Cpu<T> {
    pub(super) fn sgd_step_impl(
        &self,
        params: &mut [T],
        grads: &[T],
        momentum_buf: &mut [T],
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    ) -> Result<()> {
        check_sgd(
            params.len(),
            grads.len(),
            momentum_buf.len(),
            lr,
            momentum,
            weight_decay,
        )?;
        let (lr, mom, wd) = (
            T::from_f64(lr),
            T::from_f64(momentum),
            T::from_f64(weight_decay),
        );
        params
            .par_chunks_mut(ELEM_CHUNK)
            .zip(grads.par_chunks(ELEM_CHUNK))
            .zip(momentum_buf.par_chunks_mut(ELEM_CHUNK))
            .for_each(|((p, g), b)| {
                for ((p, &g), b) in p.iter_mut().zip(g).zip(b) {
                    let d = g + wd * *p;
                    *b = mom * *b + d;
                    *p = *p - lr * *b;
                }
            });
        Ok(())
    }
}

impl Cpu<f32> {
    /// CPU reference of `Cuda::sgd_step_bf16_copy`: the f32 SGD step, then `params_bf16`
    /// receives the new parameters rounded to the nearest bf16 (ties to even). Nothing
    /// changes on error.
    ///
    /// ```
    /// use half::bf16;
    /// let be = moco::backend::Cpu::<f32>::new();
    /// let (mut p, mut buf, mut copy) = (vec![1.0f32], vec![0.0f32], vec![bf16::ZERO]);
    /// be.sgd_step_bf16_copy(&mut p, &[0.5], &mut buf, &mut copy, (0.1, 0.9, 0.0)).unwrap();
    /// assert_eq!(p, vec![0.95]);
    /// assert_eq!(copy, vec![bf16::from_f32(0.95)]);
    /// ```
    pub fn sgd_step_bf16_copy(
        &self,
        params: &mut [f32],
        grads: &[f32],
        momentum_buf: &mut [f32],
        params_bf16: &mut [half::bf16],
        (lr, momentum, weight_decay): (f64, f64, f64),
    ) -> Result<()> {
        if params_bf16.len() != params.len() {
            return Err(Error::invalid(format!(
                "sgd: the bf16 copy has {} elements, the parameters {}",
                params_bf16.len(),
                params.len()
            )));
        }
        self.sgd_step_impl(params, grads, momentum_buf, lr, momentum, weight_decay)?;
        for (d, &p) in params_bf16.iter_mut().zip(params.iter()) {
            *d = half::bf16::from_f32(p);
        }
        Ok(())
    }
}

pub(crate) fn check_sgd(
    p: usize,
    g: usize,
    b: usize,
    lr: f64,
    momentum: f64,
    wd: f64,
) -> Result<()> {
    if p != g || p != b {
        return Err(Error::invalid(format!(
            "sgd: params ({p}), grads ({g}) and momentum buffer ({b}) must have the same length"
        )));
    }
    // The f32 backends compute with the values rounded to f32: they must be finite there.
    if !(lr as f32).is_finite() || lr < 0.0 {
        return Err(Error::invalid(format!(
            "sgd: learning rate must be finite and >= 0, got {lr}"
        )));
    }
    if !(0.0..=1.0).contains(&momentum) {
        return Err(Error::invalid(format!(
            "sgd: momentum must be in [0, 1], got {momentum}"
        )));
    }
    if !(wd as f32).is_finite() || wd < 0.0 {
        return Err(Error::invalid(format!(
            "sgd: weight decay must be finite and >= 0, got {wd}"
        )));
    }
    Ok(())
}
