//! The compute backends the ResNet is written against: [`Cpu`] (the reference, generic
//! over f32/f64) and, with a GPU, [`Cuda`].
//!
//! Every operation takes whole buffers plus element offsets into them, so the model keeps
//! its parameters (and gradients) in one flat buffer each (see `docs/resnet.md`) and hands
//! a layer's slice to the backend by offset. Activations are NCHW.
//!
//! Conventions shared by every implementation:
//! * outputs named `y`/`dx` are overwritten; parameter gradients (`dw`, `dgamma`, ...) are
//!   **accumulated** (`+=`), so several backward passes can add into one gradient buffer;
//! * shapes are validated by the caller-facing shape constructors ([`ConvShape::new`], ...),
//!   and the buffer lengths by the shape types' `check_*` methods ([`ConvShape::check_forward`],
//!   ...), which every backend calls, with the same messages, before touching memory:
//!   [`Error::InvalidArgument`] instead of a panic.
use crate::error::{Error, Result};
use crate::ops::{ContrastShape, InfoNceImpl, InfoNceStats};

pub mod cpu;
pub mod cuda;

pub use cpu::{Cpu, Scalar};
pub use cuda::Cuda;

/// Shape of a 2-D convolution without bias: `x` N x Cin x H x W, `w` Cout x Cin x K x K,
/// `y` N x Cout x Ho x Wo with `Ho = (H + 2 pad - K) / stride + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvShape {
    /// Batch size N.
    pub n: usize,
    /// Input channels.
    pub cin: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub cout: usize,
    /// Square kernel size K.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub pad: usize,
    /// Output height.
    pub ho: usize,
    /// Output width.
    pub wo: usize,
}

impl ConvShape {
    /// Validates the shape and computes the output size.
    pub fn new(
        n: usize,
        cin: usize,
        (h, w): (usize, usize),
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        if n == 0 || cin == 0 || cout == 0 || k == 0 || stride == 0 {
            return Err(Error::invalid(format!(
                "conv2d: batch, channels, kernel and stride must be positive (n={n}, cin={cin}, cout={cout}, k={k}, stride={stride})"
            )));
        }
        if h + 2 * pad < k || w + 2 * pad < k {
            return Err(Error::invalid(format!(
                "conv2d: input {h}x{w} with padding {pad} is smaller than the {k}x{k} kernel; use larger images"
            )));
        }
        let ho = (h + 2 * pad - k) / stride + 1;
        let wo = (w + 2 * pad - k) / stride + 1;
        Ok(ConvShape {
            n,
            cin,
            h,
            w,
            cout,
            k,
            stride,
            pad,
            ho,
            wo,
        })
    }
    /// Elements of `x`.
    pub fn x_len(&self) -> usize {
        self.n * self.cin * self.h * self.w
    }
    /// Elements of `y`.
    pub fn y_len(&self) -> usize {
        self.n * self.cout * self.ho * self.wo
    }
    /// Elements of the weight.
    pub fn w_len(&self) -> usize {
        self.cout * self.cin * self.k * self.k
    }
    /// Checks the buffer lengths of [`Backend::conv2d_forward`]: `x`, the weight (length and
    /// offset), `y`. Every backend calls this before touching memory.
    pub fn check_forward(&self, x: usize, (w, w_off): (usize, usize), y: usize) -> Result<()> {
        check_len("conv2d x", x, 0, self.x_len())?;
        check_len("conv2d weight", w, w_off, self.w_len())?;
        check_len("conv2d y", y, 0, self.y_len())
    }
    /// Checks the buffer lengths of [`Backend::conv2d_backward`].
    pub fn check_backward(
        &self,
        x: usize,
        (w, w_off): (usize, usize),
        dy: usize,
        dx: Option<usize>,
        (dw, dw_off): (usize, usize),
    ) -> Result<()> {
        check_len("conv2d x", x, 0, self.x_len())?;
        check_len("conv2d weight", w, w_off, self.w_len())?;
        check_len("conv2d dy", dy, 0, self.y_len())?;
        check_len("conv2d dw", dw, dw_off, self.w_len())?;
        if let Some(dx) = dx {
            check_len("conv2d dx", dx, 0, self.x_len())?;
        }
        Ok(())
    }
}

