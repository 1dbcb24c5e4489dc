//! The other layers on the GPU (`kernels/layers.cu` + cuBLAS): ReLU, add, max- and
//! average-pools, the fully connected layer, and the non-finite count of the divergence
//! check.
use cudarc::driver::CudaSlice;

use super::{pool_abi, u32_of, Cuda};
use crate::backend::{check_avgpool, LinearShape, PoolShape};
use crate::cuda::{kernels, launch, view, view_mut};
use crate::error::{Error, Result};

impl Cuda {
    /// For each buffer, how many of its elements are NaN or infinite. One pass over each
    /// buffer on the device and one small download (which waits for the stream).
    pub fn count_non_finite(&self, bufs: &[&CudaSlice<f32>]) -> Result<Vec<u64>> {
        if bufs.is_empty() {
            return Ok(Vec::new());
        }
        let mut counts = self.gpu.zeros::<u64>(bufs.len())?;
        for (i, buf) in bufs.iter().enumerate() {
            let n = buf.len() as u64;
            if n == 0 {
                continue;
            }
            launch!(self.gpu, kernels::layers::COUNT_NONFINITE_F32, self.elementwise(n);
                buf.as_view(),
                n,
                mut counts.slice_mut(i..i + 1)
            );
        }
        self.gpu.download(&counts)
    }

    /// `out[i] = x[rows[i]]` on the device (the indices go up, nothing comes down); the
    /// caller checked every index against `x`'s rows.
    pub(super) fn gather_rows_impl(
        &self,
        x: &CudaSlice<f32>,
        rows: &[usize],
        row_len: usize,
    ) -> Result<CudaSlice<f32>> {
        let mut out = self.gpu.zeros::<f32>(rows.len() * row_len)?;
        if out.is_empty() {
            return Ok(out);
        }
        let idx: Vec<u32> = rows
            .iter()
            .map(|&r| u32_of(r, "gather row"))
            .collect::<Result<_>>()?;
        let idx = self.gpu.upload(&idx)?;
        let total = (rows.len() * row_len) as u64;
        launch!(self.gpu, kernels::layers::GATHER_ROWS_F32, self.elementwise(total);
            x.as_view(),
            idx.as_view(),
            rows.len() as u64,
            row_len as u64,
            mut out.as_view_mut()
        );
        Ok(out)
    }

    pub(super) fn relu_forward_impl(&self, x: &mut CudaSlice<f32>) -> Result<()> {
        let n = x.len() as u64;
        if n == 0 {
            return Ok(());
        }
        launch!(self.gpu, kernels::layers::RELU_F32, self.elementwise(n);
            mut x.as_view_mut(),
            n
        );
        Ok(())
    }

    pub(super) fn relu_backward_impl(
        &self,
        y: &CudaSlice<f32>,
        dy: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let n = dy.len();
        let yv = view("relu y", y, 0, n)?;
        if n == 0 {
            return Ok(());
        }
        launch!(self.gpu, kernels::layers::RELU_BWD_F32, self.elementwise(n as u64);
            yv,
            mut dy.as_view_mut(),
            n as u64
        );
        Ok(())
    }

    pub(super) fn add_assign_impl(&self, a: &mut CudaSlice<f32>, b: &CudaSlice<f32>) -> Result<()> {
        if a.len() != b.len() {
            return Err(Error::invalid(format!(
                "add: lengths differ ({} and {})",
                a.len(),
                b.len()
            )));
        }
        let n = a.len() as u64;
        if n == 0 {
            return Ok(());
        }
        launch!(self.gpu, kernels::layers::ADD_F32, self.elementwise(n);
            mut a.as_view_mut(),
            b.as_view(),
            n
        );
        Ok(())
    }

    pub(super) fn maxpool_forward_impl(
        &self,
        s: &PoolShape,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        idx: &mut CudaSlice<u32>,
    ) -> Result<()> {
        let (hw, hwo) = (s.h * s.w, s.ho * s.wo);
        s.check_forward(x.len(), y.len(), idx.len())?;
        let xv = view("maxpool x", x, 0, s.planes * hw)?;
        let yv = view_mut("maxpool y", y, 0, s.planes * hwo)?;
        let iv = view_mut("maxpool idx", idx, 0, s.planes * hwo)?;
        launch!(self.gpu, kernels::layers::MAXPOOL_F32, self.elementwise((s.planes * hwo) as u64);
            xv,
            mut yv,
            mut iv,
            pool_abi(s)?
        );
        Ok(())
    }

