//! Convolutions on the GPU (`kernels/conv.cu` + cuBLAS): im2col per chunk of samples, one
//! SGEMM, and a permute between the GEMM's channel-major layout and NCHW; the backward adds
//! the weight gradient's GEMM and scatters the columns back with col2im.
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr};

use super::{conv_abi, cudnn, Cuda};
use crate::backend::{check_len, ConvShape};
use crate::cuda::{grow, kernels, launch, lock, view, view_mut};
use crate::error::{CudaResultExt, Error, Result};

/// Upper bound on the im2col buffer of one convolution (elements): the batch is processed in
/// chunks of samples whose columns fit.
const COL_BUDGET: usize = 1 << 26;

/// Samples per im2col chunk.
fn conv_chunk(s: &ConvShape) -> usize {
    let per = (s.cin * s.k * s.k * s.ho * s.wo)
        .max(s.cout * s.ho * s.wo)
        .max(1);
    (COL_BUDGET / per).clamp(1, s.n)
}

impl Cuda {
    /// The columns (Cin K K x m HoWo) of samples `n0 .. n0 + m` of `x` into `col`.
    fn im2col(
        &self,
        s: &ConvShape,
        x: &CudaSlice<f32>,
        n0: usize,
        m: usize,
        col: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let xs = s.cin * s.h * s.w;
        let need = s.cin * s.k * s.k * m * s.ho * s.wo;
        let xv = view("im2col x", x, n0 * xs, m * xs)?;
        let colv = view_mut("im2col col", col, 0, need)?;
        launch!(self.gpu, kernels::conv::IM2COL_F32, self.elementwise(need as u64);
            xv,
            mut colv,
            conv_abi(s, m)?
        );
        Ok(())
    }

    /// `dx` of samples `n0 .. n0 + m` from the columns' gradient `dcol` (the gather form of
    /// col2im: each input element sums the columns it fed, no atomics).
    fn col2im(
        &self,
        s: &ConvShape,
        dcol: &CudaSlice<f32>,
        n0: usize,
        m: usize,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let xs = s.cin * s.h * s.w;
        let colv = view("col2im col", dcol, 0, s.cin * s.k * s.k * m * s.ho * s.wo)?;
        let dxv = view_mut("col2im dx", dx, n0 * xs, m * xs)?;
        launch!(self.gpu, kernels::conv::COL2IM_F32, self.elementwise((m * xs) as u64);
            colv,
            mut dxv,
            conv_abi(s, m)?
        );
        Ok(())
    }

    /// `dst[b][a][p] = src[a][b][p]` over `a x b x p` elements of each view.
    fn permute01(
        &self,
        src: CudaView<'_, f32>,
        dst: CudaViewMut<'_, f32>,
        (a, b, p): (usize, usize, usize),
    ) -> Result<()> {
        let total = a * b * p;
        check_len("permute src", src.len(), 0, total)?;
        check_len("permute dst", dst.len(), 0, total)?;
        launch!(self.gpu, kernels::conv::PERMUTE01_F32, self.elementwise(total as u64);
            src,
            mut dst,
            a as u64,
            b as u64,
            p as u64
        );
        Ok(())
    }