/// Shape of a BatchNorm2d over `x` N x C x HW, with statistics per group of samples:
/// group `b` holds the samples `n` with `n % groups == b` (exactly what PyTorch's
/// split BatchNorm does through `x.view(-1, C * groups, H, W)`), `groups = 1` is plain
/// BatchNorm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BnShape {
    /// Batch size N.
    pub n: usize,
    /// Channels C.
    pub c: usize,
    /// Spatial size H * W (1 for a BatchNorm1d-like use).
    pub hw: usize,
    /// Number of statistic groups (shuffle-BN emulation), divides `n`.
    pub groups: usize,
}

impl BnShape {
    /// Validates: `groups` divides `n`, and each group has more than one value per channel
    /// in training (the unbiased variance needs two).
    pub fn new(n: usize, c: usize, hw: usize, groups: usize, train: bool) -> Result<Self> {
        if n == 0 || c == 0 || hw == 0 {
            return Err(Error::invalid(format!(
                "batchnorm: empty input (n={n}, c={c}, hw={hw})"
            )));
        }
        if groups == 0 || !n.is_multiple_of(groups) {
            return Err(Error::invalid(format!(
                "batchnorm: bn_splits = {groups} must divide the batch size {n}"
            )));
        }
        if train && (n / groups) * hw < 2 {
            return Err(Error::invalid(format!(
                "batchnorm: training needs more than one value per channel and group (batch {n}, bn_splits {groups}, spatial {hw}); use a larger batch or fewer splits"
            )));
        }
        Ok(BnShape { n, c, hw, groups })
    }
    /// Elements of `x`.
    pub fn len(&self) -> usize {
        self.n * self.c * self.hw
    }
    /// Always false (shapes are non-empty by construction).
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Values per (group, channel) statistic.
    pub fn count(&self) -> usize {
        self.n / self.groups * self.hw
    }
    /// Checks the buffers of a forward pass: `x` and `y` (N C HW each), gamma and beta (C
    /// each) in `params`, the running mean and variance (C each) in `running`.
    pub fn check_forward(
        &self,
        x: usize,
        params: usize,
        off: BnOffsets,
        running: usize,
        y: usize,
    ) -> Result<()> {
        check_len("batchnorm x", x, 0, self.len())?;
        check_len("batchnorm y", y, 0, self.len())?;
        check_len("batchnorm gamma", params, off.gamma, self.c)?;
        check_len("batchnorm beta", params, off.beta, self.c)?;
        check_len("batchnorm running_mean", running, off.mean, self.c)?;
        check_len("batchnorm running_var", running, off.var, self.c)
    }
    /// Checks the batch statistics a training pass writes or its backward reads
    /// (`groups x C` each).
    pub fn check_stats(&self, mean: usize, invstd: usize) -> Result<()> {
        let gc = self.groups * self.c;
        check_len("batchnorm mean", mean, 0, gc)?;
        check_len("batchnorm invstd", invstd, 0, gc)
    }
    /// Checks the buffers of [`Backend::bn_backward_train`]: `x`, `dy`, `dx`, the batch
    /// statistics, and gamma/beta in both `params` and `grads`.
    pub fn check_backward_train(
        &self,
        (x, dy, dx): (usize, usize, usize),
        (params, grads): (usize, usize),
        off: BnOffsets,
        (mean, invstd): (usize, usize),
    ) -> Result<()> {
        check_len("batchnorm x", x, 0, self.len())?;
        check_len("batchnorm dy", dy, 0, self.len())?;
        check_len("batchnorm dx", dx, 0, self.len())?;
        self.check_stats(mean, invstd)?;
        for (what, o) in [("gamma", off.gamma), ("beta", off.beta)] {
            check_len(what, params, o, self.c)?;
            check_len(what, grads, o, self.c)?;
        }
        Ok(())
    }
    /// Checks the buffers of [`Backend::bn_backward_eval`].
    pub fn check_backward_eval(
        &self,
        (x, dy, dx): (usize, usize, usize),
        (params, grads): (usize, usize),
        off: BnOffsets,
        running: usize,
    ) -> Result<()> {
        self.check_forward(x, params, off, running, dx)?;
        check_len("batchnorm dy", dy, 0, self.len())?;
        check_len("batchnorm grads", grads, off.gamma.max(off.beta), self.c)
    }
}

/// Hyper-parameters of a BatchNorm (PyTorch defaults: momentum 0.1, eps 1e-5).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BnParams {
    /// Running-statistics momentum (PyTorch's convention: `new = (1 - m) old + m batch`).
    pub momentum: f64,
    /// Variance epsilon.
    pub eps: f64,
}

