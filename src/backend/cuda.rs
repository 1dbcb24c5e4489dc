//! The CUDA backend: convolutions as im2col + cuBLAS SGEMM (full fp32, no TF32), every other
//! layer a kernel from `kernels/{conv,norm,layers,optim}.cu`, all on the [`Gpu`]'s stream.
//!
//! Buffers are `CudaSlice<f32>` (indices `CudaSlice<u32>`). Every wrapper checks buffer
//! lengths with the same messages as the CPU backend before launching anything. Results are
//! deterministic run to run: the kernels gather instead of using atomics, and reductions
//! have a fixed order.
use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t as Op;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::cpu::{bn_checks, check_sgd};
use super::{check_len, Backend, BnOffsets, BnParams, BnShape, ConvShape, LinearShape, PoolShape};
use crate::cuda::{Gpu, BLOCK};
use crate::error::{CudaResultExt, Error, Result};

/// Upper bound on the im2col buffer of one convolution (elements): the batch is processed in
/// chunks of samples whose columns fit.
const COL_BUDGET: usize = 1 << 26;

/// The CUDA backend on one [`Gpu`] (cheap to clone).
#[derive(Clone)]
pub struct Cuda {
    gpu: Gpu,
    blas: Arc<CudaBlas>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda").field("gpu", &self.gpu).finish()
    }
}

fn cublas_err(call: &'static str) -> impl Fn(cudarc::cublas::result::CublasError) -> Error {
    move |e| Error::Cublas {
        call,
        message: format!("{e:?}"),
    }
}

fn to_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::invalid(format!(
            "{what} = {v} exceeds the 2^31 limit of one cuBLAS call"
        ))
    })
}

/// A column-major (cuBLAS) GEMM call: `C = op(A) op(B)`, `C` m x n, `k` the inner size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ColMajorGemm {
    pub transa: bool,
    pub transb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

/// The column-major call that computes the row-major `C (m x n) = op(A) op(B)` with `A`
/// stored m x k (k x m when `ta`) and `B` k x n (n x k when `tb`), densely: a row-major
/// matrix is its transpose in column-major, so the call computes `C^T = op(B)^T op(A)^T`
/// with the operands swapped (the first operand of the call is `B`).
pub(crate) fn row_major_as_col_major(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
) -> ColMajorGemm {
    ColMajorGemm {
        transa: tb,
        transb: ta,
        m: n,
        n: m,
        k,
        lda: if tb { k.max(1) } else { n.max(1) },
        ldb: if ta { m.max(1) } else { k.max(1) },
        ldc: n.max(1),
    }
}

fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::invalid(format!("{what} = {v} does not fit 32 bits")))
}

/// Launches `$module::$name` with the given arguments (each evaluated into a local that
/// lives until the launch, then pushed by reference).
macro_rules! launch {
    ($gpu:expr, $module:literal, $name:literal, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let f = $gpu.function($module, $name)?;
        let stream = $gpu.stream();
        let mut b = stream.launch_builder(&f);
        launch!(@push b, $cfg, $name; $($arg),+);
    }};
    (@push $b:ident, $cfg:expr, $name:literal; ) => {
        // SAFETY: every call site passes the kernel's parameters in its declared order with
        // the declared widths (device addresses as u64, uint32_t as u32, uint64_t as u64,
        // float as f32, double as f64), and has checked beforehand that each buffer holds
        // every element the kernel addresses for the sizes passed. The sync guards of the
        // device pointers outlive this launch.
        unsafe { $b.launch($cfg) }.call(concat!("cuLaunchKernel(", $name, ")"))?;
    };
    (@push $b:ident, $cfg:expr, $name:literal; $head:expr $(, $tail:expr)*) => {{
        let v = $head;
        $b.arg(&v);
        launch!(@push $b, $cfg, $name; $($tail),*);
    }};
}

impl Cuda {
    /// The backend on `gpu` (creates a cuBLAS handle bound to its stream).
    pub fn new(gpu: Gpu) -> Result<Cuda> {
        let blas = CudaBlas::new(gpu.stream().clone()).map_err(cublas_err("cublasCreate"))?;
        Ok(Cuda {
            gpu,
            blas: Arc::new(blas),
        })
    }

    /// Opens GPU `ordinal` (new stream) and creates the backend on it.
    pub fn open(ordinal: usize) -> Result<Cuda> {
        Cuda::new(Gpu::new(ordinal)?)
    }

