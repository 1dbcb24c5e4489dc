//! The queue of keys: a K x C circular buffer (one key per row) and its enqueue.
//!
//! Unlike the reference implementation, which asserts `K % N == 0`, a batch that runs past
//! the end wraps around to the start. `N > K` is an error (the batch would overwrite itself).
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use crate::cuda::{abi::MocoEnqueueArgs, Gpu, BLOCK};
use crate::error::{CudaResultExt, Error, Result};

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
pub fn enqueue_cpu(
    queue: &mut [f32],
    keys: &[f32],
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
    Q: DevicePtrMut<f32>,
    K: DevicePtr<f32>,
{
    let n = check_enqueue(queue.len(), keys.len(), k, c, ptr)?;
    gpu.check_same_device::<f32, Q>("queue", queue)?;
    gpu.check_same_device::<f32, K>("keys", keys)?;
    if n == 0 {
        return Ok(ptr);
    }
    let f = gpu.function("queue", "moco_enqueue_f32")?;
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
    let stream = gpu.stream();
    let (qp, _qs) = queue.device_ptr_mut(stream);
    let (kp, _ks) = keys.device_ptr(stream);
    let mut l = stream.launch_builder(&f);
    l.arg(&qp).arg(&kp).arg(&args);
    // SAFETY: (float*, const float*, MocoEnqueueArgs) matches; keys hold n*c floats, the queue
    // k*c, and every destination row (ptr + i) mod k is < k (ptr < k, n <= k checked above).
    unsafe { l.launch(cfg) }.call("cuLaunchKernel(moco_enqueue_f32)")?;
    Ok((ptr + n) % k)
}

/// Where a [`Queue`] keeps its keys.
pub enum QueueStorage {
    /// Host memory.
    Cpu(Vec<f32>),
    /// Device memory on this GPU.
    Cuda(CudaSlice<f32>, Gpu),
}

/// The MoCo queue: K keys of dimension C, one per row, and the write pointer.
///
/// Initialized as the reference does (`randn(C, K)` normalized per key), from a seed, with the
/// same numbers on every device.
///
/// ```
/// use moco::ops::Queue;
/// let mut q = Queue::new_cpu(8, 4, 0).unwrap();
/// q.enqueue_cpu(&[0.5; 3 * 4]).unwrap();
/// assert_eq!(q.ptr(), 3);
/// let torch_layout = q.to_pytorch_layout().unwrap(); // C x K, like MoCo's `queue` buffer
/// assert_eq!(torch_layout.len(), 4 * 8);
/// ```
pub struct Queue {
    k: usize,
    c: usize,
    ptr: usize,
    storage: QueueStorage,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dev = match &self.storage {
            QueueStorage::Cpu(_) => "cpu".to_string(),
            QueueStorage::Cuda(_, g) => format!("cuda:{}", g.ordinal()),
        };
        f.debug_struct("Queue")
            .field("k", &self.k)
            .field("c", &self.c)
            .field("ptr", &self.ptr)
            .field("device", &dev)
            .finish()
    }
}

/// `K x C` random-normal keys, each row L2-normalized, from `seed`.
pub fn initial_keys(k: usize, c: usize, seed: u64) -> Result<Vec<f32>> {
    if k == 0 || c == 0 {
        return Err(Error::invalid(format!(
            "queue needs K, C >= 1, got K={k} C={c}"
        )));
    }
    let raw = crate::testing::normal(k * c, seed ^ 0x5155_4555_4555_4555);
    Ok(crate::ops::contrast::l2_normalize_cpu(&raw, k, c)?.0)
}

impl Queue {
    /// A host queue of K keys of dimension C.
    pub fn new_cpu(k: usize, c: usize, seed: u64) -> Result<Queue> {
        Ok(Queue {
            k,
            c,
            ptr: 0,
            storage: QueueStorage::Cpu(initial_keys(k, c, seed)?),
        })
    }

    /// A device queue on `gpu`, with the same initial keys as [`Queue::new_cpu`].
    pub fn new_cuda(gpu: &Gpu, k: usize, c: usize, seed: u64) -> Result<Queue> {
        let host = initial_keys(k, c, seed)?;
        Ok(Queue {
            k,
            c,
            ptr: 0,
            storage: QueueStorage::Cuda(gpu.upload(&host)?, gpu.clone()),
        })
    }

    /// Rebuilds a queue from saved keys (K x C) and pointer, on the CPU or `gpu`.
    pub fn from_parts(
        keys: Vec<f32>,
        k: usize,
        c: usize,
        ptr: usize,
        gpu: Option<&Gpu>,
    ) -> Result<Queue> {
        check_enqueue(keys.len(), 0, k, c, ptr)?;
        let storage = match gpu {
            None => QueueStorage::Cpu(keys),
            Some(g) => QueueStorage::Cuda(g.upload(&keys)?, g.clone()),
        };
        Ok(Queue { k, c, ptr, storage })
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

    /// The storage (host vector or device buffer).
    pub fn storage(&self) -> &QueueStorage {
        &self.storage
    }

    /// The host keys (K x C), if the queue lives on the CPU.
    pub fn host(&self) -> Option<&[f32]> {
        match &self.storage {
            QueueStorage::Cpu(v) => Some(v),
            QueueStorage::Cuda(..) => None,
        }
    }

    /// The device keys (K x C), if the queue lives on a GPU.
    pub fn device(&self) -> Option<&CudaSlice<f32>> {
        match &self.storage {
            QueueStorage::Cuda(d, _) => Some(d),
            QueueStorage::Cpu(_) => None,
        }
    }

    /// Enqueues host keys (N x C) into a host queue.
    pub fn enqueue_cpu(&mut self, keys: &[f32]) -> Result<()> {
        match &mut self.storage {
            QueueStorage::Cpu(v) => {
                self.ptr = enqueue_cpu(v, keys, self.k, self.c, self.ptr)?;
                Ok(())
            }
            QueueStorage::Cuda(..) => Err(Error::invalid(
                "enqueue_cpu on a queue that lives on the GPU",
            )),
        }
    }

    /// Enqueues device keys (N x C) into a device queue.
    pub fn enqueue_cuda<K: DevicePtr<f32>>(&mut self, keys: &K) -> Result<()> {
        match &mut self.storage {
            QueueStorage::Cuda(d, gpu) => {
                self.ptr = enqueue(gpu, d, keys, self.k, self.c, self.ptr)?;
                Ok(())
            }
            QueueStorage::Cpu(_) => Err(Error::invalid(
                "enqueue_cuda on a queue that lives on the CPU",
            )),
        }
    }

    /// The keys as a host K x C matrix (copies from the GPU if needed).
    pub fn to_host(&self) -> Result<Vec<f32>> {
        match &self.storage {
            QueueStorage::Cpu(v) => Ok(v.clone()),
            QueueStorage::Cuda(d, gpu) => gpu.download(d),
        }
    }

    /// The keys in PyTorch MoCo's layout: the `queue` buffer is C x K (one key per column).
    pub fn to_pytorch_layout(&self) -> Result<Vec<f32>> {
        let rows = self.to_host()?;
        let (k, c) = (self.k, self.c);
        let mut out = vec![0.0f32; k * c];
        for i in 0..k {
            for j in 0..c {
                out[j * k + i] = rows[i * c + j];
            }
        }
        Ok(out)
    }
}
