//! Driver probes: whether libcuda loads, how many GPUs it reports and what they are. They
//! never panic (a bare cudarc call does when libcuda is missing), and depend on nothing
//! else in the crate, so [`crate::device`] and [`crate::cuda`] both build on them.
use crate::error::{CudaResultExt, Result};

/// What the driver reports about one GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    /// Ordinal (the N in `cuda:N`).
    pub ordinal: usize,
    /// Marketing name, e.g. "NVIDIA H200".
    pub name: String,
    /// Total memory in bytes.
    pub total_memory: usize,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Number of streaming multiprocessors.
    pub multiprocessors: i32,
}

/// True when the CUDA driver library can be loaded (never panics, unlike a bare cudarc call).
pub fn cuda_driver_present() -> bool {
    // SAFETY: is_culib_present only tries to dlopen libcuda and drops the handle.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Number of CUDA GPUs (0 when there is no driver or the driver fails to initialize).
pub fn cuda_device_count() -> usize {
    if !cuda_driver_present() {
        return 0;
    }
    cudarc::driver::CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .unwrap_or(0)
}

/// Lists the CUDA GPUs the driver reports. Errors only when the driver exists but fails.
pub fn list_gpus() -> Result<Vec<GpuInfo>> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    if !cuda_driver_present() {
        return Ok(Vec::new());
    }
    let n = cudarc::driver::CudaContext::device_count().call("cuDeviceGetCount")?;
    let mut out = Vec::new();
    for ordinal in 0..n.max(0) as usize {
        let ctx = cudarc::driver::CudaContext::new(ordinal).call("cuDevicePrimaryCtxRetain")?;
        out.push(GpuInfo {
            ordinal,
            name: ctx.name().call("cuDeviceGetName")?,
            total_memory: ctx.total_mem().call("cuDeviceTotalMem")?,
            compute_capability: ctx.compute_capability().call("cuDeviceGetAttribute")?,
            multiprocessors: ctx
                .attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .call("cuDeviceGetAttribute")?,
        });
    }
    Ok(out)
}