    pub(super) fn conv2d_forward_impl(
        &self,
        s: &ConvShape,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        w_off: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        s.check_forward(x.len(), (w.len(), w_off), y.len())?;
        let wv = view("conv2d weight", w, w_off, s.w_len())?;
        if let Some(dnn) = &self.cudnn {
            let xv = view("conv2d x", x, 0, s.x_len())?;
            let mut yv = view_mut("conv2d y", y, 0, s.y_len())?;
            self.check_cudnn_aligned("conv2d x", &xv)?;
            self.check_cudnn_aligned("conv2d y", &yv)?;
            if self.cudnn_aligned(&wv) {
                return lock(dnn)?.forward(s, &xv, &wv, &mut yv);
            }
            // A weight at an unaligned offset: through an aligned copy.
            let mut guard = lock(&self.scratch.stage)?;
            let sw = grow(&self.gpu, &mut guard.0, s.w_len())?;
            let mut swv = view_mut("conv2d staged weight", sw, 0, s.w_len())?;
            self.gpu
                .stream()
                .memcpy_dtod(&wv, &mut swv)
                .call("cuMemcpyDtoDAsync")?;
            return lock(dnn)?.forward(s, &xv, &swv.as_view(), &mut yv);
        }
        let (hwo, ckk, ys) = (s.ho * s.wo, s.cin * s.k * s.k, s.cout * s.ho * s.wo);
        let nb = conv_chunk(s);
        let mut guard = lock(&self.scratch.conv)?;
        let (col, yt) = &mut *guard;
        let col = grow(&self.gpu, col, ckk * nb * hwo)?;
        let yt = grow(&self.gpu, yt, s.cout * nb * hwo)?;
        for n0 in (0..s.n).step_by(nb) {
            let m = nb.min(s.n - n0);
            self.im2col(s, x, n0, m, col)?;
            // Yt (Cout x m HoWo) = W (Cout x CKK) col (CKK x m HoWo)
            self.gemm_rm(
                (false, false),
                (s.cout, m * hwo, ckk),
                1.0,
                &wv,
                &col.as_view(),
                0.0,
                &mut yt.as_view_mut(),
            )?;
            let dst = view_mut("permute dst", y, n0 * ys, m * ys)?;
            self.permute01(yt.as_view(), dst, (s.cout, m, hwo))?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv2d_backward_impl(
        &self,
        s: &ConvShape,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        w_off: usize,
        dy: &CudaSlice<f32>,
        mut dx: Option<&mut CudaSlice<f32>>,
        dw: &mut CudaSlice<f32>,
        dw_off: usize,
    ) -> Result<()> {
        s.check_backward(
            x.len(),
            (w.len(), w_off),
            dy.len(),
            dx.as_ref().map(|d| d.len()),
            (dw.len(), dw_off),
        )?;
        let wv = view("conv2d weight", w, w_off, s.w_len())?;
        let mut dwv = view_mut("conv2d dw", dw, dw_off, s.w_len())?;
        if let Some(dnn) = &self.cudnn {
            let xv = view("conv2d x", x, 0, s.x_len())?;
            let dyv = view("conv2d dy", dy, 0, s.y_len())?;
            let mut dxv = match dx {
                Some(d) => Some(view_mut("conv2d dx", d, 0, s.x_len())?),
                None => None,
            };
            self.check_cudnn_aligned("conv2d x", &xv)?;
            self.check_cudnn_aligned("conv2d dy", &dyv)?;
            if let Some(d) = &dxv {
                self.check_cudnn_aligned("conv2d dx", d)?;
            }
            let (w_ok, dw_ok) = (self.cudnn_aligned(&wv), self.cudnn_aligned(&dwv));
            if w_ok && dw_ok {
                return lock(dnn)?.backward(s, &xv, &wv, &dyv, dxv.as_mut(), &mut dwv);
            }
            // A weight or gradient at an unaligned offset: through aligned copies, the
            // gradient copied in (it accumulates) and back.
            let stream = self.gpu.stream().clone();
            let mut guard = lock(&self.scratch.stage)?;
            let (sw, sdw) = &mut *guard;
            let sw = grow(&self.gpu, sw, s.w_len())?;
            let sdw = grow(&self.gpu, sdw, s.w_len())?;
            let mut swv = view_mut("conv2d staged weight", sw, 0, s.w_len())?;
            let mut sdwv = view_mut("conv2d staged dw", sdw, 0, s.w_len())?;
            if !w_ok {
                stream
                    .memcpy_dtod(&wv, &mut swv)
                    .call("cuMemcpyDtoDAsync")?;
            }
            if !dw_ok {
                stream
                    .memcpy_dtod(&dwv, &mut sdwv)
                    .call("cuMemcpyDtoDAsync")?;
            }
            {
                let staged;
                let wuse = if w_ok {
                    &wv
                } else {
                    staged = swv.as_view();
                    &staged
                };
                let dwuse = if dw_ok { &mut dwv } else { &mut sdwv };
                lock(dnn)?.backward(s, &xv, wuse, &dyv, dxv.as_mut(), dwuse)?;
            }
            if !dw_ok {
                stream
                    .memcpy_dtod(&sdwv, &mut dwv)
                    .call("cuMemcpyDtoDAsync")?;
            }
            return Ok(());
        }
        let (hwo, ckk, ys) = (s.ho * s.wo, s.cin * s.k * s.k, s.cout * s.ho * s.wo);
        let nb = conv_chunk(s);
        let mut guard = lock(&self.scratch.conv)?;
        let (col, dyt) = &mut *guard;
        let col = grow(&self.gpu, col, ckk * nb * hwo)?;
        let dyt = grow(&self.gpu, dyt, s.cout * nb * hwo)?;
        for n0 in (0..s.n).step_by(nb) {
            let m = nb.min(s.n - n0);
            // dYt (Cout x m HoWo) from dy (m x Cout x HoWo).
            let src = view("permute src", dy, n0 * ys, m * ys)?;
            self.permute01(src, dyt.as_view_mut(), (m, s.cout, hwo))?;
            self.im2col(s, x, n0, m, col)?;
            // dW (Cout x CKK) += dYt (Cout x K) col^T (K x CKK), K = m HoWo.
            self.gemm_rm(
                (false, true),
                (s.cout, ckk, m * hwo),
                1.0,
                &dyt.as_view(),
                &col.as_view(),
                1.0,
                &mut dwv,
            )?;
            if let Some(dx) = dx.as_deref_mut() {
                // dcol (CKK x m HoWo) = W^T (CKK x Cout) dYt (Cout x m HoWo), into `col`.
                self.gemm_rm(
                    (true, false),
                    (ckk, m * hwo, s.cout),
                    1.0,
                    &wv,
                    &dyt.as_view(),
                    0.0,
                    &mut col.as_view_mut(),
                )?;
                self.col2im(s, col, n0, m, dx)?;
            }
        }
        Ok(())
    }

    /// True when `v` starts at a 16-byte aligned address ([`cudnn::CUDNN_ALIGN`]).
    fn cudnn_aligned<V: DevicePtr<f32>>(&self, v: &V) -> bool {
        let (p, _sync) = v.device_ptr(self.gpu.stream());
        cudnn::cudnn_aligned(p)
    }

    /// An error naming `what` unless it is aligned for cuDNN (activations and their
    /// gradients are whole allocations: this never fails unless a caller hands a view).
    fn check_cudnn_aligned<V: DevicePtr<f32>>(&self, what: &str, v: &V) -> Result<()> {
        if self.cudnn_aligned(v) {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "{what} is not {}-byte aligned, which cuDNN needs; use --conv im2col",
                cudnn::CUDNN_ALIGN
            )))
        }
    }
}
