//! The contrastive operations on the GPU: [`Contrast`], its grow-only workspace, and the
//! launches of `kernels/contrast.cu` (plus the crate's one SGEMM wrapper for the unfused
//! path and the logits). Every buffer reaches a kernel as a view; the caller's buffers may
//! be `CudaSlice`s or views into larger ones ([`DeviceBuf`]).
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig};

use super::{ContrastShape, InfoNceImpl, InfoNceStats, NORMALIZE_EPS};
use crate::backend::cuda::gemm::{sgemm, ColMajorGemm};
use crate::cuda::{grow, kernels, launch, DeviceBuf, DeviceBufMut, Gpu};
use crate::error::{CudaResultExt, Error, Result};

/// Largest feature dimension the fused kernel handles (padded tiles of 64, 128 or 256).
pub const FUSED_MAX_C: usize = 256;
const FUSED_ROWS: usize = 64;
const FUSED_KEYS: usize = 64;

/// One grow-only workspace buffer.
type Slot<'a> = &'a mut Option<CudaSlice<f32>>;

/// Grow-only device workspace.
#[derive(Default)]
struct Workspace {
    qn: Option<CudaSlice<f32>>,
    kn: Option<CudaSlice<f32>>,
    norms: Option<CudaSlice<f32>>,
    part_m: Option<CudaSlice<f32>>,
    part_l: Option<CudaSlice<f32>>,
    part_o: Option<CudaSlice<f32>>,
    rows: Option<CudaSlice<f32>>,
    logits: Option<CudaSlice<f32>>,
    gemm_g: Option<CudaSlice<f32>>,
}

/// The first `n` elements of the workspace buffer in `slot`, grown (never shrunk) to hold
/// them.
fn ensure<'a>(gpu: &Gpu, slot: Slot<'a>, n: usize) -> Result<CudaViewMut<'a, f32>> {
    Ok(grow(gpu, slot, n)?.slice_mut(0..n))
}

/// One warp per row of an `n x c` launch.
fn warp_per_row(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u64 * 32).div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `moco_l2_normalize_rows`: `out = F.normalize(x)`, and the row norms into `norms` when
/// given (the kernel skips them for a null pointer). `n` and `c` are validated by the
/// callers; the views hold `n c` (and `n`) elements.
fn launch_normalize(
    gpu: &Gpu,
    x: CudaView<'_, f32>,
    out: CudaViewMut<'_, f32>,
    norms: Option<CudaViewMut<'_, f32>>,
    n: usize,
    c: usize,
) -> Result<()> {
    let (n32, c32) = (n as u32, c as u32);
    let k = kernels::contrast::L2_NORMALIZE_ROWS;
    match norms {
        Some(norms) => launch!(gpu, k, warp_per_row(n);
            x, mut out, mut norms, n32, c32, NORMALIZE_EPS
        ),
        // The null pointer: the kernel writes no norms.
        None => launch!(gpu, k, warp_per_row(n); x, mut out, 0u64, n32, c32, NORMALIZE_EPS),
    }
    Ok(())
}

/// `q` and `k` normalized into the workspace slots, with the norms of `q`.
struct Normed<'w> {
    qn: CudaView<'w, f32>,
    kn: CudaView<'w, f32>,
    norms: CudaView<'w, f32>,
}

fn normalize_inputs<'w>(
    gpu: &Gpu,
    (qn, kn, norms): (Slot<'w>, Slot<'w>, Slot<'w>),
    q: &CudaView<'_, f32>,
    k: &CudaView<'_, f32>,
    s: ContrastShape,
) -> Result<Normed<'w>> {
    let nc = s.n * s.c;
    let qv = ensure(gpu, &mut *qn, nc)?;
    let nv = ensure(gpu, &mut *norms, s.n)?;
    launch_normalize(gpu, q.slice(..), qv, Some(nv), s.n, s.c)?;
    let kv = ensure(gpu, &mut *kn, nc)?;
    launch_normalize(gpu, k.slice(..), kv, None, s.n, s.c)?;
    Ok(Normed {
        qn: shared(qn, nc)?,
        kn: shared(kn, nc)?,
        norms: shared(norms, s.n)?,
    })
}

