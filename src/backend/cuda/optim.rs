//! SGD on the GPU (`kernels/optim.cu`): one elementwise pass over the flat parameter,
//! gradient and momentum buffers.
use cudarc::driver::CudaSlice;

use super::Cuda;
use crate::backend::cpu::check_sgd;
use crate::cuda::{kernels, launch};
use crate::error::Result;

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
}
