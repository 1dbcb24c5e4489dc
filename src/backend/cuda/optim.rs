//! SGD on the GPU (`kernels/optim.cu`): one elementwise pass over the flat parameter,
//! gradient and momentum buffers.
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
        check_sgd(
            params.len(),
            grads.len(),
            momentum_buf.len(),
            lr,
            momentum,
            weight_decay,
        )?;
        let n = params.len() as u64;
        if n == 0 {
            return Ok(());
        }
        launch!(self.gpu, kernels::optim::SGD_F32, self.elementwise(n);
            mut params.as_view_mut(),
            grads.as_view(),
            mut momentum_buf.as_view_mut(),
            n,
            lr as f32,
            momentum as f32,
            weight_decay as f32
        );
        Ok(())
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
        if params_bf16.len() != params.len() {
            return Err(Error::invalid(format!(
                "sgd: the bf16 copy has {} elements, the parameters {}",
                params_bf16.len(),
                params.len()
            )));
        }
        let n = params.len() as u64;
        if n == 0 {
            return Ok(());
        }
        launch!(self.gpu, kernels::optim::SGD_BF16COPY_F32, self.elementwise(n);
            mut params.as_view_mut(),
            grads.as_view(),
            mut momentum_buf.as_view_mut(),
            mut params_bf16.as_view_mut(),
            n,
            lr as f32,
            momentum as f32,
            weight_decay as f32
        );
        Ok(())
    }
}