/// The first `n` elements of a workspace buffer [`ensure`] sized, read-only.
fn shared(slot: &Option<CudaSlice<f32>>, n: usize) -> Result<CudaView<'_, f32>> {
    match slot {
        Some(b) if b.len() >= n => Ok(b.slice(0..n)),
        _ => Err(Error::invalid("workspace buffer missing after allocation")),
    }
}

/// The contrastive operations on one GPU, with their workspace (the GPU's cuBLAS handle is
/// shared, [`Gpu::blas`]).
///
/// Create once and reuse: buffers grow to the largest shape seen and are then reused.
///
/// ```no_run
/// # fn main() -> moco::Result<()> {
/// use moco::ops::{Contrast, ContrastShape, InfoNceImpl};
/// let gpu = moco::cuda::Gpu::new(0)?;
/// let s = ContrastShape::new(256, 128, 65536, 0.07)?;
/// let q = gpu.upload(&moco::rng::normal(s.n * s.c, 1))?;
/// let k = gpu.upload(&moco::rng::normal(s.n * s.c, 2))?;
/// let queue = gpu.upload(&moco::rng::normal(s.k * s.c, 3))?;
/// let mut grad = gpu.zeros::<f32>(s.n * s.c)?;
/// let mut contrast = Contrast::new(&gpu);
/// let stats = contrast.infonce(&q, &k, &queue, s, &mut grad, InfoNceImpl::Fused)?;
/// println!("loss {} acc {}", stats.loss, stats.accuracy);
/// # Ok(()) }
/// ```
pub struct Contrast {
    gpu: Gpu,
    ws: Workspace,
}

impl std::fmt::Debug for Contrast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contrast").field("gpu", &self.gpu).finish()
    }
}

impl Contrast {
    /// Contrastive operations on `gpu`'s stream.
    pub fn new(gpu: &Gpu) -> Self {
        Contrast {
            gpu: gpu.clone(),
            ws: Workspace::default(),
        }
    }