    /// The GPU this backend runs on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

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
            let stream = self.gpu.stream();
            let (xp, _gx) = buf.device_ptr(stream);
            let mut slot = counts.slice_mut(i..i + 1);
            let (cp, _gc) = slot.device_ptr_mut(stream);
            launch!(
                self.gpu,
                "layers",
                "moco_count_nonfinite_f32",
                self.elementwise(n),
                xp,
                n,
                cp
            );
        }
        self.gpu.download(&counts)
    }

    fn elementwise(&self, n: u64) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.gpu.grid_for(n, 1), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn per_channel(&self, c: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((c as u32).div_ceil(BLOCK).max(1), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Row-major `C (m x n) = alpha op(A) op(B) + beta C`; `A` is stored m x k (k x m when
    /// `ta`), `B` k x n (n x k when `tb`), all densely. cuBLAS is column-major, so this
    /// computes `C^T = op(B)^T op(A)^T`.
    #[allow(clippy::too_many_arguments)]
    fn gemm_rm<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
        &self,
        ta: bool,
        tb: bool,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        a: &A,
        b: &B,
        beta: f32,
        c_buf: &mut C,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        check_len("gemm A", a.len(), 0, m * k)?;
        check_len("gemm B", b.len(), 0, k * n)?;
        check_len("gemm C", c_buf.len(), 0, m * n)?;
        let c = row_major_as_col_major(ta, tb, m, n, k);
        let cfg = GemmConfig {
            transa: if c.transa {
                Op::CUBLAS_OP_T
            } else {
                Op::CUBLAS_OP_N
            },
            transb: if c.transb {
                Op::CUBLAS_OP_T
            } else {
                Op::CUBLAS_OP_N
            },
            m: to_i32(c.m, "n")?,
            n: to_i32(c.n, "m")?,
            k: to_i32(c.k, "k")?,
            alpha,
            lda: to_i32(c.lda, "lda")?,
            ldb: to_i32(c.ldb, "ldb")?,
            beta,
            ldc: to_i32(c.ldc, "ldc")?,
        };
        // SAFETY: the checks above prove A, B and C hold m k, k n and m n elements, which is
        // what the column-major call with these dimensions and leading dimensions reads and
        // writes; C is a unique borrow, so it does not alias A or B.
        unsafe { self.blas.gemm(cfg, b, a, c_buf) }.map_err(cublas_err("cublasSgemm"))
    }

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
        check_len("im2col x", x.len(), n0 * xs, m * xs)?;
        check_len("im2col col", col.len(), 0, need)?;
        let stream = self.gpu.stream();
        let (xp, _gx) = x.device_ptr(stream);
        let (cp, _gc) = col.device_ptr_mut(stream);
        let xp = xp + (n0 * xs * 4) as u64;
        launch!(
            self.gpu,
            "conv",
            "moco_im2col_f32",
            self.elementwise(need as u64),
            xp,
            cp,
            u32_of(m, "batch chunk")?,
            u32_of(s.cin, "cin")?,
            u32_of(s.h, "h")?,
            u32_of(s.w, "w")?,
            u32_of(s.k, "k")?,
            u32_of(s.stride, "stride")?,
            u32_of(s.pad, "pad")?,
            u32_of(s.ho, "ho")?,
            u32_of(s.wo, "wo")?
        );
        Ok(())
    }

    /// dst[b][a][p] = src[a][b][p] for src at element offset `src_off`, dst at `dst_off`.
    #[allow(clippy::too_many_arguments)]
    fn permute01(
        &self,
        src: &CudaSlice<f32>,
        src_off: usize,
        dst: &mut CudaSlice<f32>,
        dst_off: usize,
        a: usize,
        b: usize,
        p: usize,
    ) -> Result<()> {
        let total = a * b * p;
        check_len("permute src", src.len(), src_off, total)?;
        check_len("permute dst", dst.len(), dst_off, total)?;
        let stream = self.gpu.stream();
        let (sp, _gs) = src.device_ptr(stream);
        let (dp, _gd) = dst.device_ptr_mut(stream);
        let sp = sp + (src_off * 4) as u64;
        let dp = dp + (dst_off * 4) as u64;
        launch!(
            self.gpu,
            "conv",
            "moco_permute01_f32",
            self.elementwise(total as u64),
            sp,
            dp,
            a as u64,
            b as u64,
            p as u64
        );
        Ok(())
    }

    /// Samples per im2col chunk.
    fn conv_chunk(s: &ConvShape) -> usize {
        let per = (s.cin * s.k * s.k * s.ho * s.wo)
            .max(s.cout * s.ho * s.wo)
            .max(1);
        (COL_BUDGET / per).clamp(1, s.n)
    }

    fn ptr_at<'a>(
        buf: &'a CudaSlice<f32>,
        stream: &'a Arc<cudarc::driver::CudaStream>,
        off: usize,
    ) -> (u64, impl Drop + 'a) {
        let (p, g) = buf.device_ptr(stream);
        (p + (off * 4) as u64, g)
    }
}

impl Backend for Cuda {
    type Buf = CudaSlice<f32>;
    type Idx = CudaSlice<u32>;

