//! The queue of keys: a K x C circular buffer (one key per row) and its enqueue.
//!
//! Unlike the reference implementation, which asserts `K % N == 0`, a batch that runs past
//! the end wraps around to the start. `N > K` is an error (the batch would overwrite itself).
use cudarc::driver::LaunchConfig;

use crate::backend::Backend;
use crate::cuda::{abi::MocoEnqueueArgs, kernels, launch, DeviceBuf, DeviceBufMut, Gpu, BLOCK};
use crate::error::{Error, Result};

fn check_enqueue(
    queue_len: usize,
    keys_len: usize,
    k: usize,
    c: usize,
    ptr: usize,
) -> Result<usize> {
    if k == 0 || c == 0 {
        return Err(Error::invalid(format!(
            "queue needs K, C >= 1, got K={k} C={c}"
        )));
    }
    if queue_len != k * c {
        return Err(Error::invalid(format!(
            "queue has {queue_len} elements, expected K x C = {k} x {c}"
        )));
    }
    if !keys_len.is_multiple_of(c) {
        return Err(Error::invalid(format!(
            "keys have {keys_len} elements, not a multiple of C = {c}"
        )));
    }
    let n = keys_len / c;
    if n > k {
        return Err(Error::invalid(format!(
            "batch of {n} keys does not fit a queue of K = {k}; use a queue at least as long as the batch"
        )));
    }
    if ptr >= k {
        return Err(Error::invalid(format!(
            "queue pointer {ptr} out of range for K = {k}"
        )));
    }
    Ok(n)
}

/// CPU reference: writes the N keys (N x C) at rows `ptr, ptr+1, ...` (mod K) of `queue`
/// (K x C) and returns the new pointer `(ptr + N) % K`.
///
/// ```
/// // K = 3 rows of C = 1; two keys at ptr 2 wrap around.
/// let mut q = vec![0.0f32; 3];
/// let ptr = moco::ops::enqueue_cpu(&mut q, &[5.0, 6.0], 3, 1, 2).unwrap();
/// assert_eq!(q, vec![6.0, 0.0, 5.0]);
/// assert_eq!(ptr, 1);
/// ```
pub fn enqueue_cpu<T: Copy>(
    queue: &mut [T],
    keys: &[T],
    k: usize,
    c: usize,
    ptr: usize,
) -> Result<usize> {
    let n = check_enqueue(queue.len(), keys.len(), k, c, ptr)?;
    for i in 0..n {
        let row = (ptr + i) % k;
        queue[row * c..(row + 1) * c].copy_from_slice(&keys[i * c..(i + 1) * c]);
    }
    Ok((ptr + n) % k)
}

/// CUDA: the same circular enqueue in one launch on `gpu`'s stream; returns the new pointer.
pub fn enqueue<Q, K>(
    gpu: &Gpu,
    queue: &mut Q,
    keys: &K,
    k: usize,
    c: usize,
    ptr: usize,
) -> Result<usize>
where
    Q: DeviceBufMut<f32> + ?Sized,
    K: DeviceBuf<f32> + ?Sized,
{
    enqueue_launch(gpu, kernels::queue::ENQUEUE_F32, queue, keys, (k, c, ptr))
}

