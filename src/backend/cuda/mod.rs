//! The CUDA backend: convolutions as im2col + cuBLAS SGEMM or through cuDNN (full fp32
//! unless `tf32`), every other layer a kernel from `kernels/{conv,norm,layers,optim}.cu`,
//! all on the [`Gpu`]'s stream.
//!
//! One module per kernel file, as the CPU twin: `conv` (im2col, col2im, permutes), `norm`
//! (BatchNorm), `layers` (ReLU, add, pools, linear, the non-finite count), `optim` (SGD)
//! and `gemm` (the crate's one SGEMM wrapper). The [`Backend`] impl here delegates to
//! them, and to [`crate::ops`] for the MoCo operations.
//!
//! Buffers are `CudaSlice<f32>` (indices `CudaSlice<u32>`). Every wrapper checks lengths
//! through the shape types (the same messages as the CPU backend) before anything is
//! launched, takes views of its buffers (a range out of bounds is an error, never a
//! panic) and passes them straight to the kernel through the crate's `launch!` macro: no
//! raw addresses or byte offsets. With im2col, results are deterministic run to run: the
//! kernels gather instead of using atomics, and reductions have a fixed order. cuDNN's
//! algorithms are deterministic ones too, but chosen by timing, so two runs may pick
//! different algorithms and differ in the last bits.
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{Backend, BnOffsets, BnParams, BnShape, ConvShape, LinearShape, PoolShape};
use crate::cuda::abi::{MocoBnShape, MocoConvShape, MocoPoolShape};
use crate::cuda::{view_mut, Gpu, BLOCK};
use crate::error::{CudaResultExt, Error, Result};
use crate::ops::{self, ContrastShape, InfoNceImpl, InfoNceStats};

mod conv;
mod cudnn;
pub(crate) mod gemm;
mod layers;
mod norm;
mod optim;
#[cfg(test)]
mod tests;

pub use cudnn::{cudnn_present, cudnn_version, ConvBackend};

/// How a [`Cuda`] backend computes: its convolution backend and whether TF32 tensor cores
/// may be used (for convolutions and every cuBLAS GEMM on the GPU, as PyTorch's
/// `allow_tf32` flags). The default is im2col in real fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CudaOptions {
    /// Convolution backend.
    pub conv: ConvBackend,
    /// TF32 tensor cores for convolutions and GEMMs.
    pub tf32: bool,
}

use crate::cuda::Slot;

/// Grow-only scratch buffers, reused from call to call so that a step allocates nothing
/// after the first: every operation writes each scratch element it later reads, so none
/// is zeroed. One mutex per group, always taken in the order conv, eval, bn.
#[derive(Default)]
struct Scratch {
    /// im2col columns, and the channel-major output or gradient of a convolution chunk.
    conv: Mutex<(Slot, Slot)>,
    /// Inference-mode mean and 1 / std of a BatchNorm.
    eval: Mutex<(Slot, Slot)>,
    /// A BatchNorm's batch variance (forward) or per-(group, channel) sums (backward).
    bn: Mutex<Slot>,
    /// 16-byte aligned copies of a cuDNN convolution's weight and weight gradient when the
    /// caller's are not aligned (`cudnn::CUDNN_ALIGN`).
    stage: Mutex<(Slot, Slot)>,
}

/// The CUDA backend on one [`Gpu`] (cheap to clone).
#[derive(Clone)]
pub struct Cuda {
    gpu: Gpu,
    scratch: Arc<Scratch>,
    /// cuDNN's state when convolutions run through it, else im2col + SGEMM.
    cudnn: Option<Arc<Mutex<cudnn::Cudnn>>>,
    /// Why [`ConvBackend::Auto`] fell back to im2col, if it did.
    fallback: Option<String>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("gpu", &self.gpu)
            .field("conv", &self.conv_backend())
            .finish()
    }
}

/// `v` as a kernel's `uint32_t`, or an error naming it.
fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::invalid(format!("{what} = {v} does not fit 32 bits")))
}

/// The kernels' view of a convolution over a chunk of `nb` samples (`moco_abi.h`).
fn conv_abi(s: &ConvShape, nb: usize) -> Result<MocoConvShape> {
    Ok(MocoConvShape {
        nb: u32_of(nb, "batch chunk")?,
        cin: u32_of(s.cin, "cin")?,
        h: u32_of(s.h, "h")?,
        w: u32_of(s.w, "w")?,
        k: u32_of(s.k, "k")?,
        stride: u32_of(s.stride, "stride")?,
        pad: u32_of(s.pad, "pad")?,
        ho: u32_of(s.ho, "ho")?,
        wo: u32_of(s.wo, "wo")?,
    })
}

/// The kernels' view of a max-pool.
fn pool_abi(s: &PoolShape) -> Result<MocoPoolShape> {
    Ok(MocoPoolShape {
        planes: s.planes as u64,
        h: u32_of(s.h, "h")?,
        w: u32_of(s.w, "w")?,
        k: u32_of(s.k, "k")?,
        stride: u32_of(s.stride, "stride")?,
        pad: u32_of(s.pad, "pad")?,
        ho: u32_of(s.ho, "ho")?,
        wo: u32_of(s.wo, "wo")?,
        reserved: 0,
    })
}

