//! Momentum (EMA) update of the key encoder: `key = m * key + (1 - m) * query`.
//!
//! As in the reference MoCo, only parameters are averaged; BatchNorm running statistics
//! of the key encoder are its own and must not be passed here.
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};
use rayon::prelude::*;

use crate::backend::Scalar;
use crate::cuda::{abi::MocoEmaArgs, kernels, launch, DeviceBuf, DeviceBufMut, Gpu, BLOCK};
use crate::error::{CudaResultExt, Error, Result};

/// Elements per CPU work item; fixed so results never depend on the thread count.
const CPU_CHUNK: usize = 1 << 16;

pub(crate) fn check_momentum(m: f32) -> Result<()> {
    check_momentum_f64(m as f64)
}

/// `m` must lie in [0, 1] (every path, whatever its precision).
pub(crate) fn check_momentum_f64(m: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&m) {
        return Err(Error::invalid(format!(
            "momentum m must be in [0, 1], got {m}"
        )));
    }
    Ok(())
}

fn check_lengths(key: usize, query: usize) -> Result<()> {
    if key != query {
        return Err(Error::invalid(format!(
            "momentum update needs key and query of equal length, got {key} and {query}"
        )));
    }
    Ok(())
}

/// CPU reference: `key[i] = m * key[i] + (1 - m) * query[i]`, computed in f64 and rounded.
///
/// ```
/// let mut key = vec![1.0f32, 2.0];
/// moco::ops::momentum_update_cpu(&mut key, &[3.0, 4.0], 0.5).unwrap();
/// assert_eq!(key, vec![2.0, 3.0]);
/// assert!(moco::ops::momentum_update_cpu(&mut key, &[1.0], 0.5).is_err());
/// ```
pub fn momentum_update_cpu(key: &mut [f32], query: &[f32], m: f32) -> Result<()> {
    momentum_update_host(key, query, m as f64)
}

/// CPU reference in any [`Scalar`] precision: `m` is rounded to the scalar type first (as
/// the f32 paths take it), then `m * key + (1 - m) * query` is computed in f64 and rounded.
/// For f32 this is exactly [`momentum_update_cpu`].
///
/// ```
/// let mut key = vec![1.0f64, 2.0];
/// moco::ops::momentum_update_host(&mut key, &[3.0, 4.0], 0.999).unwrap();
/// assert!((key[0] - (0.999 * 1.0 + 0.001 * 3.0)).abs() < 1e-15);
/// ```
pub fn momentum_update_host<S: Scalar>(key: &mut [S], query: &[S], m: f64) -> Result<()> {
    check_momentum_f64(m)?;
    check_lengths(key.len(), query.len())?;
    let m64 = S::from_f64(m).to_f64();
    let omm = 1.0 - m64;
    key.par_chunks_mut(CPU_CHUNK)
        .zip(query.par_chunks(CPU_CHUNK))
        .for_each(|(k, q)| {
            for (k, &q) in k.iter_mut().zip(q) {
                *k = S::from_f64(m64 * k.to_f64() + omm * q.to_f64());
            }
        });
    Ok(())
}

/// The checks every flat EMA launch makes (`m` in [0, 1], equal lengths, one device) and
/// its arguments; `None` when there is nothing to update.
fn ema_args<K, Q>(gpu: &Gpu, key: &K, query: &Q, m: f32) -> Result<Option<MocoEmaArgs>>
where
    K: DeviceBuf<f32> + ?Sized,
    Q: DeviceBuf<f32> + ?Sized,
{
    check_momentum(m)?;
    check_lengths(key.len(), query.len())?;
    gpu.check_same_device("key", key)?;
    gpu.check_same_device("query", query)?;
    Ok((!key.is_empty()).then(|| MocoEmaArgs {
        n: key.len() as u64,
        m,
        one_minus_m: (1.0 - m as f64) as f32,
    }))
}