impl Default for BnParams {
    fn default() -> Self {
        BnParams {
            momentum: 0.1,
            eps: 1e-5,
        }
    }
}

/// Offsets of one BatchNorm's tensors: `gamma`/`beta` (C each) in the parameter buffer
/// (and at the same offsets in the gradient buffer), running mean/var (C each) in the
/// buffer of running statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BnOffsets {
    /// Offset of the weight (gamma).
    pub gamma: usize,
    /// Offset of the bias (beta).
    pub beta: usize,
    /// Offset of the running mean.
    pub mean: usize,
    /// Offset of the running variance.
    pub var: usize,
}

/// Shape of a max-pool (square window, zero-size padding treated as -inf, as PyTorch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolShape {
    /// Batch times channels (independent planes).
    pub planes: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Window.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Padding.
    pub pad: usize,
    /// Output height.
    pub ho: usize,
    /// Output width.
    pub wo: usize,
}

impl PoolShape {
    /// Validates and computes the output size (floor mode).
    pub fn new(
        planes: usize,
        (h, w): (usize, usize),
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        if planes == 0 || k == 0 || stride == 0 || 2 * pad > k {
            return Err(Error::invalid(format!(
                "maxpool: bad window (planes={planes}, k={k}, stride={stride}, pad={pad})"
            )));
        }
        if h + 2 * pad < k || w + 2 * pad < k {
            return Err(Error::invalid(format!(
                "maxpool: input {h}x{w} is smaller than the {k}x{k} window; use larger images"
            )));
        }
        Ok(PoolShape {
            planes,
            h,
            w,
            k,
            stride,
            pad,
            ho: (h + 2 * pad - k) / stride + 1,
            wo: (w + 2 * pad - k) / stride + 1,
        })
    }
    /// Checks the buffers of [`Backend::maxpool_forward`]: `x` (planes H W), `y` and `idx`
    /// (planes Ho Wo each).
    pub fn check_forward(&self, x: usize, y: usize, idx: usize) -> Result<()> {
        let (hw, hwo) = (self.h * self.w, self.ho * self.wo);
        check_len("maxpool x", x, 0, self.planes * hw)?;
        check_len("maxpool y", y, 0, self.planes * hwo)?;
        check_len("maxpool idx", idx, 0, self.planes * hwo)
    }
    /// Checks the buffers of [`Backend::maxpool_backward`].
    pub fn check_backward(&self, dy: usize, idx: usize, dx: usize) -> Result<()> {
        let (hw, hwo) = (self.h * self.w, self.ho * self.wo);
        check_len("maxpool dy", dy, 0, self.planes * hwo)?;
        check_len("maxpool idx", idx, 0, self.planes * hwo)?;
        check_len("maxpool dx", dx, 0, self.planes * hw)
    }
}

/// Checks the buffers of a global average pool over `planes` planes of `hw` values: the
/// full side (`x` forward, `dx` backward) and the pooled side (planes values).
pub(crate) fn check_avgpool(
    planes: usize,
    hw: usize,
    (full, full_len): (&str, usize),
    (pooled, pooled_len): (&str, usize),
) -> Result<()> {
    check_len(full, full_len, 0, planes * hw)?;
    check_len(pooled, pooled_len, 0, planes)?;
    if hw == 0 {
        return Err(Error::invalid("avgpool: empty spatial size"));
    }
    Ok(())
}

/// Shape of a fully connected layer `y = x W^T + b`: `x` N x IN, `W` OUT x IN, `b` OUT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearShape {
    /// Batch size.
    pub n: usize,
    /// Input features.
    pub fin: usize,
    /// Output features.
    pub fout: usize,
}