/// The kernels' view of a BatchNorm.
fn bn_abi(s: &BnShape) -> Result<MocoBnShape> {
    Ok(MocoBnShape {
        n: u32_of(s.n, "n")?,
        c: u32_of(s.c, "c")?,
        hw: s.hw as u64,
        groups: u32_of(s.groups, "groups")?,
        reserved: 0,
    })
}

impl Cuda {
    /// The backend on `gpu` with im2col + SGEMM convolutions (see [`Cuda::with_conv`]);
    /// creates the GPU's cuBLAS handle now, so a missing cuBLAS is an error here rather
    /// than in the first convolution.
    pub fn new(gpu: Gpu) -> Result<Cuda> {
        Cuda::with_conv(gpu, ConvBackend::Im2col)
    }

    /// The backend on `gpu` with the given convolution backend. [`ConvBackend::Cudnn`] is an
    /// error when cuDNN cannot be loaded; [`ConvBackend::Auto`] then falls back to im2col
    /// and says why in [`Cuda::conv_fallback`].
    pub fn with_conv(gpu: Gpu, conv: ConvBackend) -> Result<Cuda> {
        Cuda::with_options(
            gpu,
            CudaOptions {
                conv,
                ..CudaOptions::default()
            },
        )
    }

    /// The backend on `gpu` with `opts`. TF32 is a setting of the GPU's shared cuBLAS
    /// handle ([`Gpu::set_tf32`]), so it applies to every GEMM on this [`Gpu`] and its
    /// clones (the contrastive logits included); a backend asking for the other setting
    /// than an earlier one on the same `Gpu` is an error (open a separate `Gpu`).
    pub fn with_options(gpu: Gpu, opts: CudaOptions) -> Result<Cuda> {
        gpu.blas()?;
        let tf32 = opts.tf32;
        let (cudnn, fallback) = match opts.conv {
            ConvBackend::Im2col => (None, None),
            ConvBackend::Cudnn => (Some(cudnn::Cudnn::new(&gpu, tf32)?), None),
            ConvBackend::Auto => match cudnn::Cudnn::new(&gpu, tf32) {
                Ok(c) => (Some(c), None),
                Err(e) => (None, Some(format!("{e}; convolutions use im2col + SGEMM"))),
            },
        };
        gpu.set_tf32(tf32)?;
        Ok(Cuda {
            gpu,
            scratch: Arc::new(Scratch::default()),
            cudnn: cudnn.map(|c| Arc::new(Mutex::new(c))),
            fallback,
        })
    }

    /// How this backend computes convolutions: [`ConvBackend::Cudnn`] or
    /// [`ConvBackend::Im2col`].
    pub fn conv_backend(&self) -> ConvBackend {
        if self.cudnn.is_some() {
            ConvBackend::Cudnn
        } else {
            ConvBackend::Im2col
        }
    }