/// CUDA: the same update in one vectorized launch over a flat buffer on `gpu`'s stream.
///
/// Any length and alignment: a 16-byte vector path covers the aligned middle, scalar code the
/// edges. Returns an error without launching when `m` is outside [0, 1], the lengths differ,
/// or a buffer lives on another device.
///
/// `key` and `query` can be any cudarc device buffer: `CudaSlice<f32>`, or views
/// (`slice_mut(..)`, `slice(..)`) into larger buffers.
pub fn momentum_update<K, Q>(gpu: &Gpu, key: &mut K, query: &Q, m: f32) -> Result<()>
where
    K: DeviceBufMut<f32> + ?Sized,
    Q: DeviceBuf<f32> + ?Sized,
{
    let Some(args) = ema_args(gpu, key, query, m)? else {
        return Ok(());
    };
    let n = args.n;
    let cfg = LaunchConfig {
        grid_dim: (gpu.grid_for(n.div_ceil(4), 4), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    // moco_ema_f32(float*, const float*, MocoEmaArgs): key and query hold args.n elements
    // each (checked above) and the kernel touches only indices < args.n.
    launch!(gpu, kernels::momentum::EMA_F32, cfg;
        mut key.view_mut(),
        query.view(),
        args
    );
    Ok(())
}

/// CPU reference of the update that also writes the key encoder's bf16 copy (the weights
/// a bf16 forward reads): [`momentum_update_cpu`], then `key_bf16[i]` = the new `key[i]`
/// rounded to the nearest bf16 (ties to even). Nothing changes on error.
///
/// ```
/// use half::bf16;
/// let mut key = vec![1.0f32, 2.0];
/// let mut copy = vec![bf16::ZERO; 2];
/// moco::ops::momentum_update_bf16_copy_cpu(&mut key, &[3.0, 4.0], &mut copy, 0.5).unwrap();
/// assert_eq!(key, vec![2.0, 3.0]);
/// assert_eq!(copy, vec![bf16::from_f32(2.0), bf16::from_f32(3.0)]);
/// ```
pub fn momentum_update_bf16_copy_cpu(
    key: &mut [f32],
    query: &[f32],
    key_bf16: &mut [half::bf16],
    m: f32,
) -> Result<()> {
    check_momentum(m)?;
    check_lengths(key.len(), query.len())?;
    check_lengths(key.len(), key_bf16.len())?;
    momentum_update_cpu(key, query, m)?;
    for (d, &k) in key_bf16.iter_mut().zip(key.iter()) {
        *d = half::bf16::from_f32(k);
    }
    Ok(())
}

/// CUDA: [`momentum_update`] that also writes the key encoder's bf16 copy in the same pass
/// (no extra pass over the parameters): `key` is updated in f32 exactly as
/// [`momentum_update`] does, and `key_bf16` receives it rounded to nearest even. Checked
/// before launching: `m` in [0, 1], equal lengths, one device.
pub fn momentum_update_bf16_copy<K, Q, C>(
    gpu: &Gpu,
    key: &mut K,
    query: &Q,
    key_bf16: &mut C,
    m: f32,
) -> Result<()>
where
    K: DeviceBufMut<f32> + ?Sized,
    Q: DeviceBuf<f32> + ?Sized,
    C: DeviceBufMut<half::bf16> + ?Sized,
{
    check_lengths(key.len(), key_bf16.len())?;
    gpu.check_same_device("key_bf16", key_bf16)?;
    let Some(args) = ema_args(gpu, key, query, m)? else {
        return Ok(());
    };
    let n = args.n;
    let cfg = LaunchConfig {
        grid_dim: (gpu.grid_for(n, 1), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    // moco_ema_bf16copy_f32(float*, const float*, bf16*, MocoEmaArgs): all three hold
    // args.n elements (checked above).
    launch!(gpu, kernels::momentum::EMA_BF16COPY_F32, cfg;
        mut key.view_mut(),
        query.view(),
        mut key_bf16.view_mut(),
        args
    );
    Ok(())
}

/// Elements per block of the multi-tensor update (a multiple of 4 so chunk starts keep the
/// tensor's 16-byte alignment).
pub const MULTI_CHUNK: usize = 1 << 16;

/// CPU reference of the multi-tensor form: every (key, query) pair updated as
/// [`momentum_update_cpu`]. All pairs are checked before any is changed.
pub fn momentum_update_multi_cpu(pairs: &mut [(&mut [f32], &[f32])], m: f32) -> Result<()> {
    check_momentum(m)?;
    for (i, (k, q)) in pairs.iter().enumerate() {
        check_lengths(k.len(), q.len()).map_err(|e| Error::invalid(format!("pair {i}: {e}")))?;
    }
    for (k, q) in pairs.iter_mut() {
        momentum_update_cpu(k, q, m)?;
    }
    Ok(())
}

/// CUDA: updates many (key, query) tensors, wherever they live in memory, in one launch.
///
/// For parameters that are not one contiguous buffer (an embedder's per-layer tensors).
/// Each pair is cut into chunks of [`MULTI_CHUNK`] elements; block b updates chunk b. All
/// pairs are validated before the launch; on error nothing is changed.
pub fn momentum_update_multi<K, Q>(gpu: &Gpu, pairs: &mut [(&mut K, &Q)], m: f32) -> Result<()>
where
    K: DevicePtrMut<f32>,
    Q: DevicePtr<f32>,
{
    use crate::cuda::abi::{MocoTensorChunk, MocoTensorPair};
    check_momentum(m)?;
    for (i, (k, q)) in pairs.iter().enumerate() {
        check_lengths(k.len(), q.len()).map_err(|e| Error::invalid(format!("pair {i}: {e}")))?;
        gpu.check_same_device::<f32, K>(&format!("key {i}"), *k)?;
        gpu.check_same_device::<f32, Q>(&format!("query {i}"), *q)?;
    }
    if pairs.len() > u32::MAX as usize {
        return Err(Error::invalid("too many tensor pairs for one launch"));
    }
    let stream = gpu.stream();
    let mut table = Vec::with_capacity(pairs.len());
    let mut chunks = Vec::new();
    let mut guards = Vec::with_capacity(2 * pairs.len());
    for (i, (k, q)) in pairs.iter_mut().enumerate() {
        let len = k.len();
        let (kp, ks) = k.device_ptr_mut(stream);
        let (qp, qs) = q.device_ptr(stream);
        guards.push(ks);
        guards.push(qs);
        table.push(MocoTensorPair {
            key: kp,
            query: qp,
            len: len as u64,
        });
        for start in (0..len).step_by(MULTI_CHUNK) {
            chunks.push(MocoTensorChunk {
                pair: i as u32,
                reserved: 0,
                start: start as u64,
            });
        }
    }
    if chunks.is_empty() {
        return Ok(());
    }
    if chunks.len() > i32::MAX as usize {
        return Err(Error::invalid("too many chunks for one launch"));
    }
    let table_d = stream.clone_htod(&table).call("cuMemcpyHtoDAsync")?;
    let chunks_d = stream.clone_htod(&chunks).call("cuMemcpyHtoDAsync")?;
    let cfg = LaunchConfig {
        grid_dim: (chunks.len() as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    // moco_ema_multi_f32(const MocoTensorPair*, const MocoTensorChunk*, u64, float, float):
    // the table holds the addresses and lengths of live buffers (the kernel's ABI is a
    // table of raw addresses; their guards are held until after the launch), every chunk's
    // start is < its pair's length and the kernel clamps each chunk to the pair's end; one
    // block per chunk.
    launch!(gpu, kernels::momentum::EMA_MULTI_F32, cfg;
        table_d.as_view(),
        chunks_d.as_view(),
        MULTI_CHUNK as u64,
        m,
        (1.0 - m as f64) as f32
    );
    drop(guards);
    Ok(())
}