/// The checks and the launch of both enqueue kernels (f32 or bf16 queue, f32 keys).
fn enqueue_launch<T, Q, K>(
    gpu: &Gpu,
    kernel: crate::cuda::Kernel,
    queue: &mut Q,
    keys: &K,
    (k, c, ptr): (usize, usize, usize),
) -> Result<usize>
where
    Q: DeviceBufMut<T> + ?Sized,
    K: DeviceBuf<f32> + ?Sized,
{
    let n = check_enqueue(queue.len(), keys.len(), k, c, ptr)?;
    gpu.check_same_device::<T, Q>("queue", queue)?;
    gpu.check_same_device::<f32, K>("keys", keys)?;
    if n == 0 {
        return Ok(ptr);
    }
    let args = MocoEnqueueArgs {
        n: n as u64,
        c: c as u64,
        k: k as u64,
        ptr: ptr as u64,
    };
    let total = (n * c) as u64;
    let cfg = LaunchConfig {
        grid_dim: (gpu.grid_for(total, 1), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    // (T*, const float*, MocoEnqueueArgs) with T the queue's element type: keys hold n*c
    // floats, the queue k*c elements, and every destination row (ptr + i) mod k is < k
    // (ptr < k, n <= k checked above).
    launch!(gpu, kernel, cfg;
        mut queue.view_mut(),
        keys.view(),
        args
    );
    Ok((ptr + n) % k)
}

/// CPU reference of the bf16 queue (`--queue-dtype bf16`): [`enqueue_cpu`] with each f32
/// key element rounded to the nearest bf16 (ties to even), as the GPU's `enqueue_bf16`.
///
/// ```
/// use half::bf16;
/// let mut q = vec![bf16::ZERO; 2];
/// let ptr = moco::ops::enqueue_bf16_cpu(&mut q, &[1.0 + 1.0 / 256.0], 2, 1, 1).unwrap();
/// // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties to even gives 1.
/// assert_eq!(q, vec![bf16::ZERO, bf16::ONE]);
/// assert_eq!(ptr, 0);
/// ```
pub fn enqueue_bf16_cpu(
    queue: &mut [half::bf16],
    keys: &[f32],
    k: usize,
    c: usize,
    ptr: usize,
) -> Result<usize> {
    let n = check_enqueue(queue.len(), keys.len(), k, c, ptr)?;
    for i in 0..n {
        let row = (ptr + i) % k;
        for (d, &v) in queue[row * c..(row + 1) * c]
            .iter_mut()
            .zip(&keys[i * c..(i + 1) * c])
        {
            *d = half::bf16::from_f32(v);
        }
    }
    Ok((ptr + n) % k)
}

/// CUDA: the circular enqueue of f32 keys into a queue stored in bf16 (half the memory of
/// an f32 queue), each element rounded to nearest even; returns the new pointer. The same
/// checks as [`enqueue`].
pub fn enqueue_bf16<Q, K>(
    gpu: &Gpu,
    queue: &mut Q,
    keys: &K,
    k: usize,
    c: usize,
    ptr: usize,
) -> Result<usize>
where
    Q: DeviceBufMut<half::bf16> + ?Sized,
    K: DeviceBuf<f32> + ?Sized,
{
    enqueue_launch(gpu, kernels::queue::ENQUEUE_BF16, queue, keys, (k, c, ptr))
}

/// The MoCo queue on backend `B`: K keys of dimension C, one per row, in the backend's own
/// buffer (and so its precision: f64 on [`Cpu<f64>`](crate::backend::Cpu)), and the write
/// pointer.
///
/// Initialized as the reference does (`randn(C, K)` normalized per key), from a seed, with
/// the same numbers on every backend (the f32 draws normalized in f64 and rounded to the
/// backend's scalar).
///
/// ```
/// use moco::backend::Cpu;
/// use moco::ops::Queue;
/// let be = Cpu::<f32>::new();
/// let mut q = Queue::new(&be, 8, 4, 0).unwrap();
/// q.enqueue(&vec![0.5; 3 * 4]).unwrap();
/// assert_eq!(q.ptr(), 3);
/// let torch_layout = q.to_pytorch_layout().unwrap(); // C x K, like MoCo's `queue` buffer
/// assert_eq!(torch_layout.len(), 4 * 8);
/// ```
pub struct Queue<B: Backend> {
    be: B,
    k: usize,
    c: usize,
    ptr: usize,
    keys: B::Buf,
}

impl<B: Backend> std::fmt::Debug for Queue<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("k", &self.k)
            .field("c", &self.c)
            .field("ptr", &self.ptr)
            .field("backend", &self.be.name())
            .finish()
    }
}