impl LinearShape {
    /// Checks the buffers of [`Backend::linear_forward`]: `x` (N IN), the weight (OUT IN)
    /// and bias (OUT) in `params`, `y` (N OUT).
    pub fn check_forward(
        &self,
        x: usize,
        params: usize,
        (w_off, b_off): (usize, usize),
        y: usize,
    ) -> Result<()> {
        check_len("linear x", x, 0, self.n * self.fin)?;
        check_len("linear weight", params, w_off, self.fout * self.fin)?;
        check_len("linear bias", params, b_off, self.fout)?;
        check_len("linear y", y, 0, self.n * self.fout)
    }
    /// Checks the buffers of [`Backend::linear_backward`].
    pub fn check_backward(
        &self,
        (x, dy, dx): (usize, usize, Option<usize>),
        (params, grads): (usize, usize),
        (w_off, b_off): (usize, usize),
    ) -> Result<()> {
        check_len("linear x", x, 0, self.n * self.fin)?;
        check_len("linear weight", params, w_off, self.fout * self.fin)?;
        check_len("linear weight grad", grads, w_off, self.fout * self.fin)?;
        check_len("linear bias grad", grads, b_off, self.fout)?;
        check_len("linear dy", dy, 0, self.n * self.fout)?;
        if let Some(dx) = dx {
            check_len("linear dx", dx, 0, self.n * self.fin)?;
        }
        Ok(())
    }
}

/// Everything that runs on a device: the ResNet's layers and SGD, and the MoCo operations
/// (momentum update, normalize, InfoNCE, enqueue, the shuffle-BN row gather, the
/// non-finite count). The encoder, [`Queue`](crate::ops::Queue), the head, the step and
/// the trainer reach the device only through it.
///
/// `Buf` is a device buffer of the backend's scalar type; `Idx` holds max-pool argmax
/// indices. Offsets (`w_off`, ...) index into a flat parameter or gradient buffer.
///
/// ```
/// use moco::backend::{Backend, Cpu};
/// use moco::ops::{ContrastShape, InfoNceImpl};
/// let be = Cpu::<f64>::new();
/// let mut ctx = be.contrast_ctx().unwrap();
/// let q = be.upload_f64(&[1.0, 0.0]).unwrap();
/// let k = be.upload_f64(&[2.0, 0.0]).unwrap();
/// let queue = be.upload_f64(&[0.0, 1.0, 0.0, -1.0]).unwrap();
/// let s = ContrastShape::new(1, 2, 2, 0.5).unwrap();
/// let (st, dq) = be.infonce(&mut ctx, &q, &k, &queue, s, InfoNceImpl::Fused).unwrap();
/// // logits (2, 0, 0): loss = ln(e^2 + 2) - 2.
/// assert!((st.loss - ((2f64.exp() + 2.0).ln() - 2.0)).abs() < 1e-15);
/// assert_eq!(dq.len(), 2);
/// ```
pub trait Backend: Clone + Send + Sync {
    /// A buffer of scalars on the device.
    type Buf: Send + Sync;
    /// A buffer of u32 indices on the device.
    type Idx: Send + Sync;

    /// Human-readable name ("cpu-f32", "cuda:0", ...).
    fn name(&self) -> String;
    /// A zero-filled buffer.
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    /// A zero-filled index buffer.
    fn zeros_idx(&self, n: usize) -> Result<Self::Idx>;
    /// Copies host f32 values into a new buffer (converted to the backend's scalar).
    fn upload_f32(&self, host: &[f32]) -> Result<Self::Buf>;
    /// Copies a buffer back to the host as f32 (waits for the device).
    fn download_f32(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// Overwrites `buf[off..off + src.len()]` with host values.
    fn write_f32(&self, buf: &mut Self::Buf, off: usize, src: &[f32]) -> Result<()>;
    /// Copies host f64 values into a new buffer, rounded to the backend's scalar (the
    /// default goes through f32, exact for f32 backends).
    fn upload_f64(&self, host: &[f64]) -> Result<Self::Buf> {
        let v: Vec<f32> = host.iter().map(|&x| x as f32).collect();
        self.upload_f32(&v)
    }
    /// Copies a buffer back to the host as f64 (exact for f32 and f64 scalars).
    fn download_f64(&self, buf: &Self::Buf) -> Result<Vec<f64>> {
        Ok(self
            .download_f32(buf)?
            .into_iter()
            .map(|x| x as f64)
            .collect())
    }
    /// Number of elements.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Sets every element to zero.
    fn fill_zero(&self, buf: &mut Self::Buf) -> Result<()>;
    /// A copy of the buffer.
    fn copy(&self, buf: &Self::Buf) -> Result<Self::Buf>;
    /// Overwrites `dst` with `src` (same length). The default allocates a copy.
    fn copy_into(&self, src: &Self::Buf, dst: &mut Self::Buf) -> Result<()> {
        check_copy_len(self.len(src), self.len(dst))?;
        *dst = self.copy(src)?;
        Ok(())
    }
    /// Readies a buffer that held earlier values to stand in for a fresh
    /// [`Backend::zeros`] as the output of an operation (the encoder keeps its buffers
    /// from one step to the next). The default zeroes it, which is always correct. A
    /// backend whose operations write every element of the outputs they are given and
    /// never read what was there before may leave the buffer as it is.
    fn reuse(&self, buf: &mut Self::Buf) -> Result<()> {
        self.fill_zero(buf)
    }

    /// `y = conv2d(x, w[w_off..])`. `x`: N x Cin x H x W, `y`: N x Cout x Ho x Wo.
    fn conv2d_forward(
        &self,
        s: &ConvShape,
        x: &Self::Buf,
        w: &Self::Buf,
        w_off: usize,
        y: &mut Self::Buf,
    ) -> Result<()>;
    /// Backward of [`Backend::conv2d_forward`]: `dw[dw_off..] += dL/dw`, and `dx = dL/dx`
    /// when `dx` is given.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_backward(
        &self,
        s: &ConvShape,
        x: &Self::Buf,
        w: &Self::Buf,
        w_off: usize,
        dy: &Self::Buf,
        dx: Option<&mut Self::Buf>,
        dw: &mut Self::Buf,
        dw_off: usize,
    ) -> Result<()>;

