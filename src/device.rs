//! Devices: the CPU reference backend or a CUDA GPU, and what this machine has.
use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Where computation runs.
///
/// ```
/// use moco::Device;
/// let d: Device = "cuda:1".parse().unwrap();
/// assert_eq!(d, Device::Cuda(1));
/// assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
/// assert!("tpu".parse::<Device>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// The CPU reference backend (multi-threaded).
    #[default]
    Cpu,
    /// The CUDA GPU with this ordinal.
    Cuda(usize),
}

impl Device {
    /// The first CUDA GPU when the driver, a GPU and the kernels are all present, else the CPU.
    pub fn auto() -> Device {
        if crate::cuda::kernels_available() && cuda_device_count() > 0 {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }
    }

    /// True for a CUDA device.
    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

/// A device as a config or a flag names it: `auto`, `cpu`, `cuda`, `cuda:N`. `auto` stays
/// `auto` in a saved config and is resolved ([`DeviceSpec::resolve`]) where the run starts,
/// so a checkpoint resumes on whatever the next machine has.
///
/// ```
/// use moco::{Device, DeviceSpec};
/// assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
/// assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Is(Device::Cuda(1)));
/// assert_eq!(DeviceSpec::Is(Device::Cpu).resolve(), Device::Cpu);
/// assert!("tpu".parse::<DeviceSpec>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceSpec {
    /// The first usable GPU, else the CPU ([`Device::auto`]).
    #[default]
    Auto,
    /// This device.
    Is(Device),
}

impl DeviceSpec {
    /// The device on this machine.
    pub fn resolve(self) -> Device {
        match self {
            DeviceSpec::Auto => Device::auto(),
            DeviceSpec::Is(d) => d,
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Is(d) => d.fmt(f),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.trim().eq_ignore_ascii_case("auto") {
            Ok(DeviceSpec::Auto)
        } else {
            s.parse().map(DeviceSpec::Is)
        }
    }
}

serde_via_str!(DeviceSpec);

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            "auto" => Ok(Device::auto()),
            _ => {
                if let Some(n) = s.strip_prefix("cuda:") {
                    n.parse()
                        .map(Device::Cuda)
                        .map_err(|_| Error::invalid(format!("bad device {s:?}: expected cuda:N")))
                } else {
                    Err(Error::invalid(format!(
                        "unknown device {s:?}: expected cpu, cuda, cuda:N or auto"
                    )))
                }
            }
        }
    }
}

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
    use crate::error::CudaResultExt;
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
