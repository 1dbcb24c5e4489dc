//! Momentum (EMA) update of the key encoder: `key = m * key + (1 - m) * query`.
//!
//! As in the reference MoCo, only parameters are averaged; BatchNorm running statistics
//! of the key encoder are its own and must not be passed here.
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use rayon::prelude::*;

use crate::cuda::{abi::MocoEmaArgs, Gpu, BLOCK};
use crate::error::{CudaResultExt, Error, Result};

/// Elements per CPU work item; fixed so results never depend on the thread count.
const CPU_CHUNK: usize = 1 << 16;

pub(crate) fn check_momentum(m: f32) -> Result<()> {
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
    check_momentum(m)?;
    check_lengths(key.len(), query.len())?;
    let m64 = m as f64;
    let omm = 1.0 - m64;
    key.par_chunks_mut(CPU_CHUNK)
        .zip(query.par_chunks(CPU_CHUNK))
        .for_each(|(k, q)| {
            for (k, &q) in k.iter_mut().zip(q) {
                *k = (m64 * *k as f64 + omm * q as f64) as f32;
            }
        });
    Ok(())
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
    K: DevicePtrMut<f32>,
    Q: DevicePtr<f32>,
{
    check_momentum(m)?;
    check_lengths(key.len(), query.len())?;
    gpu.check_same_device("key", key)?;
    gpu.check_same_device("query", query)?;
    let n = key.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function("momentum", "moco_ema_f32")?;
    let args = MocoEmaArgs {
        n,
        m,
        one_minus_m: (1.0 - m as f64) as f32,
    };
    let cfg = LaunchConfig {
        grid_dim: (gpu.grid_for(n.div_ceil(4), 4), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = gpu.stream();
    let (k_ptr, _k_sync) = key.device_ptr_mut(stream);
    let (q_ptr, _q_sync) = query.device_ptr(stream);
    let mut launch = stream.launch_builder(&f);
    launch.arg(&k_ptr).arg(&q_ptr).arg(&args);
    // SAFETY: moco_ema_f32(float*, const float*, MocoEmaArgs) matches the arguments pushed
    // (device addresses are 64-bit values); key and query hold args.n elements each (checked
    // above) and the kernel touches only indices < args.n. The sync guards are dropped
    // after the launch is enqueued, as cudarc requires.
    unsafe { launch.launch(cfg) }.call("cuLaunchKernel(moco_ema_f32)")?;
    Ok(())
}