    pub(super) fn maxpool_backward_impl(
        &self,
        s: &PoolShape,
        dy: &CudaSlice<f32>,
        idx: &CudaSlice<u32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (hw, hwo) = (s.h * s.w, s.ho * s.wo);
        s.check_backward(dy.len(), idx.len(), dx.len())?;
        let dyv = view("maxpool dy", dy, 0, s.planes * hwo)?;
        let iv = view("maxpool idx", idx, 0, s.planes * hwo)?;
        let dxv = view_mut("maxpool dx", dx, 0, s.planes * hw)?;
        launch!(self.gpu, kernels::layers::MAXPOOL_BWD_F32, self.elementwise((s.planes * hw) as u64);
            dyv,
            iv,
            mut dxv,
            pool_abi(s)?
        );
        Ok(())
    }

    pub(super) fn avgpool_forward_impl(
        &self,
        planes: usize,
        hw: usize,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_avgpool(planes, hw, ("avgpool x", x.len()), ("avgpool y", y.len()))?;
        let xv = view("avgpool x", x, 0, planes * hw)?;
        let yv = view_mut("avgpool y", y, 0, planes)?;
        launch!(self.gpu, kernels::layers::AVGPOOL_F32, self.elementwise(planes as u64 * 32);
            xv,
            mut yv,
            planes as u64,
            hw as u64
        );
        Ok(())
    }

    pub(super) fn avgpool_backward_impl(
        &self,
        planes: usize,
        hw: usize,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_avgpool(
            planes,
            hw,
            ("avgpool dx", dx.len()),
            ("avgpool dy", dy.len()),
        )?;
        let dyv = view("avgpool dy", dy, 0, planes)?;
        let dxv = view_mut("avgpool dx", dx, 0, planes * hw)?;
        launch!(self.gpu, kernels::layers::AVGPOOL_BWD_F32, self.elementwise((planes * hw) as u64);
            dyv,
            mut dxv,
            planes as u64,
            hw as u64
        );
        Ok(())
    }

    pub(super) fn linear_forward_impl(
        &self,
        s: &LinearShape,
        x: &CudaSlice<f32>,
        params: &CudaSlice<f32>,
        w_off: usize,
        b_off: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        s.check_forward(x.len(), params.len(), (w_off, b_off), y.len())?;
        let xv = view("linear x", x, 0, s.n * s.fin)?;
        let wv = view("linear weight", params, w_off, s.fout * s.fin)?;
        let bv = view("linear bias", params, b_off, s.fout)?;
        let mut yv = view_mut("linear y", y, 0, s.n * s.fout)?;
        launch!(self.gpu, kernels::layers::BIAS_ROWS_F32, self.elementwise((s.n * s.fout) as u64);
            mut yv.slice_mut(..),
            bv,
            s.n as u64,
            s.fout as u64
        );
        // y (N x OUT) += x (N x IN) W^T (IN x OUT)
        self.gemm_rm(
            (false, true),
            (s.n, s.fout, s.fin),
            1.0,
            &xv,
            &wv,
            1.0,
            &mut yv,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear_backward_impl(
        &self,
        s: &LinearShape,
        x: &CudaSlice<f32>,
        params: &CudaSlice<f32>,
        w_off: usize,
        b_off: usize,
        dy: &CudaSlice<f32>,
        dx: Option<&mut CudaSlice<f32>>,
        grads: &mut CudaSlice<f32>,
    ) -> Result<()> {
        s.check_backward(
            (x.len(), dy.len(), dx.as_ref().map(|d| d.len())),
            (params.len(), grads.len()),
            (w_off, b_off),
        )?;
        let xv = view("linear x", x, 0, s.n * s.fin)?;
        let wv = view("linear weight", params, w_off, s.fout * s.fin)?;
        let dyv = view("linear dy", dy, 0, s.n * s.fout)?;
        if let Some(dx) = dx {
            let mut dxv = view_mut("linear dx", dx, 0, s.n * s.fin)?;
            // dx (N x IN) = dy (N x OUT) W (OUT x IN)
            self.gemm_rm(
                (false, false),
                (s.n, s.fin, s.fout),
                1.0,
                &dyv,
                &wv,
                0.0,
                &mut dxv,
            )?;
        }
        // dW (OUT x IN) += dy^T (OUT x N) x (N x IN)
        self.gemm_rm(
            (true, false),
            (s.fout, s.fin, s.n),
            1.0,
            &dyv,
            &xv,
            1.0,
            &mut view_mut("linear weight grad", grads, w_off, s.fout * s.fin)?,
        )?;
        launch!(self.gpu, kernels::layers::COL_SUM_ACC_F32, self.per_channel(s.fout);
            dyv,
            mut view_mut("linear bias grad", grads, b_off, s.fout)?,
            s.n as u64,
            s.fout as u64
        );
        Ok(())
    }
}
