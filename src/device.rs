//! Devices: the CPU reference backend or a CUDA GPU, and what this machine has (the
//! driver probes live in [`crate::cuda::driver`] and are re-exported here).
use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

pub use crate::cuda::driver::{cuda_device_count, cuda_driver_present, list_gpus, GpuInfo};

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