    fn name(&self) -> String {
        format!("cuda:{}", self.gpu.ordinal())
    }
    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.gpu.zeros(n)
    }
    fn zeros_idx(&self, n: usize) -> Result<CudaSlice<u32>> {
        self.gpu.zeros(n)
    }
    fn upload_f32(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        self.gpu.upload(host)
    }
    fn download_f32(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.gpu.download(buf)
    }
    fn write_f32(&self, buf: &mut CudaSlice<f32>, off: usize, src: &[f32]) -> Result<()> {
        check_len("write_f32", buf.len(), off, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        let mut view = buf.slice_mut(off..off + src.len());
        self.gpu
            .stream()
            .memcpy_htod(src, &mut view)
            .call("cuMemcpyHtoDAsync")?;
        // The host slice is borrowed only for this call: wait for the copy.
        self.gpu.synchronize()
    }
    fn len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }
    fn fill_zero(&self, buf: &mut CudaSlice<f32>) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.gpu.stream().memset_zeros(buf).call("cuMemsetD8Async")
    }
    fn copy(&self, buf: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        self.gpu.stream().clone_dtod(buf).call("cuMemcpyDtoDAsync")
    }

    fn copy_into(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>) -> Result<()> {
        super::check_copy_len(src.len(), dst.len())?;
        self.gpu
            .stream()
            .memcpy_dtod(src, dst)
            .call("cuMemcpyDtoDAsync")
    }

    fn conv2d_forward(
        &self,
        s: &ConvShape,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        w_off: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_len("conv2d x", x.len(), 0, s.x_len())?;
        check_len("conv2d weight", w.len(), w_off, s.w_len())?;
        check_len("conv2d y", y.len(), 0, s.y_len())?;
        let (hwo, ckk, ys) = (s.ho * s.wo, s.cin * s.k * s.k, s.cout * s.ho * s.wo);
        let nb = Self::conv_chunk(s);
        let mut col = self.gpu.zeros::<f32>(ckk * nb * hwo)?;
        let mut yt = self.gpu.zeros::<f32>(s.cout * nb * hwo)?;
        let wv = w.slice(w_off..w_off + s.w_len());
        for n0 in (0..s.n).step_by(nb) {
            let m = nb.min(s.n - n0);
            self.im2col(s, x, n0, m, &mut col)?;
            // Yt (Cout x m HoWo) = W (Cout x CKK) col (CKK x m HoWo)
            self.gemm_rm(
                false,
                false,
                (s.cout, m * hwo, ckk),
                1.0,
                &wv,
                &col,
                0.0,
                &mut yt,
            )?;
            self.permute01(&yt, 0, y, n0 * ys, s.cout, m, hwo)?;
        }
        Ok(())
    }

    fn conv2d_backward(
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
        check_len("conv2d x", x.len(), 0, s.x_len())?;
        check_len("conv2d weight", w.len(), w_off, s.w_len())?;
        check_len("conv2d dy", dy.len(), 0, s.y_len())?;
        check_len("conv2d dw", dw.len(), dw_off, s.w_len())?;
        if let Some(dx) = &dx {
            check_len("conv2d dx", dx.len(), 0, s.x_len())?;
        }
        let (hwo, ckk, ys, xs) = (
            s.ho * s.wo,
            s.cin * s.k * s.k,
            s.cout * s.ho * s.wo,
            s.cin * s.h * s.w,
        );
        let nb = Self::conv_chunk(s);
        let mut col = self.gpu.zeros::<f32>(ckk * nb * hwo)?;
        let mut dyt = self.gpu.zeros::<f32>(s.cout * nb * hwo)?;
        let wv = w.slice(w_off..w_off + s.w_len());
        for n0 in (0..s.n).step_by(nb) {
            let m = nb.min(s.n - n0);
            // dYt (Cout x m HoWo) from dy (m x Cout x HoWo).
            self.permute01(dy, n0 * ys, &mut dyt, 0, m, s.cout, hwo)?;
            self.im2col(s, x, n0, m, &mut col)?;
            {
                // dW (Cout x CKK) += dYt (Cout x K) col^T (K x CKK), K = m HoWo.
                let mut dwv = dw.slice_mut(dw_off..dw_off + s.w_len());
                self.gemm_rm(
                    false,
                    true,
                    (s.cout, ckk, m * hwo),
                    1.0,
                    &dyt,
                    &col,
                    1.0,
                    &mut dwv,
                )?;
            }
            if let Some(dx) = dx.as_deref_mut() {
                // dcol (CKK x m HoWo) = W^T (CKK x Cout) dYt (Cout x m HoWo), into `col`.
                self.gemm_rm(
                    true,
                    false,
                    (ckk, m * hwo, s.cout),
                    1.0,
                    &wv,
                    &dyt,
                    0.0,
                    &mut col,
                )?;
                check_len("col2im dx", dx.len(), n0 * xs, m * xs)?;
                let stream = self.gpu.stream();
                let (cp, _gc) = col.device_ptr(stream);
                let (dp, _gd) = dx.device_ptr_mut(stream);
                let dp = dp + (n0 * xs * 4) as u64;
                launch!(
                    self.gpu,
                    "conv",
                    "moco_col2im_f32",
                    self.elementwise((m * xs) as u64),
                    cp,
                    dp,
                    u32_of(m, "batch chunk")?,
                    u32_of(s.cin, "cin")?,
                    u32_of(s.h, "h")?,
                    u32_of(s.w, "w")?,
                    u32_of(s.k, "k")?,
                    u32_of(s.stride, "stride")?,
                    u32_of(s.pad, "pad")?,
                    u32_of(s.ho, "ho")?,
                    u32_of(s.wo, "wo")?
                );
            }
        }
        Ok(())
    }

    fn bn_forward_train(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &CudaSlice<f32>,
        params: &CudaSlice<f32>,
        off: BnOffsets,
        running: &mut CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        mean: &mut CudaSlice<f32>,
        invstd: &mut CudaSlice<f32>,
    ) -> Result<()> {
        bn_checks(s, x.len(), params.len(), off, running.len(), y.len())?;
        let (c, g) = (s.c, s.groups);
        check_len("batchnorm mean", mean.len(), 0, g * c)?;
        check_len("batchnorm invstd", invstd.len(), 0, g * c)?;
        let (n32, c32, g32, hw) = (
            u32_of(s.n, "n")?,
            u32_of(c, "c")?,
            u32_of(g, "groups")?,
            s.hw as u64,
        );
        let mut var = self.gpu.zeros::<f32>(g * c)?;
        let stream = self.gpu.stream();
        {
            let (xp, _gx) = x.device_ptr(stream);
            let (mp, _gm) = mean.device_ptr_mut(stream);
            let (ip, _gi) = invstd.device_ptr_mut(stream);
            let (vp, _gv) = var.device_ptr_mut(stream);
            let cfg = LaunchConfig {
                grid_dim: (c32, g32, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(
                self.gpu,
                "norm",
                "moco_bn_stats_f32",
                cfg,
                xp,
                mp,
                ip,
                vp,
                n32,
                c32,
                hw,
                g32,
                hp.eps as f32
            );
        }
        {
            let (rp, _gr) = running.device_ptr_mut(stream);
            let (mp, _gm) = mean.device_ptr(stream);
            let (vp, _gv) = var.device_ptr(stream);
            let rm = rp + (off.mean * 4) as u64;
            let rv = rp + (off.var * 4) as u64;
            launch!(
                self.gpu,
                "norm",
                "moco_bn_running_f32",
                self.per_channel(c),
                rm,
                rv,
                mp,
                vp,
                c32,
                g32,
                hp.momentum
            );
        }
        let (xp, _gx) = x.device_ptr(stream);
        let (yp, _gy) = y.device_ptr_mut(stream);
        let (gp, _gg) = Self::ptr_at(params, stream, off.gamma);
        let (bp, _gb) = Self::ptr_at(params, stream, off.beta);
        let (mp, _gm) = mean.device_ptr(stream);
        let (ip, _gi) = invstd.device_ptr(stream);
        launch!(
            self.gpu,
            "norm",
            "moco_bn_apply_f32",
            self.elementwise(s.len() as u64),
            xp,
            yp,
            gp,
            bp,
            mp,
            ip,
            n32,
            c32,
            hw,
            g32
        );
        Ok(())
    }

    fn bn_forward_eval(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &CudaSlice<f32>,
        params: &CudaSlice<f32>,
        off: BnOffsets,
        running: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        bn_checks(s, x.len(), params.len(), off, running.len(), y.len())?;
        let c = s.c;
        let (n32, c32, hw) = (u32_of(s.n, "n")?, u32_of(c, "c")?, s.hw as u64);
        let mut mean = self.gpu.zeros::<f32>(c)?;
        let mut invstd = self.gpu.zeros::<f32>(c)?;
        self.eval_stats(hp, running, off, c, &mut mean, &mut invstd)?;
        let stream = self.gpu.stream();
        let (xp, _gx) = x.device_ptr(stream);
        let (yp, _gy) = y.device_ptr_mut(stream);
        let (gp, _gg) = Self::ptr_at(params, stream, off.gamma);
        let (bp, _gb) = Self::ptr_at(params, stream, off.beta);
        let (mp, _gm) = mean.device_ptr(stream);
        let (ip, _gi) = invstd.device_ptr(stream);
        launch!(
            self.gpu,
            "norm",
            "moco_bn_apply_f32",
            self.elementwise(s.len() as u64),
            xp,
            yp,
            gp,
            bp,
            mp,
            ip,
            n32,
            c32,
            hw,
            1u32
        );
        Ok(())
    }

    fn bn_backward_train(
        &self,
        s: &BnShape,
        x: &CudaSlice<f32>,
        params: &CudaSlice<f32>,
        off: BnOffsets,
        mean: &CudaSlice<f32>,
        invstd: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (c, g) = (s.c, s.groups);
        check_len("batchnorm x", x.len(), 0, s.len())?;
        check_len("batchnorm dy", dy.len(), 0, s.len())?;
        check_len("batchnorm dx", dx.len(), 0, s.len())?;
        check_len("batchnorm mean", mean.len(), 0, g * c)?;
        check_len("batchnorm invstd", invstd.len(), 0, g * c)?;
        for (what, o) in [("gamma", off.gamma), ("beta", off.beta)] {
            check_len(what, params.len(), o, c)?;
            check_len(what, grads.len(), o, c)?;
        }
        self.bn_backward_common(s, x, params, off, mean, invstd, dy, dx, grads, true)
    }

    fn bn_backward_eval(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &CudaSlice<f32>,
        params: &CudaSlice<f32>,
        off: BnOffsets,
        running: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
    ) -> Result<()> {
        bn_checks(s, x.len(), params.len(), off, running.len(), dx.len())?;
        check_len("batchnorm dy", dy.len(), 0, s.len())?;
        check_len("batchnorm grads", grads.len(), off.gamma.max(off.beta), s.c)?;
        let mut mean = self.gpu.zeros::<f32>(s.c)?;
        let mut invstd = self.gpu.zeros::<f32>(s.c)?;
        self.eval_stats(hp, running, off, s.c, &mut mean, &mut invstd)?;
        let s1 = BnShape { groups: 1, ..*s };
        self.bn_backward_common(&s1, x, params, off, &mean, &invstd, dy, dx, grads, false)
    }

    fn relu_forward(&self, x: &mut CudaSlice<f32>) -> Result<()> {
        let n = x.len() as u64;
        if n == 0 {
            return Ok(());
        }
        let (xp, _g) = x.device_ptr_mut(self.gpu.stream());
        launch!(
            self.gpu,
            "layers",
            "moco_relu_f32",
            self.elementwise(n),
            xp,
            n
        );
        Ok(())
    }
    fn relu_backward(&self, y: &CudaSlice<f32>, dy: &mut CudaSlice<f32>) -> Result<()> {
        check_len("relu y", y.len(), 0, dy.len())?;
        let n = dy.len() as u64;
        if n == 0 {
            return Ok(());
        }
        let stream = self.gpu.stream();
        let (yp, _gy) = y.device_ptr(stream);
        let (dp, _gd) = dy.device_ptr_mut(stream);
        launch!(
            self.gpu,
            "layers",
            "moco_relu_bwd_f32",
            self.elementwise(n),
            yp,
            dp,
            n
        );
        Ok(())
    }
    fn add_assign(&self, a: &mut CudaSlice<f32>, b: &CudaSlice<f32>) -> Result<()> {
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
        let stream = self.gpu.stream();
        let (ap, _ga) = a.device_ptr_mut(stream);
        let (bp, _gb) = b.device_ptr(stream);
        launch!(
            self.gpu,
            "layers",
            "moco_add_f32",
            self.elementwise(n),
            ap,
            bp,
            n
        );
        Ok(())
    }

    fn maxpool_forward(
        &self,
        s: &PoolShape,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        idx: &mut CudaSlice<u32>,
    ) -> Result<()> {
        let (hw, hwo) = (s.h * s.w, s.ho * s.wo);
        check_len("maxpool x", x.len(), 0, s.planes * hw)?;
        check_len("maxpool y", y.len(), 0, s.planes * hwo)?;
        check_len("maxpool idx", idx.len(), 0, s.planes * hwo)?;
        let stream = self.gpu.stream();
        let (xp, _gx) = x.device_ptr(stream);
        let (yp, _gy) = y.device_ptr_mut(stream);
        let (ip, _gi) = idx.device_ptr_mut(stream);
        launch!(
            self.gpu,
            "layers",
            "moco_maxpool_f32",
            self.elementwise((s.planes * hwo) as u64),
            xp,
            yp,
            ip,
            s.planes as u64,
            u32_of(s.h, "h")?,
            u32_of(s.w, "w")?,
            u32_of(s.k, "k")?,
            u32_of(s.stride, "stride")?,
            u32_of(s.pad, "pad")?,
            u32_of(s.ho, "ho")?,
            u32_of(s.wo, "wo")?
        );
        Ok(())
    }
    fn maxpool_backward(
        &self,
        s: &PoolShape,
        dy: &CudaSlice<f32>,
        idx: &CudaSlice<u32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (hw, hwo) = (s.h * s.w, s.ho * s.wo);
        check_len("maxpool dy", dy.len(), 0, s.planes * hwo)?;
        check_len("maxpool idx", idx.len(), 0, s.planes * hwo)?;
        check_len("maxpool dx", dx.len(), 0, s.planes * hw)?;
        let stream = self.gpu.stream();
        let (dyp, _gy) = dy.device_ptr(stream);
        let (ip, _gi) = idx.device_ptr(stream);
        let (dxp, _gx) = dx.device_ptr_mut(stream);
        launch!(
            self.gpu,
            "layers",
            "moco_maxpool_bwd_f32",
            self.elementwise((s.planes * hw) as u64),
            dyp,
            ip,
            dxp,
            s.planes as u64,
            u32_of(s.h, "h")?,
            u32_of(s.w, "w")?,
            u32_of(s.k, "k")?,
            u32_of(s.stride, "stride")?,
            u32_of(s.pad, "pad")?,
            u32_of(s.ho, "ho")?,
            u32_of(s.wo, "wo")?
        );
        Ok(())
    }
    fn avgpool_forward(
        &self,
        planes: usize,
        hw: usize,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_len("avgpool x", x.len(), 0, planes * hw)?;
        check_len("avgpool y", y.len(), 0, planes)?;
        if hw == 0 {
            return Err(Error::invalid("avgpool: empty spatial size"));
        }
        let stream = self.gpu.stream();
        let (xp, _gx) = x.device_ptr(stream);
        let (yp, _gy) = y.device_ptr_mut(stream);
        launch!(
            self.gpu,
            "layers",
            "moco_avgpool_f32",
            self.elementwise(planes as u64 * 32),
            xp,
            yp,
            planes as u64,
            hw as u64
        );
        Ok(())
    }
    fn avgpool_backward(
        &self,
        planes: usize,
        hw: usize,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_len("avgpool dy", dy.len(), 0, planes)?;
        check_len("avgpool dx", dx.len(), 0, planes * hw)?;
        if hw == 0 {
            return Err(Error::invalid("avgpool: empty spatial size"));
        }
        let stream = self.gpu.stream();
        let (dyp, _gy) = dy.device_ptr(stream);
        let (dxp, _gx) = dx.device_ptr_mut(stream);
        launch!(
            self.gpu,
            "layers",
            "moco_avgpool_bwd_f32",
            self.elementwise((planes * hw) as u64),
            dyp,
            dxp,
            planes as u64,
            hw as u64
        );
        Ok(())
    }

    fn linear_forward(
        &self,
        s: &LinearShape,
        x: &CudaSlice<f32>,
        params: &CudaSlice<f32>,
        w_off: usize,
        b_off: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_len("linear x", x.len(), 0, s.n * s.fin)?;
        check_len("linear weight", params.len(), w_off, s.fout * s.fin)?;
        check_len("linear bias", params.len(), b_off, s.fout)?;
        check_len("linear y", y.len(), 0, s.n * s.fout)?;
        {
            let stream = self.gpu.stream();
            let (yp, _gy) = y.device_ptr_mut(stream);
            let (bp, _gb) = Self::ptr_at(params, stream, b_off);
            launch!(
                self.gpu,
                "layers",
                "moco_bias_rows_f32",
                self.elementwise((s.n * s.fout) as u64),
                yp,
                bp,
                s.n as u64,
                s.fout as u64
            );
        }
        let wv = params.slice(w_off..w_off + s.fout * s.fin);
        let xv = x.slice(0..s.n * s.fin);
        let mut yv = y.slice_mut(0..s.n * s.fout);
        // y (N x OUT) += x (N x IN) W^T (IN x OUT)
        self.gemm_rm(
            false,
            true,
            (s.n, s.fout, s.fin),
            1.0,
            &xv,
            &wv,
            1.0,
            &mut yv,
        )
    }

    fn linear_backward(
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
        check_len("linear x", x.len(), 0, s.n * s.fin)?;
        check_len("linear weight", params.len(), w_off, s.fout * s.fin)?;
        check_len("linear weight grad", grads.len(), w_off, s.fout * s.fin)?;
        check_len("linear bias grad", grads.len(), b_off, s.fout)?;
        check_len("linear dy", dy.len(), 0, s.n * s.fout)?;
        let wv = params.slice(w_off..w_off + s.fout * s.fin);
        let dyv = dy.slice(0..s.n * s.fout);
        let xv = x.slice(0..s.n * s.fin);
        if let Some(dx) = dx {
            check_len("linear dx", dx.len(), 0, s.n * s.fin)?;
            let mut dxv = dx.slice_mut(0..s.n * s.fin);
            // dx (N x IN) = dy (N x OUT) W (OUT x IN)
            self.gemm_rm(
                false,
                false,
                (s.n, s.fin, s.fout),
                1.0,
                &dyv,
                &wv,
                0.0,
                &mut dxv,
            )?;
        }
        {
            let mut gw = grads.slice_mut(w_off..w_off + s.fout * s.fin);
            // dW (OUT x IN) += dy^T (OUT x N) x (N x IN)
            self.gemm_rm(
                true,
                false,
                (s.fout, s.fin, s.n),
                1.0,
                &dyv,
                &xv,
                1.0,
                &mut gw,
            )?;
        }
        let stream = self.gpu.stream();
        let (dyp, _gy) = dy.device_ptr(stream);
        let (gp, _gg) = grads.device_ptr_mut(stream);
        let gb = gp + (b_off * 4) as u64;
        launch!(
            self.gpu,
            "layers",
            "moco_col_sum_acc_f32",
            self.per_channel(s.fout),
            dyp,
            gb,
            s.n as u64,
            s.fout as u64
        );
        Ok(())
    }

    fn sgd_step(
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
        let stream = self.gpu.stream();
        let (pp, _gp) = params.device_ptr_mut(stream);
        let (gp, _gg) = grads.device_ptr(stream);
        let (bp, _gb) = momentum_buf.device_ptr_mut(stream);
        launch!(
            self.gpu,
            "optim",
            "moco_sgd_f32",
            self.elementwise(n),
            pp,
            gp,
            bp,
            n,
            lr as f32,
            momentum as f32,
            weight_decay as f32
        );
        Ok(())
    }
}

impl Cuda {
    fn eval_stats(
        &self,
        hp: BnParams,
        running: &CudaSlice<f32>,
        off: BnOffsets,
        c: usize,
        mean: &mut CudaSlice<f32>,
        invstd: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_len("batchnorm running_mean", running.len(), off.mean, c)?;
        check_len("batchnorm running_var", running.len(), off.var, c)?;
        check_len("batchnorm mean", mean.len(), 0, c)?;
        check_len("batchnorm invstd", invstd.len(), 0, c)?;
        let stream = self.gpu.stream();
        let (rm, _g1) = Self::ptr_at(running, stream, off.mean);
        let (rv, _g2) = Self::ptr_at(running, stream, off.var);
        let (mp, _g3) = mean.device_ptr_mut(stream);
        let (ip, _g4) = invstd.device_ptr_mut(stream);
        launch!(
            self.gpu,
            "norm",
            "moco_bn_eval_stats_f32",
            self.per_channel(c),
            rm,
            rv,
            mp,
            ip,
            u32_of(c, "c")?,
            hp.eps as f32
        );
        Ok(())
    }

    /// Shared backward: per-(group, channel) sums, parameter gradients, dx. Lengths checked
    /// by the callers.
    #[allow(clippy::too_many_arguments)]
    fn bn_backward_common(
        &self,
        s: &BnShape,
        x: &CudaSlice<f32>,
        params: &CudaSlice<f32>,
        off: BnOffsets,
        mean: &CudaSlice<f32>,
        invstd: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
        train: bool,
    ) -> Result<()> {
        let (c, g) = (s.c, s.groups);
        let (n32, c32, g32, hw) = (
            u32_of(s.n, "n")?,
            u32_of(c, "c")?,
            u32_of(g, "groups")?,
            s.hw as u64,
        );
        let mut sums = self.gpu.zeros::<f32>(2 * g * c)?;
        let stream = self.gpu.stream();
        {
            let (xp, _gx) = x.device_ptr(stream);
            let (dyp, _gy) = dy.device_ptr(stream);
            let (mp, _gm) = mean.device_ptr(stream);
            let (ip, _gi) = invstd.device_ptr(stream);
            let (sp, _gs) = sums.device_ptr_mut(stream);
            let cfg = LaunchConfig {
                grid_dim: (c32, g32, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(
                self.gpu,
                "norm",
                "moco_bn_bwd_reduce_f32",
                cfg,
                xp,
                dyp,
                mp,
                ip,
                sp,
                n32,
                c32,
                hw,
                g32
            );
        }
        {
            let (sp, _gs) = sums.device_ptr(stream);
            let (gp, _gg) = grads.device_ptr_mut(stream);
            let dgamma = gp + (off.gamma * 4) as u64;
            let dbeta = gp + (off.beta * 4) as u64;
            launch!(
                self.gpu,
                "norm",
                "moco_bn_bwd_params_f32",
                self.per_channel(c),
                sp,
                dgamma,
                dbeta,
                c32,
                g32
            );
        }
        let (xp, _gx) = x.device_ptr(stream);
        let (dyp, _gy) = dy.device_ptr(stream);
        let (dxp, _gd) = dx.device_ptr_mut(stream);
        let (gp, _gg) = Self::ptr_at(params, stream, off.gamma);
        let (mp, _gm) = mean.device_ptr(stream);
        let (ip, _gi) = invstd.device_ptr(stream);
        let (sp, _gs) = sums.device_ptr(stream);
        launch!(
            self.gpu,
            "norm",
            "moco_bn_bwd_dx_f32",
            self.elementwise(s.len() as u64),
            xp,
            dyp,
            dxp,
            gp,
            mp,
            ip,
            sp,
            n32,
            c32,
            hw,
            g32,
            u32::from(train)
        );
        Ok(())
    }
}

#[cfg(test)]
// The host transliterations keep the kernels' index loops as written.
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::row_major_as_col_major;
    use crate::backend::ConvShape;

    /// cuBLAS semantics on the host: column-major, `C = op(A) op(B)`.
    #[allow(clippy::too_many_arguments)]
    fn col_major_gemm(
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: &[f64],
        lda: usize,
        b: &[f64],
        ldb: usize,
        c: &mut [f64],
        ldc: usize,
    ) {
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0;
                for l in 0..k {
                    let av = if ta { a[l + i * lda] } else { a[i + l * lda] };
                    let bv = if tb { b[j + l * ldb] } else { b[l + j * ldb] };
                    acc += av * bv;
                }
                c[i + j * ldc] = acc;
            }
        }
    }

    #[test]
    fn row_major_mapping_matches_a_plain_product() {
        let (m, n, k) = (3usize, 5usize, 4usize);
        for ta in [false, true] {
            for tb in [false, true] {
                // Row-major operands as stored.
                let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
                let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.91).cos()).collect();
                let aat = |i: usize, l: usize| if ta { a[l * m + i] } else { a[i * k + l] };
                let bat = |l: usize, j: usize| if tb { b[j * k + l] } else { b[l * n + j] };
                let mut want = vec![0.0; m * n];
                for i in 0..m {
                    for j in 0..n {
                        want[i * n + j] = (0..k).map(|l| aat(i, l) * bat(l, j)).sum();
                    }
                }
                let c = row_major_as_col_major(ta, tb, m, n, k);
                let mut got = vec![0.0; m * n];
                col_major_gemm(
                    c.transa, c.transb, c.m, c.n, c.k, &b, c.lda, &a, c.ldb, &mut got, c.ldc,
                );
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 1e-12,
                        "ta={ta} tb={tb}: {got:?} vs {want:?}"
                    );
                }
            }
        }
    }

    // Host transliterations of kernels/conv.cu (same index arithmetic), to check the GPU
    // convolution algorithm (layouts, permutes, GEMM shapes) against the reference.
    fn im2col_k(s: &ConvShape, x: &[f64], col: &mut [f64], nb: usize, n0: usize) {
        let xs = s.cin * s.h * s.w;
        let hwo = s.ho * s.wo;
        let total = s.cin * s.k * s.k * nb * hwo;
        for i in 0..total {
            let p = i % hwo;
            let t = i / hwo;
            let n = t % nb;
            let r = t / nb;
            let kx = r % s.k;
            let ky = (r / s.k) % s.k;
            let ci = r / (s.k * s.k);
            let (oy, ox) = ((p / s.wo) as i64, (p % s.wo) as i64);
            let iy = oy * s.stride as i64 - s.pad as i64 + ky as i64;
            let ix = ox * s.stride as i64 - s.pad as i64 + kx as i64;
            col[i] = if iy >= 0 && ix >= 0 && iy < s.h as i64 && ix < s.w as i64 {
                x[n0 * xs + ((n * s.cin + ci) * s.h + iy as usize) * s.w + ix as usize]
            } else {
                0.0
            };
        }
    }

    fn col2im_k(s: &ConvShape, dcol: &[f64], dx: &mut [f64], nb: usize, n0: usize) {
        let xs = s.cin * s.h * s.w;
        let hwo = s.ho * s.wo;
        for i in 0..nb * xs {
            let ix = (i % s.w) as i64;
            let iy = ((i / s.w) % s.h) as i64;
            let ci = (i / (s.h * s.w)) % s.cin;
            let n = i / xs;
            let mut acc = 0.0;
            for ky in 0..s.k {
                let ty = iy + s.pad as i64 - ky as i64;
                if ty < 0 || ty % s.stride as i64 != 0 {
                    continue;
                }
                let oy = ty / s.stride as i64;
                if oy >= s.ho as i64 {
                    continue;
                }
                for kx in 0..s.k {
                    let tx = ix + s.pad as i64 - kx as i64;
                    if tx < 0 || tx % s.stride as i64 != 0 {
                        continue;
                    }
                    let ox = tx / s.stride as i64;
                    if ox >= s.wo as i64 {
                        continue;
                    }
                    let r = (ci * s.k + ky) * s.k + kx;
                    acc += dcol[(r * nb + n) * hwo + oy as usize * s.wo + ox as usize];
                }
            }
            dx[n0 * xs + i] = acc;
        }
    }

    fn permute01_k(src: &[f64], dst: &mut [f64], a: usize, b: usize, p: usize) {
        for i in 0..a * b * p {
            let pp = i % p;
            let t = i / p;
            let ai = t % a;
            let bi = t / a;
            dst[i] = src[(ai * b + bi) * p + pp];
        }
    }

    /// `Cuda::gemm_rm` on the host (beta 0 or 1).
    #[allow(clippy::too_many_arguments)]
    fn gemm_rm_h(
        ta: bool,
        tb: bool,
        (m, n, k): (usize, usize, usize),
        a: &[f64],
        b: &[f64],
        beta: f64,
        c: &mut [f64],
    ) {
        let g = row_major_as_col_major(ta, tb, m, n, k);
        let mut t = vec![0.0; m * n];
        col_major_gemm(
            g.transa, g.transb, g.m, g.n, g.k, b, g.lda, a, g.ldb, &mut t, g.ldc,
        );
        for (c, t) in c[..m * n].iter_mut().zip(t) {
            *c = beta * *c + t;
        }
    }

    #[test]
    fn gpu_convolution_algorithm_matches_reference_on_the_host() {
        use crate::model::reference;
        for &(n, cin, hw, cout, k, st, p, nb) in &[
            (
                3usize,
                2usize,
                (5usize, 6usize),
                4usize,
                3usize,
                1usize,
                1usize,
                2usize,
            ),
            (5, 3, (9, 7), 2, 3, 2, 1, 2),
            (4, 2, (6, 6), 3, 1, 2, 0, 3),
            (2, 2, (11, 11), 3, 7, 2, 3, 1),
        ] {
            let s = ConvShape::new(n, cin, hw, cout, k, st, p).unwrap();
            let x: Vec<f64> = (0..s.x_len()).map(|i| (i as f64 * 0.71).sin()).collect();
            let w: Vec<f64> = (0..s.w_len()).map(|i| (i as f64 * 0.53).cos()).collect();
            let dy: Vec<f64> = (0..s.y_len()).map(|i| (i as f64 * 0.29).sin()).collect();
            let (hwo, ckk, ys) = (s.ho * s.wo, s.cin * s.k * s.k, s.cout * s.ho * s.wo);
            let mut y = vec![f64::NAN; s.y_len()];
            let mut dx = vec![f64::NAN; s.x_len()];
            let mut dw = vec![0.0; s.w_len()];
            for n0 in (0..n).step_by(nb) {
                let m = nb.min(n - n0);
                let mut col = vec![0.0; ckk * m * hwo];
                let mut yt = vec![0.0; cout * m * hwo];
                im2col_k(&s, &x, &mut col, m, n0);
                gemm_rm_h(false, false, (cout, m * hwo, ckk), &w, &col, 0.0, &mut yt);
                permute01_k(&yt, &mut y[n0 * ys..], cout, m, hwo);
                let mut dyt = vec![0.0; cout * m * hwo];
                permute01_k(&dy[n0 * ys..], &mut dyt, m, cout, hwo);
                gemm_rm_h(false, true, (cout, ckk, m * hwo), &dyt, &col, 1.0, &mut dw);
                gemm_rm_h(true, false, (ckk, m * hwo, cout), &w, &dyt, 0.0, &mut col);
                col2im_k(&s, &col, &mut dx, m, n0);
            }
            let yr = reference::conv2d(&s, &x, &w);
            let (dxr, dwr) = reference::conv2d_backward(&s, &x, &w, &dy);
            for (what, got, want) in [("y", &y, &yr), ("dx", &dx, &dxr), ("dw", &dw, &dwr)] {
                for (g, w) in got.iter().zip(want.iter()) {
                    assert!((g - w).abs() < 1e-9, "{what} {s:?}: {g} vs {w}");
                }
            }
        }
    }

    /// kernels/layers.cu's max-pool backward window arithmetic (C integer division truncates
    /// toward zero, as Rust's does) against the CPU backend's scatter.
    #[test]
    fn gpu_maxpool_backward_windows_match_cpu_on_the_host() {
        use crate::backend::{Backend, Cpu, PoolShape};
        for &(planes, h, w, k, st, pad) in &[
            (2usize, 7usize, 6usize, 3usize, 2usize, 1usize),
            (1, 8, 8, 3, 2, 1),
            (2, 5, 5, 2, 2, 0),
            (1, 9, 4, 3, 1, 1),
            (1, 1, 1, 3, 2, 1),
        ] {
            let s = PoolShape::new(planes, (h, w), k, st, pad).unwrap();
            let x: Vec<f64> = (0..planes * h * w)
                .map(|i| (i as f64 * 1.37).sin())
                .collect();
            let no = planes * s.ho * s.wo;
            let (mut y, mut idx) = (vec![0.0; no], vec![0u32; no]);
            let cpu = Cpu::<f64>::new();
            cpu.maxpool_forward(&s, &x, &mut y, &mut idx).unwrap();
            let dy: Vec<f64> = (0..no).map(|i| 1.0 + i as f64).collect();
            let mut want = vec![0.0; x.len()];
            cpu.maxpool_backward(&s, &dy, &idx, &mut want).unwrap();
            let (k, st, pad) = (k as i64, st as i64, pad as i64);
            let (ho, wo) = (s.ho as i64, s.wo as i64);
            for i in 0..planes * h * w {
                let ix = (i % w) as i64;
                let iy = ((i / w) % h) as i64;
                let p = i / (h * w);
                let j = (iy * w as i64 + ix) as u32;
                let oy0 = 0.max((iy + pad - k + st) / st);
                let oy1 = (ho - 1).min((iy + pad) / st);
                let ox0 = 0.max((ix + pad - k + st) / st);
                let ox1 = (wo - 1).min((ix + pad) / st);
                let mut acc = 0.0;
                for oy in oy0..=oy1 {
                    for ox in ox0..=ox1 {
                        let o = (p as i64 * ho + oy) * wo + ox;
                        if idx[o as usize] == j {
                            acc += dy[o as usize];
                        }
                    }
                }
                assert_eq!(acc, want[i], "{s:?} element {i}");
            }
        }
    }
}