    /// Why [`ConvBackend::Auto`] chose im2col (cuDNN missing or failing), if it did.
    pub fn conv_fallback(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// The cuDNN version loaded, when convolutions run through it.
    pub fn cudnn_version(&self) -> Option<usize> {
        self.cudnn.as_ref().map(|_| cudnn::Cudnn::version())
    }

    /// Opens GPU `ordinal` (new stream) and creates the backend on it.
    pub fn open(ordinal: usize) -> Result<Cuda> {
        Cuda::new(Gpu::new(ordinal)?)
    }

    /// The GPU this backend runs on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// A grid-stride launch over `n` items.
    fn elementwise(&self, n: u64) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.gpu.grid_for(n, 1), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One thread per channel.
    fn per_channel(&self, c: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((c as u32).div_ceil(BLOCK).max(1), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
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
        let mut dst = view_mut("write_f32", buf, off, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        self.gpu
            .stream()
            .memcpy_htod(src, &mut dst)
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
        self.conv2d_forward_impl(s, x, w, w_off, y)
    }
    fn conv2d_backward(
        &self,
        s: &ConvShape,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        w_off: usize,
        dy: &CudaSlice<f32>,
        dx: Option<&mut CudaSlice<f32>>,
        dw: &mut CudaSlice<f32>,
        dw_off: usize,
    ) -> Result<()> {
        self.conv2d_backward_impl(s, x, w, w_off, dy, dx, dw, dw_off)
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
        self.bn_forward_train_fused_impl(
            s, hp, x, params, off, running, None, false, y, mean, invstd,
        )
    }
    fn bn_forward_train_fused(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &CudaSlice<f32>,
        params: &CudaSlice<f32>,
        off: BnOffsets,
        running: &mut CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
        relu: bool,
        y: &mut CudaSlice<f32>,
        mean: &mut CudaSlice<f32>,
        invstd: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.bn_forward_train_fused_impl(
            s, hp, x, params, off, running, residual, relu, y, mean, invstd,
        )
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
        self.bn_forward_eval_impl(s, hp, x, params, off, running, y)
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
        self.relu_bn_backward_train_impl(s, x, params, off, mean, invstd, None, dy, dx, grads)
    }
    fn relu_bn_backward_train(
        &self,
        s: &BnShape,
        x: &CudaSlice<f32>,
        params: &CudaSlice<f32>,
        off: BnOffsets,
        mean: &CudaSlice<f32>,
        invstd: &CudaSlice<f32>,
        relu_out: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.relu_bn_backward_train_impl(
            s,
            x,
            params,
            off,
            mean,
            invstd,
            Some(relu_out),
            dy,
            dx,
            grads,
        )
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
        self.bn_backward_eval_impl(s, hp, x, params, off, running, dy, dx, grads)
    }

    fn relu_forward(&self, x: &mut CudaSlice<f32>) -> Result<()> {
        self.relu_forward_impl(x)
    }
    fn relu_backward(&self, y: &CudaSlice<f32>, dy: &mut CudaSlice<f32>) -> Result<()> {
        self.relu_backward_impl(y, dy)
    }
    fn add_assign(&self, a: &mut CudaSlice<f32>, b: &CudaSlice<f32>) -> Result<()> {
        self.add_assign_impl(a, b)
    }

    fn maxpool_forward(
        &self,
        s: &PoolShape,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        idx: &mut CudaSlice<u32>,
    ) -> Result<()> {
        self.maxpool_forward_impl(s, x, y, idx)
    }
    fn maxpool_backward(
        &self,
        s: &PoolShape,
        dy: &CudaSlice<f32>,
        idx: &CudaSlice<u32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.maxpool_backward_impl(s, dy, idx, dx)
    }
    fn avgpool_forward(
        &self,
        planes: usize,
        hw: usize,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.avgpool_forward_impl(planes, hw, x, y)
    }
    fn avgpool_backward(
        &self,
        planes: usize,
        hw: usize,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.avgpool_backward_impl(planes, hw, dy, dx)
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
        self.linear_forward_impl(s, x, params, w_off, b_off, y)
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
        self.linear_backward_impl(s, x, params, w_off, b_off, dy, dx, grads)
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
        self.sgd_step_impl(params, grads, momentum_buf, lr, momentum, weight_decay)
    }

    type Ctx = ops::Contrast;
    fn contrast_ctx(&self) -> Result<ops::Contrast> {
        Ok(ops::Contrast::new(self.gpu()))
    }
    fn momentum(&self, key: &mut Self::Buf, query: &Self::Buf, m: f64) -> Result<()> {
        ops::momentum::check_momentum_f64(m)?;
        ops::momentum_update(self.gpu(), key, query, m as f32)
    }
    fn momentum_multi(&self, pairs: &mut [(&mut Self::Buf, &Self::Buf)], m: f64) -> Result<()> {
        ops::momentum::check_momentum_f64(m)?;
        ops::momentum_update_multi(self.gpu(), pairs, m as f32)
    }
    fn normalize(
        &self,
        ctx: &mut ops::Contrast,
        x: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<Self::Buf> {
        let mut out = self.zeros(n * c)?;
        ctx.normalize(x, &mut out, n, c)?;
        Ok(out)
    }
    fn infonce(
        &self,
        ctx: &mut ops::Contrast,
        q: &Self::Buf,
        k: &Self::Buf,
        queue: &Self::Buf,
        s: ContrastShape,
        imp: InfoNceImpl,
    ) -> Result<(InfoNceStats, Self::Buf)> {
        let mut grad = self.zeros(s.n * s.c)?;
        let stats = ctx.infonce(q, k, queue, s, &mut grad, imp)?;
        Ok((stats, grad))
    }
    fn enqueue(
        &self,
        queue: &mut Self::Buf,
        keys: &Self::Buf,
        k: usize,
        c: usize,
        ptr: usize,
    ) -> Result<usize> {
        ops::enqueue(self.gpu(), queue, keys, k, c, ptr)
    }
    fn process_group(
        &self,
        env: &crate::dist::rendezvous::DistEnv,
        timeout: std::time::Duration,
    ) -> Result<Box<dyn crate::dist::Communicator<Self>>> {
        Ok(Box::new(crate::dist::NcclComm::new(self, env, timeout)?))
    }
    fn gather_rows(&self, x: &Self::Buf, rows: &[usize], row_len: usize) -> Result<Self::Buf> {
        super::check_gather(x.len(), rows, row_len)?;
        self.gather_rows_impl(x, rows, row_len)
    }
    fn count_non_finite(&self, bufs: &[&Self::Buf]) -> Result<Vec<u64>> {
        Cuda::count_non_finite(self, bufs)
    }
    fn free_device_memory(&self) -> Result<Option<u64>> {
        let (free, _total) = self
            .gpu()
            .context()
            .mem_get_info()
            .map_err(|e| Error::cuda("cuMemGetInfo", e))?;
        Ok(Some(free as u64))
    }
}
