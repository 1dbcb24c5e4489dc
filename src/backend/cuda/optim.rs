//! SGD on the GPU (`kernels/optim.cu`): one elementwise pass over the flat parameter,
//! gradient and momentum buffers, optionally writing the parameters' bf16 copy in the same
//! pass.
use cudarc::driver::CudaSlice;

use super::Cuda;
use crate::backend::cpu::check_sgd;
use crate::cuda::{kernels, launch};
use crate::error::{Error, Result};

impl Cuda {
    pub(super) fn sgd_step_impl(
        &self,
        params: &mut CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        momentum_buf: &mut CudaSlice<f32>,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    ) -> Result<()> {
        self.sgd(
            params,
            grads,
            momentum_buf,
            None,
            (lr, momentum, weight_decay),
        )
    }

    /// [`Backend::sgd_step`](crate::backend::Backend::sgd_step) that also writes the
    /// parameters' bf16 copy (the weights a bf16 forward reads) in the same pass: `params`
    /// and `momentum_buf` change exactly as `sgd_step` changes them, and `params_bf16`
    /// receives the new parameters rounded to nearest even. All lengths are checked first.
    pub fn sgd_step_bf16_copy(
        &self,
        params: &mut CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        momentum_buf: &mut CudaSlice<f32>,
        params_bf16: &mut CudaSlice<half::bf16>,
        hp: (f64, f64, f64),
    ) -> Result<()> {
        self.sgd(params, grads, momentum_buf, Some(params_bf16), hp)
    }

    /// Both SGD kernels: the checks, then `moco_sgd_f32`, or `moco_sgd_bf16copy_f32` when a
    /// bf16 copy is asked for (the same arithmetic, plus the rounded store).
    fn sgd(
        &self,
        params: &mut CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        momentum_buf: &mut CudaSlice<f32>,
        params_bf16: Option<&mut CudaSlice<half::bf16>>,
        (lr, momentum, weight_decay): (f64, f64, f64),
    ) -> Result<()> {
        check_sgd(
            params.len(),
            grads.len(),
            momentum_buf.len(),
            lr,
            momentum,
            weight_decay,
        )?;
        if let Some(copy) = &params_bf16 {
            if copy.len() != params.len() {
                return Err(Error::invalid(format!(
                    "sgd: the bf16 copy has {} elements, the parameters {}",
                    copy.len(),
                    params.len()
                )));
            }
        }
        let n = params.len() as u64;
        if n == 0 {
            return Ok(());
        }
        let (lr, momentum, wd) = (lr as f32, momentum as f32, weight_decay as f32);
        let cfg = self.elementwise(n);
        match params_bf16 {
            None => launch!(self.gpu, kernels::optim::SGD_F32, cfg;
                mut params.as_view_mut(),
                grads.as_view(),
                mut momentum_buf.as_view_mut(),
                n,
                lr,
                momentum,
                wd
            ),
            Some(copy) => launch!(self.gpu, kernels::optim::SGD_BF16COPY_F32, cfg;
                mut params.as_view_mut(),
                grads.as_view(),
                mut momentum_buf.as_view_mut(),
                mut copy.as_view_mut(),
                n,
                lr,
                momentum,
                wd
            ),
        }
        Ok(())
    }
}