    /// BatchNorm in training mode: normalizes with the statistics of each group, writes
    /// `mean`/`invstd` (groups x C) for the backward pass, and updates the running
    /// statistics in `running` (average over the groups of `(1-m) old + m stat`, the
    /// variance unbiased).
    #[allow(clippy::too_many_arguments)]
    fn bn_forward_train(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &Self::Buf,
        params: &Self::Buf,
        off: BnOffsets,
        running: &mut Self::Buf,
        y: &mut Self::Buf,
        mean: &mut Self::Buf,
        invstd: &mut Self::Buf,
    ) -> Result<()>;
    /// BatchNorm in inference mode, with the running statistics (`s.groups` is ignored).
    #[allow(clippy::too_many_arguments)]
    fn bn_forward_eval(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &Self::Buf,
        params: &Self::Buf,
        off: BnOffsets,
        running: &Self::Buf,
        y: &mut Self::Buf,
    ) -> Result<()>;
    /// Backward of the training-mode BatchNorm (batch statistics depend on `x`):
    /// `dx = ...`, `grads[gamma] += sum(dy * xhat)`, `grads[beta] += sum(dy)`.
    #[allow(clippy::too_many_arguments)]
    fn bn_backward_train(
        &self,
        s: &BnShape,
        x: &Self::Buf,
        params: &Self::Buf,
        off: BnOffsets,
        mean: &Self::Buf,
        invstd: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        grads: &mut Self::Buf,
    ) -> Result<()>;
    /// Backward of the inference-mode BatchNorm (statistics are constants).
    #[allow(clippy::too_many_arguments)]
    fn bn_backward_eval(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &Self::Buf,
        params: &Self::Buf,
        off: BnOffsets,
        running: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        grads: &mut Self::Buf,
    ) -> Result<()>;

    /// [`Backend::bn_forward_train`] with an epilogue in the same pass:
    /// `y = relu(bn(x) + residual)`, the add when `residual` is given (same length as `y`),
    /// the ReLU when `relu`. The default composes the separate operations; a backend
    /// overrides it to read and write the activations once.
    #[allow(clippy::too_many_arguments)]
    fn bn_forward_train_fused(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &Self::Buf,
        params: &Self::Buf,
        off: BnOffsets,
        running: &mut Self::Buf,
        residual: Option<&Self::Buf>,
        relu: bool,
        y: &mut Self::Buf,
        mean: &mut Self::Buf,
        invstd: &mut Self::Buf,
    ) -> Result<()> {
        self.bn_forward_train(s, hp, x, params, off, running, y, mean, invstd)?;
        if let Some(r) = residual {
            self.add_assign(y, r)?;
        }
        if relu {
            self.relu_forward(y)?;
        }
        Ok(())
    }
    /// The backward of `relu(bn_train(x))`: `dy` masked by `relu_out > 0` (`relu_out` the
    /// ReLU's output), then [`Backend::bn_backward_train`]; `dy` is left unchanged. The
    /// default composes the separate operations (one copy of `dy`).
    #[allow(clippy::too_many_arguments)]
    fn relu_bn_backward_train(
        &self,
        s: &BnShape,
        x: &Self::Buf,
        params: &Self::Buf,
        off: BnOffsets,
        mean: &Self::Buf,
        invstd: &Self::Buf,
        relu_out: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        grads: &mut Self::Buf,
    ) -> Result<()> {
        let mut d = self.copy(dy)?;
        self.relu_backward(relu_out, &mut d)?;
        self.bn_backward_train(s, x, params, off, mean, invstd, &d, dx, grads)
    }

