//! [`MocoHead`]: MoCo's contrastive half for an encoder the caller brings.
//!
//! The caller computes the query embeddings `q = f_q(x_q)` and the key embeddings
//! `k = f_k(x_k)` (with whatever shuffle-BN it wants) with its own model, on the same
//! backend (host vectors on [`Cpu`](crate::backend::Cpu), device buffers on
//! [`Cuda`](crate::backend::Cuda), which can run on the caller's own stream through
//! [`Gpu::from_stream`](crate::cuda::Gpu::from_stream)). The head owns the queue and the
//! temperature: it returns the InfoNCE loss, the accuracy and `dL/dq` for the caller's
//! backward pass, enqueues the keys once the caller has stepped its optimizer, and applies
//! the momentum update to the caller's parameter tensors.
use crate::backend::Backend;
use crate::error::Result;
use crate::ops::{ContrastShape, InfoNceImpl, InfoNceStats, Queue};

/// What [`MocoHead::forward_backward`] returns.
pub struct HeadOutput<B: Backend> {
    /// Loss (mean over N) and contrastive top-1 accuracy.
    pub stats: InfoNceStats,
    /// `dL/dq` with respect to the raw (unnormalized) query embeddings, N x C.
    pub grad_q: B::Buf,
    /// The keys L2-normalized, N x C: what [`MocoHead::enqueue`] takes.
    pub keys: B::Buf,
}

/// The queue, the temperature and the contrastive operations on backend `B`.
///
/// ```
/// use moco::backend::{Backend, Cpu};
/// use moco::ops::MocoHead;
/// let be = Cpu::<f32>::new();
/// // K = 16 keys of dimension 4, T = 0.2.
/// let mut head = MocoHead::new(be.clone(), 16, 4, 0.2, 0).unwrap();
/// let q = moco::rng::normal(2 * 4, 1); // the caller's f_q(x_q): N = 2
/// let k = moco::rng::normal(2 * 4, 2); // the caller's f_k(x_k)
/// let out = head.forward_backward(&q, &k, 2).unwrap();
/// assert!(out.stats.loss > 0.0 && out.grad_q.len() == 8);
/// // ... backward of f_q with out.grad_q, optimizer step ...
/// head.enqueue(&out.keys).unwrap();
/// assert_eq!(head.queue().ptr(), 2);
/// // The key encoder's parameters follow the query encoder's, tensor by tensor.
/// let (mut wk, wq) = (vec![0.0f32; 3], vec![1.0f32; 3]);
/// head.momentum_update(&mut [(&mut wk, &wq)], 0.99).unwrap();
/// assert!((wk[0] - 0.01).abs() < 1e-7);
/// ```
pub struct MocoHead<B: Backend> {
    be: B,
    ctx: B::Ctx,
    queue: Queue<B>,
    t: f64,
    imp: InfoNceImpl,
}

impl<B: Backend> std::fmt::Debug for MocoHead<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MocoHead")
            .field("queue", &self.queue)
            .field("t", &self.t)
            .field("imp", &self.imp)
            .finish()
    }
}

impl<B: Backend> MocoHead<B> {
    /// A head with a fresh seeded queue of `k` keys of dimension `dim`, temperature `t`.
    pub fn new(be: B, k: usize, dim: usize, t: f64, seed: u64) -> Result<Self> {
        let queue = Queue::new(&be, k, dim, seed)?;
        Self::with_queue(queue, t)
    }

    /// A head around an existing queue (restored from a checkpoint, say).
    pub fn with_queue(queue: Queue<B>, t: f64) -> Result<Self> {
        // Validates T the way every InfoNCE call will.
        ContrastShape::new(1, queue.dim(), queue.len(), t)?;
        let be = queue.backend().clone();
        Ok(MocoHead {
            ctx: be.contrast_ctx()?,
            be,
            queue,
            t,
            imp: InfoNceImpl::default(),
        })
    }

    /// Chooses the GPU InfoNCE implementation (ignored on the CPU).
    pub fn with_impl(mut self, imp: InfoNceImpl) -> Self {
        self.imp = imp;
        self
    }

    /// The temperature T.
    pub fn temperature(&self) -> f64 {
        self.t
    }

    /// The queue.
    pub fn queue(&self) -> &Queue<B> {
        &self.queue
    }

    /// The queue, mutable (to restore a state).
    pub fn queue_mut(&mut self) -> &mut Queue<B> {
        &mut self.queue
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.be
    }

    /// L2-normalizes N x C embeddings (as the keys are before they are enqueued).
    pub fn normalize(&mut self, x: &B::Buf, n: usize) -> Result<B::Buf> {
        self.be.normalize(&mut self.ctx, x, n, self.queue.dim())
    }

    /// InfoNCE of the raw query embeddings `q` against the raw key embeddings `k` (their
    /// positives, row by row) and the queue (the negatives), forward and backward. `q` and
    /// `k` are N x C; the queue is not changed.
    pub fn forward_backward(&mut self, q: &B::Buf, k: &B::Buf, n: usize) -> Result<HeadOutput<B>> {
        let keys = self.normalize(k, n)?;
        let (stats, grad_q) = self.loss_normalized_keys(q, &keys, n)?;
        Ok(HeadOutput {
            stats,
            grad_q,
            keys,
        })
    }

    /// Like [`MocoHead::forward_backward`] with keys that are already normalized: (loss
    /// and accuracy, `dL/dq`).
    pub fn loss_normalized_keys(
        &mut self,
        q: &B::Buf,
        keys: &B::Buf,
        n: usize,
    ) -> Result<(InfoNceStats, B::Buf)> {
        let s = ContrastShape::new(n, self.queue.dim(), self.queue.len(), self.t)?;
        self.be
            .infonce(&mut self.ctx, q, keys, self.queue.keys(), s, self.imp)
    }

    /// Enqueues normalized keys (N x C) and advances the queue pointer.
    pub fn enqueue(&mut self, keys: &B::Buf) -> Result<()> {
        self.queue.enqueue(keys)
    }

    /// The momentum update `key = m key + (1 - m) query` over the caller's (key, query)
    /// parameter tensor pairs, every pair checked before any is written.
    pub fn momentum_update(&self, pairs: &mut [(&mut B::Buf, &B::Buf)], m: f64) -> Result<()> {
        self.be.momentum_multi(pairs, m)
    }
}