/// `K x C` random-normal keys, each row L2-normalized in f64, from `seed` (the queue's
/// initial state; rounded to f32 by [`initial_keys`]).
pub fn initial_keys_f64(k: usize, c: usize, seed: u64) -> Result<Vec<f64>> {
    if k == 0 || c == 0 {
        return Err(Error::invalid(format!(
            "queue needs K, C >= 1, got K={k} C={c}"
        )));
    }
    let raw: Vec<f64> = crate::rng::normal(k * c, seed ^ 0x5155_4555_4555_4555)
        .into_iter()
        .map(|v| v as f64)
        .collect();
    crate::ops::contrast::l2_normalize_host(&raw, k, c)
}

/// `K x C` random-normal keys, each row L2-normalized, from `seed`.
pub fn initial_keys(k: usize, c: usize, seed: u64) -> Result<Vec<f32>> {
    Ok(initial_keys_f64(k, c, seed)?
        .into_iter()
        .map(|v| v as f32)
        .collect())
}

impl<B: Backend> Queue<B> {
    /// A queue of K keys of dimension C on `be`, seeded.
    pub fn new(be: &B, k: usize, c: usize, seed: u64) -> Result<Self> {
        let keys = be.upload_f64(&initial_keys_f64(k, c, seed)?)?;
        Ok(Queue {
            be: be.clone(),
            k,
            c,
            ptr: 0,
            keys,
        })
    }

    /// A queue from keys already in a buffer of `be` (K x C) and a pointer.
    pub fn from_buffer(be: &B, keys: B::Buf, k: usize, c: usize, ptr: usize) -> Result<Self> {
        check_enqueue(be.len(&keys), 0, k, c, ptr)?;
        Ok(Queue {
            be: be.clone(),
            k,
            c,
            ptr,
            keys,
        })
    }

    /// A queue from host keys (K x C, rounded to the backend's scalar) and a pointer.
    pub fn from_host(be: &B, keys: &[f32], k: usize, c: usize, ptr: usize) -> Result<Self> {
        check_enqueue(keys.len(), 0, k, c, ptr)?;
        Self::from_buffer(be, be.upload_f32(keys)?, k, c, ptr)
    }

    /// The backend the keys live on.
    pub fn backend(&self) -> &B {
        &self.be
    }

    /// Number of keys K.
    pub fn len(&self) -> usize {
        self.k
    }

    /// Always false: a queue holds K >= 1 keys.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Key dimension C.
    pub fn dim(&self) -> usize {
        self.c
    }

    /// Row the next key is written to.
    pub fn ptr(&self) -> usize {
        self.ptr
    }

    /// The keys (K x C) in the backend's buffer.
    pub fn keys(&self) -> &B::Buf {
        &self.keys
    }

    /// Writes N keys (N x C, normalized as MoCo keeps them) at the pointer, wrapping
    /// around, and advances it.
    pub fn enqueue(&mut self, keys: &B::Buf) -> Result<()> {
        self.ptr = self
            .be
            .enqueue(&mut self.keys, keys, self.k, self.c, self.ptr)?;
        Ok(())
    }

    /// The keys as a host K x C matrix (f32; copies from the GPU if needed).
    pub fn to_host(&self) -> Result<Vec<f32>> {
        self.be.download_f32(&self.keys)
    }

    /// The keys as a host K x C matrix in f64 (exact for every backend).
    pub fn to_host_f64(&self) -> Result<Vec<f64>> {
        self.be.download_f64(&self.keys)
    }

    /// The keys in PyTorch MoCo's layout: the `queue` buffer is C x K (one key per column).
    pub fn to_pytorch_layout(&self) -> Result<Vec<f32>> {
        Ok(to_pytorch_layout(&self.to_host()?, self.k, self.c))
    }
}

/// Transposes a K x C queue (one key per row) into PyTorch MoCo's C x K `queue` buffer.
pub fn to_pytorch_layout<T: Copy + Default>(rows: &[T], k: usize, c: usize) -> Vec<T> {
    let mut out = vec![T::default(); k * c];
    for i in 0..k.min(rows.len() / c.max(1)) {
        for j in 0..c {
            out[j * k + i] = rows[i * c + j];
        }
    }
    out
}