    /// `x = max(x, 0)` in place.
    fn relu_forward(&self, x: &mut Self::Buf) -> Result<()>;
    /// `dy *= (y > 0)` in place (`y` the ReLU's output).
    fn relu_backward(&self, y: &Self::Buf, dy: &mut Self::Buf) -> Result<()>;
    /// `a += b`.
    fn add_assign(&self, a: &mut Self::Buf, b: &Self::Buf) -> Result<()>;

    /// Max-pool; `idx` receives each output's argmax (index within its input plane).
    fn maxpool_forward(
        &self,
        s: &PoolShape,
        x: &Self::Buf,
        y: &mut Self::Buf,
        idx: &mut Self::Idx,
    ) -> Result<()>;
    /// Backward of the max-pool: `dx` is overwritten.
    fn maxpool_backward(
        &self,
        s: &PoolShape,
        dy: &Self::Buf,
        idx: &Self::Idx,
        dx: &mut Self::Buf,
    ) -> Result<()>;
    /// Global average pool: `x` planes x HW -> `y` planes.
    fn avgpool_forward(
        &self,
        planes: usize,
        hw: usize,
        x: &Self::Buf,
        y: &mut Self::Buf,
    ) -> Result<()>;
    /// Backward of the global average pool (`dx` overwritten).
    fn avgpool_backward(
        &self,
        planes: usize,
        hw: usize,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
    ) -> Result<()>;

    /// `y = x W^T + b`, `W = params[w_off..]` (OUT x IN), `b = params[b_off..]` (OUT).
    fn linear_forward(
        &self,
        s: &LinearShape,
        x: &Self::Buf,
        params: &Self::Buf,
        w_off: usize,
        b_off: usize,
        y: &mut Self::Buf,
    ) -> Result<()>;
    /// Backward of [`Backend::linear_forward`]: `grads[w] += dy^T x`, `grads[b] += sum dy`,
    /// `dx = dy W` when given.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        s: &LinearShape,
        x: &Self::Buf,
        params: &Self::Buf,
        w_off: usize,
        b_off: usize,
        dy: &Self::Buf,
        dx: Option<&mut Self::Buf>,
        grads: &mut Self::Buf,
    ) -> Result<()>;

    /// One SGD step over the whole flat buffer, PyTorch semantics (no dampening, no
    /// Nesterov): `g = grad + wd p; buf = momentum buf + g; p -= lr buf`. The
    /// hyper-parameters are f64 and rounded to the backend's scalar (f32 on the GPU).
    fn sgd_step(
        &self,
        params: &mut Self::Buf,
        grads: &Self::Buf,
        momentum_buf: &mut Self::Buf,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    ) -> Result<()>;

    // The MoCo operations, on the backend's own buffers: the queue, the head and the whole
    // step are written once over these for every backend and precision. `Cpu<f32>` and
    // `Cpu<f64>` compute with the plain references (f64 accumulation, results rounded to
    // the scalar type; the f64 backend is exact to f64 rounding end to end), `Cuda`
    // launches the kernels. Hyper-parameters (m, T) are f64 and rounded to the scalar
    // type before use.

    /// Per-user state of the contrastive operations (the GPU's scratch buffers).
    type Ctx: Send;
    /// Creates that state.
    fn contrast_ctx(&self) -> Result<Self::Ctx>;
    /// `key = m key + (1 - m) query` over flat buffers of equal length; `m` in [0, 1].
    fn momentum(&self, key: &mut Self::Buf, query: &Self::Buf, m: f64) -> Result<()>;
    /// The momentum update over several (key, query) tensor pairs, all checked before any
    /// is written (one launch on the GPU).
    fn momentum_multi(&self, pairs: &mut [(&mut Self::Buf, &Self::Buf)], m: f64) -> Result<()> {
        for (i, (k, q)) in pairs.iter().enumerate() {
            if self.len(k) != self.len(q) {
                return Err(Error::invalid(format!(
                    "momentum pair {i}: key has {} elements, query {}",
                    self.len(k),
                    self.len(q)
                )));
            }
        }
        for (k, q) in pairs.iter_mut() {
            self.momentum(k, q, m)?;
        }
        Ok(())
    }
    /// Row-wise L2 normalization of an N x C buffer (`F.normalize(x, dim=1)`).
    fn normalize(
        &self,
        ctx: &mut Self::Ctx,
        x: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<Self::Buf>;
    /// InfoNCE forward + backward of the raw `q` and `k` (N x C each, normalized inside)
    /// against `queue` (K x C): (loss and accuracy, dloss/dq w.r.t. the raw `q`).
    fn infonce(
        &self,
        ctx: &mut Self::Ctx,
        q: &Self::Buf,
        k: &Self::Buf,
        queue: &Self::Buf,
        s: ContrastShape,
        imp: InfoNceImpl,
    ) -> Result<(InfoNceStats, Self::Buf)>;
    /// Writes the N keys (N x C) at rows `ptr, ptr + 1, ...` (mod K) of `queue` (K x C);
    /// returns the new pointer `(ptr + N) % K`.
    fn enqueue(
        &self,
        queue: &mut Self::Buf,
        keys: &Self::Buf,
        k: usize,
        c: usize,
        ptr: usize,
    ) -> Result<usize>;
    /// `out[i] = x[rows[i]]` for rows of `row_len` elements (shuffle and unshuffle of
    /// shuffle-BN). `rows` indexes rows of `x`; every index must be in range.
    fn gather_rows(&self, x: &Self::Buf, rows: &[usize], row_len: usize) -> Result<Self::Buf>;
    /// For each buffer, how many of its elements are NaN or infinite (waits for the device).
    fn count_non_finite(&self, bufs: &[&Self::Buf]) -> Result<Vec<u64>>;
    /// Free memory of the device in bytes, or `None` when the buffers live in host memory.
    fn free_device_memory(&self) -> Result<Option<u64>>;
    /// This process's handle on a multi-process group described by `env` (torchrun's
    /// environment), meeting the other ranks within `timeout`: NCCL on [`Cuda`]. A backend
    /// without one refuses; threads of one process use [`crate::dist::ThreadComm`] instead.
    fn process_group(
        &self,
        env: &crate::dist::rendezvous::DistEnv,
        timeout: std::time::Duration,
    ) -> Result<Box<dyn crate::dist::Communicator<Self>>> {
        let _ = (env, timeout);
        Err(Error::invalid(format!(
            "{} has no multi-process group: multi-process runs (WORLD_SIZE, --gpus) need --device cuda with NCCL; on the CPU use --ranks N",
            self.name()
        )))
    }
}

