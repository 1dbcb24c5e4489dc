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