    /// The GPU this runs on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    fn check_dev<T: DeviceBuf<f32> + ?Sized>(&self, what: &str, x: &T) -> Result<()> {
        self.gpu.check_same_device::<f32, T>(what, x)
    }

    /// Normalizes the rows of `x` (N x C) into `out` as `F.normalize(x, dim=1)`.
    pub fn normalize<X, O>(&mut self, x: &X, out: &mut O, n: usize, c: usize) -> Result<()>
    where
        X: DeviceBuf<f32> + ?Sized,
        O: DeviceBufMut<f32> + ?Sized,
    {
        if n == 0 || c == 0 || x.len() != n * c || out.len() != n * c {
            return Err(Error::invalid(format!(
                "normalize: x has {} and out {} elements, expected N x C = {n} x {c}",
                x.len(),
                out.len()
            )));
        }
        if n > i32::MAX as usize || c > i32::MAX as usize {
            return Err(Error::invalid("N and C must be < 2^31"));
        }
        self.check_dev("x", x)?;
        self.check_dev("out", out)?;
        launch_normalize(&self.gpu, x.view(), out.view_mut(), None, n, c)
    }

    /// The N x (1 + K) logits `[qn.kn, qn.queue^T] / T` into `out` (cuBLAS SGEMM for the
    /// negatives, a small kernel for the positives).
    pub fn logits<Q, K, U, O>(
        &mut self,
        q: &Q,
        k: &K,
        queue: &U,
        s: ContrastShape,
        out: &mut O,
    ) -> Result<()>
    where
        Q: DeviceBuf<f32> + ?Sized,
        K: DeviceBuf<f32> + ?Sized,
        U: DeviceBuf<f32> + ?Sized,
        O: DeviceBufMut<f32> + ?Sized,
    {
        s.check_inputs(q.len(), k.len(), queue.len())?;
        if out.len() != s.n * (1 + s.k) {
            return Err(Error::invalid(format!(
                "logits output has {} elements, expected N x (1 + K) = {} x {}",
                out.len(),
                s.n,
                1 + s.k
            )));
        }
        self.check_dev("q", q)?;
        self.check_dev("k", k)?;
        self.check_dev("queue", queue)?;
        self.check_dev("out", out)?;
        let ws = &mut self.ws;
        let nd = normalize_inputs(
            &self.gpu,
            (&mut ws.qn, &mut ws.kn, &mut ws.norms),
            &q.view(),
            &k.view(),
            s,
        )?;
        let ld = 1 + s.k;
        let mut out = out.view_mut();
        {
            // Row-major out[:, 1..] (N x K, row stride 1+K) = qn queue^T / T, i.e.
            // column-major out^T (K x N) = queue (K x C) . qn^T: A = queue stored as
            // col-major C x K (transposed).
            let g = ColMajorGemm {
                transa: true,
                transb: false,
                m: s.k,
                n: s.n,
                k: s.c,
                lda: s.c,
                ldb: s.c,
                ldc: ld,
            };
            let mut negatives = out.slice_mut(1..);
            sgemm(
                &self.gpu,
                g,
                1.0 / s.t32(),
                &queue.view(),
                &nd.qn,
                0.0,
                &mut negatives,
            )?;
        }
        // (const float*, const float*, float*, u64, MocoContrastShape): qn/kn hold N*C
        // floats, out N*(1+K) floats and the kernel writes out[r*ld] for r < N.
        launch!(self.gpu, kernels::contrast::POSITIVE_LOGITS, warp_per_row(s.n);
            nd.qn,
            nd.kn,
            mut out,
            ld as u64,
            s.abi()
        );
        Ok(())
    }

    /// InfoNCE forward and backward: writes dloss/dq (N x C, w.r.t. the unnormalized q) into
    /// `grad_q` and returns the mean loss and top-1 accuracy (this synchronizes the stream to
    /// read them back).
    pub fn infonce<Q, K, U, G>(
        &mut self,
        q: &Q,
        k: &K,
        queue: &U,
        s: ContrastShape,
        grad_q: &mut G,
        imp: InfoNceImpl,
    ) -> Result<InfoNceStats>
    where
        Q: DeviceBuf<f32> + ?Sized,
        K: DeviceBuf<f32> + ?Sized,
        U: DeviceBuf<f32> + ?Sized,
        G: DeviceBufMut<f32> + ?Sized,
    {
        self.infonce_async(q, k, queue, s, grad_q, imp)?;
        self.read_stats(s.n)
    }

    /// As [`Contrast::infonce`] but without reading the loss back: the per-row losses and
    /// hits stay on the device until [`Contrast::read_stats`].
    pub fn infonce_async<Q, K, U, G>(
        &mut self,
        q: &Q,
        k: &K,
        queue: &U,
        s: ContrastShape,
        grad_q: &mut G,
        imp: InfoNceImpl,
    ) -> Result<()>
    where
        Q: DeviceBuf<f32> + ?Sized,
        K: DeviceBuf<f32> + ?Sized,
        U: DeviceBuf<f32> + ?Sized,
        G: DeviceBufMut<f32> + ?Sized,
    {
        s.check_inputs(q.len(), k.len(), queue.len())?;
        s.check_len("grad_q", grad_q.len(), s.n)?;
        self.check_dev("q", q)?;
        self.check_dev("k", k)?;
        self.check_dev("queue", queue)?;
        self.check_dev("grad_q", grad_q)?;
        let gpu = &self.gpu;
        let ws = &mut self.ws;
        let nd = normalize_inputs(
            gpu,
            (&mut ws.qn, &mut ws.kn, &mut ws.norms),
            &q.view(),
            &k.view(),
            s,
        )?;
        // rows: [coef0 | loss | correct], N each.
        let mut rows = ensure(gpu, &mut ws.rows, 3 * s.n)?;
        let (coef0, mut rest) = rows.split_at_mut(s.n);
        let (loss, correct) = rest.split_at_mut(s.n);
        let rows = Rows {
            coef0,
            loss,
            correct,
        };
        let queue = queue.view();
        let grad = grad_q.view_mut();
        if imp == InfoNceImpl::Fused && s.c <= FUSED_MAX_C {
            let parts = (&mut ws.part_m, &mut ws.part_l, &mut ws.part_o);
            fused(gpu, parts, &nd, &queue, grad, rows, s)
        } else {
            unfused(
                gpu,
                (&mut ws.logits, &mut ws.gemm_g),
                &nd,
                &queue,
                grad,
                rows,
                s,
            )
        }
    }

    /// Reads back the loss and accuracy of the last `infonce_async` call (synchronizes).
    pub fn read_stats(&mut self, n: usize) -> Result<InfoNceStats> {
        let rows = self
            .ws
            .rows
            .as_ref()
            .filter(|r| r.len() >= 3 * n && n > 0)
            .ok_or_else(|| {
                Error::invalid("read_stats: no InfoNCE call with this batch size yet")
            })?;
        let host = self
            .gpu
            .stream()
            .clone_dtoh(&rows.slice(n..3 * n))
            .call("cuMemcpyDtoH")?;
        let loss = host[..n].iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let acc = host[n..].iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        Ok(InfoNceStats {
            loss,
            accuracy: acc,
        })
    }

    /// Symmetric loss `loss(q1, k2) + loss(q2, k1)` against the same queue: writes both
    /// gradients and returns (summed loss, mean accuracy of the two halves).
    #[allow(clippy::too_many_arguments)]
    pub fn infonce_symmetric<Q, K, U, G>(
        &mut self,
        q1: &Q,
        k1: &K,
        q2: &Q,
        k2: &K,
        queue: &U,
        s: ContrastShape,
        grad_q1: &mut G,
        grad_q2: &mut G,
        imp: InfoNceImpl,
    ) -> Result<InfoNceStats>
    where
        Q: DeviceBuf<f32> + ?Sized,
        K: DeviceBuf<f32> + ?Sized,
        U: DeviceBuf<f32> + ?Sized,
        G: DeviceBufMut<f32> + ?Sized,
    {
        let a = self.infonce(q1, k2, queue, s, grad_q1, imp)?;
        let b = self.infonce(q2, k1, queue, s, grad_q2, imp)?;
        Ok(InfoNceStats {
            loss: a.loss + b.loss,
            accuracy: 0.5 * (a.accuracy + b.accuracy),
        })
    }
}

