//! [`MocoBackend`]: the MoCo operations on a [`Backend`]'s own buffers, so that the queue,
//! the head and the whole step are written once for every backend and precision.
//!
//! [`Cpu<f32>`](Cpu) and [`Cpu<f64>`](Cpu) compute with the plain references (f64
//! accumulation, results rounded to the scalar type; the f64 backend is exact to f64
//! rounding end to end), [`Cuda`] launches the kernels. Hyper-parameters (m, T) are f64 and
//! rounded to the scalar type before use, as the f32 paths always did.
use crate::backend::{Backend, Cpu, Cuda, Scalar};
use crate::error::{Error, Result};
use crate::ops::{self, ContrastShape, InfoNceImpl, InfoNceStats};

/// The contrastive operations on a backend's buffers.
///
/// ```
/// use moco::backend::{Backend, Cpu};
/// use moco::ops::{ContrastShape, InfoNceImpl, MocoBackend};
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
pub trait MocoBackend: Backend {
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

/// Checks the arguments of [`MocoBackend::gather_rows`].
fn check_gather(len: usize, rows: &[usize], row_len: usize) -> Result<()> {
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

fn gather_host<T: Copy + Default>(x: &[T], rows: &[usize], row_len: usize) -> Result<Vec<T>> {
    check_gather(x.len(), rows, row_len)?;
    let mut out = vec![T::default(); rows.len() * row_len];
    for (dst, &src) in out.chunks_exact_mut(row_len).zip(rows) {
        dst.copy_from_slice(&x[src * row_len..(src + 1) * row_len]);
    }
    Ok(out)
}

impl<S: Scalar> MocoBackend for Cpu<S> {
    type Ctx = ();
    fn contrast_ctx(&self) -> Result<()> {
        Ok(())
    }
    fn momentum(&self, key: &mut Vec<S>, query: &Vec<S>, m: f64) -> Result<()> {
        let _p = crate::backend::cpu::profile::scope(|| "momentum".into());
        ops::momentum_update_host(key, query, m)
    }
    fn normalize(&self, _: &mut (), x: &Vec<S>, n: usize, c: usize) -> Result<Vec<S>> {
        let _p = crate::backend::cpu::profile::scope(|| "normalize".into());
        ops::contrast::l2_normalize_host(x, n, c)
    }
    fn infonce(
        &self,
        _: &mut (),
        q: &Vec<S>,
        k: &Vec<S>,
        queue: &Vec<S>,
        s: ContrastShape,
        _imp: InfoNceImpl,
    ) -> Result<(InfoNceStats, Vec<S>)> {
        let _p = crate::backend::cpu::profile::scope(|| "infonce".into());
        if let (Some(q), Some(k), Some(queue)) = (S::as_f32(q), S::as_f32(k), S::as_f32(queue)) {
            // f32: GEMMs and exp in f32, sums and the loss in f64.
            let s = s.rounded_to_f32();
            let (loss, grad, correct) = ops::contrast::infonce_gemm_f32(q, k, queue, s)?;
            let grad = grad.into_iter().map(|v| S::from_f64(v as f64)).collect();
            let stats = InfoNceStats {
                loss,
                accuracy: correct as f64 / s.n as f64,
            };
            return Ok((stats, grad));
        }
        ops::contrast::infonce_host(q, k, queue, s)
    }
    fn enqueue(
        &self,
        queue: &mut Vec<S>,
        keys: &Vec<S>,
        k: usize,
        c: usize,
        ptr: usize,
    ) -> Result<usize> {
        let _p = crate::backend::cpu::profile::scope(|| "enqueue".into());
        ops::enqueue_cpu(queue, keys, k, c, ptr)
    }
    fn gather_rows(&self, x: &Vec<S>, rows: &[usize], row_len: usize) -> Result<Vec<S>> {
        let _p = crate::backend::cpu::profile::scope(|| "gather_rows".into());
        gather_host(x, rows, row_len)
    }
    fn count_non_finite(&self, bufs: &[&Vec<S>]) -> Result<Vec<u64>> {
        let _p = crate::backend::cpu::profile::scope(|| "count_non_finite".into());
        Ok(bufs
            .iter()
            .map(|b| b.iter().filter(|v| !v.to_f64().is_finite()).count() as u64)
            .collect())
    }
    fn free_device_memory(&self) -> Result<Option<u64>> {
        Ok(None)
    }
}

impl MocoBackend for Cuda {
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
        // Through the host (f32, so exact), as the trainer has always unshuffled; a gather
        // kernel that keeps the step on the device is the GPU-step issue's work.
        check_gather(x.len(), rows, row_len)?;
        let host = self.download_f32(x)?;
        self.upload_f32(&gather_host(&host, rows, row_len)?)
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