/// Checks the arguments of [`Backend::gather_rows`].
pub(crate) fn check_gather(len: usize, rows: &[usize], row_len: usize) -> Result<()> {
    if row_len == 0 || !len.is_multiple_of(row_len) {
        return Err(Error::invalid(format!(
            "gather: buffer of {len} elements is not a whole number of rows of {row_len}"
        )));
    }
    let have = len / row_len;
    if let Some(&r) = rows.iter().find(|&&r| r >= have) {
        return Err(Error::invalid(format!(
            "gather: row {r} out of range for {have} rows"
        )));
    }
    Ok(())
}

pub(crate) fn gather_host<T: Copy + Default>(
    x: &[T],
    rows: &[usize],
    row_len: usize,
) -> Result<Vec<T>> {
    check_gather(x.len(), rows, row_len)?;
    let mut out = vec![T::default(); rows.len() * row_len];
    for (dst, &src) in out.chunks_exact_mut(row_len).zip(rows) {
        dst.copy_from_slice(&x[src * row_len..(src + 1) * row_len]);
    }
    Ok(out)
}

/// Checks that a copy's source and destination have the same length.
pub(crate) fn check_copy_len(src: usize, dst: usize) -> Result<()> {
    if src != dst {
        return Err(Error::invalid(format!(
            "copy_into: source has {src} elements, destination {dst}"
        )));
    }
    Ok(())
}

/// Checks `len(buf) >= off + need`, naming the tensor in the error.
pub(crate) fn check_len(what: &str, len: usize, off: usize, need: usize) -> Result<()> {
    if off.checked_add(need).is_none_or(|end| end > len) {
        return Err(Error::invalid(format!(
            "{what}: buffer of {len} elements is too small for {need} elements at offset {off}"
        )));
    }
    Ok(())
}