/// The per-row outputs: the unfused path's softmax coefficient of the positive, the loss,
/// and the top-1 hit (N each).
struct Rows<'a> {
    coef0: CudaViewMut<'a, f32>,
    loss: CudaViewMut<'a, f32>,
    correct: CudaViewMut<'a, f32>,
}

/// The fused path: split-K online-softmax partials over the queue, then one block per row
/// merges them with the positive and writes the gradient.
fn fused(
    gpu: &Gpu,
    (part_m, part_l, part_o): (Slot<'_>, Slot<'_>, Slot<'_>),
    nd: &Normed<'_>,
    queue: &CudaView<'_, f32>,
    grad: CudaViewMut<'_, f32>,
    rows: Rows<'_>,
    s: ContrastShape,
) -> Result<()> {
    let cp = if s.c <= 64 {
        64
    } else if s.c <= 128 {
        128
    } else {
        256
    };
    let row_blocks = s.n.div_ceil(FUSED_ROWS);
    let ntiles = s.k.div_ceil(FUSED_KEYS);
    // Enough blocks for two waves over the SMs; each split streams >= 1 tile.
    let target = 2 * gpu.sm_count() as usize;
    let splits_wanted = target.div_ceil(row_blocks).clamp(1, ntiles);
    let tiles_per_split = ntiles.div_ceil(splits_wanted);
    let splits = ntiles.div_ceil(tiles_per_split);
    if splits > u16::MAX as usize {
        return Err(Error::invalid("queue too long for the fused kernel's grid"));
    }
    let mut pm = ensure(gpu, part_m, splits * s.n)?;
    let mut pl = ensure(gpu, part_l, splits * s.n)?;
    let mut po = ensure(gpu, part_o, splits * s.n * cp)?;
    let partial = match cp {
        64 => kernels::contrast::INFONCE_PARTIAL_C64,
        128 => kernels::contrast::INFONCE_PARTIAL_C128,
        _ => kernels::contrast::INFONCE_PARTIAL_C256,
    };
    let smem = 4 * (FUSED_ROWS * (cp + 4) + FUSED_KEYS * (cp + 4) + FUSED_ROWS * (FUSED_KEYS + 4));
    gpu.function(partial)?
        .set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .call("cuFuncSetAttribute")?;
    let cfg = LaunchConfig {
        grid_dim: (row_blocks as u32, splits as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // (const float*, const float*, MocoContrastShape, u32, float*, float*, float*): qn holds
    // N*C, queue K*C floats; the part buffers splits*N (m, l) and splits*N*CP (o) floats;
    // blocks of split >= splits are not launched.
    launch!(gpu, partial, cfg;
        nd.qn.slice(..),
        queue.slice(..),
        s.abi(),
        tiles_per_split as u32,
        mut pm.slice_mut(..),
        mut pl.slice_mut(..),
        mut po.slice_mut(..)
    );
    let cfg = LaunchConfig {
        grid_dim: (s.n as u32, 1, 1),
        block_dim: (if s.c >= 256 { 256 } else { 128 }, 1, 1),
        shared_mem_bytes: (4 * (splits + s.c)) as u32,
    };
    // moco_infonce_combine: every buffer is sized as above, grad holds N*C floats, the loss
    // and correct rows N floats each; shared memory covers splits + C floats.
    launch!(gpu, kernels::contrast::INFONCE_COMBINE, cfg;
        nd.qn.slice(..),
        nd.norms.slice(..),
        nd.kn.slice(..),
        pm.as_view(),
        pl.as_view(),
        po.as_view(),
        splits as u32,
        cp as u32,
        s.abi(),
        mut grad,
        mut rows.loss,
        mut rows.correct
    );
    Ok(())
}

/// The unfused path: the N x K logits by SGEMM, a row softmax in place, the gradient's
/// SGEMM, and a finishing kernel through the normalization.
fn unfused(
    gpu: &Gpu,
    (logits, gemm_g): (Slot<'_>, Slot<'_>),
    nd: &Normed<'_>,
    queue: &CudaView<'_, f32>,
    grad: CudaViewMut<'_, f32>,
    rows: Rows<'_>,
    s: ContrastShape,
) -> Result<()> {
    let mut logits = ensure(gpu, logits, s.n * s.k)?;
    let mut gg = ensure(gpu, gemm_g, s.n * s.c)?;
    // S (N x K row-major) = qn queue^T / T.
    let g = ColMajorGemm {
        transa: true,
        transb: false,
        m: s.k,
        n: s.n,
        k: s.c,
        lda: s.c,
        ldb: s.c,
        ldc: s.k,
    };
    sgemm(gpu, g, 1.0 / s.t32(), queue, &nd.qn, 0.0, &mut logits)?;
    let cfg = LaunchConfig {
        grid_dim: (s.n as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let Rows {
        mut coef0,
        loss,
        correct,
    } = rows;
    // moco_softmax_ce_rows: logits holds N*K floats with row stride K, qn/kn N*C, coef0,
    // loss and correct N floats each.
    launch!(gpu, kernels::contrast::SOFTMAX_CE_ROWS, cfg;
        mut logits.slice_mut(..),
        s.k as u64,
        nd.qn.slice(..),
        nd.kn.slice(..),
        s.abi(),
        mut coef0.slice_mut(..),
        mut loss,
        mut correct
    );
    // G (N x C row-major) = P (N x K) queue (K x C): column-major G^T = queue^T P^T with
    // queue as col-major C x K (no transpose) and P as col-major K x N.
    let g = ColMajorGemm {
        transa: false,
        transb: false,
        m: s.c,
        n: s.n,
        k: s.k,
        lda: s.c,
        ldb: s.k,
        ldc: s.c,
    };
    sgemm(gpu, g, 1.0, queue, &logits.as_view(), 0.0, &mut gg)?;
    let cfg = LaunchConfig {
        grid_dim: (s.n as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: (4 * s.c) as u32,
    };
    // moco_infonce_finish: gg, qn, kn and grad hold N*C floats, coef0 and norms N floats;
    // shared memory holds C floats.
    launch!(gpu, kernels::contrast::INFONCE_FINISH, cfg;
        gg.as_view(),
        coef0.as_view(),
        nd.qn.slice(..),
        nd.norms.slice(..),
        nd.kn.slice(..),
        s.abi(),
        mut grad
    );
    Ok(())
}
