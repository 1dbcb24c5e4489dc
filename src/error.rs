//! The crate's one error type.
use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in moco, each with a message that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CUDA driver library (libcuda) could not be loaded.
    #[error("no CUDA driver found (libcuda.so could not be loaded); install an NVIDIA driver for CUDA >= 13.0 or use --device cpu")]
    NoDriver,
    /// The driver loaded but reports no GPU, or not the ordinal asked for.
    #[error("no CUDA GPU {ordinal} (found {found}); pick another with --device cuda:N or use --device cpu")]
    NoGpu {
        /// The ordinal asked for.
        ordinal: usize,
        /// How many GPUs the driver reports.
        found: usize,
    },
    /// This build was made without nvcc, so it carries no kernels.
    #[error("this build of moco has no CUDA kernels (nvcc was not found at build time); run scripts/install-cuda-toolchain and rebuild, or use --device cpu")]
    NoKernels,
    /// The GPU ran out of memory.
    #[error("out of GPU memory during {call}; use a smaller batch or queue")]
    OutOfMemory {
        /// The CUDA call that failed.
        call: &'static str,
    },
    /// Any other CUDA error, with the call that raised it.
    #[error("CUDA error in {call}: {source}")]
    Cuda {
        /// The CUDA call that failed.
        call: &'static str,
        /// The driver's error.
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS error in {call}: {message}")]
    Cublas {
        /// The cuBLAS call that failed.
        call: &'static str,
        /// The library's message.
        message: String,
    },
    /// A cuDNN call failed, or cuDNN could not be loaded.
    #[error("cuDNN error in {call}: {message}")]
    Cudnn {
        /// The cuDNN call that failed.
        call: &'static str,
        /// The library's status or message.
        message: String,
    },
    /// An argument was invalid (shape, length, range); nothing was launched or changed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Buffers live on different devices, or on a device other than the stream's.
    #[error("device mismatch: {0}")]
    DeviceMismatch(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A data file is malformed.
    #[error("{path}: {message}")]
    Data {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Training diverged (NaN or Inf).
    #[error("training diverged: {0}")]
    Diverged(String),
    /// A collective of a distributed run failed: a rank left, timed out or disagreed.
    #[error("distributed run: {0}")]
    Comm(String),
    /// Something else, with a message.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Wraps a driver error with the call that raised it; out-of-memory gets its own variant.
    pub fn cuda(call: &'static str, source: cudarc::driver::DriverError) -> Self {
        use cudarc::driver::sys::CUresult;
        if source.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            Error::OutOfMemory { call }
        } else {
            Error::Cuda { call, source }
        }
    }
}

/// Adds the name of the CUDA call to a driver result.
pub(crate) trait CudaResultExt<T> {
    fn call(self, call: &'static str) -> Result<T>;
}

impl<T> CudaResultExt<T> for std::result::Result<T, cudarc::driver::DriverError> {
    fn call(self, call: &'static str) -> Result<T> {
        self.map_err(|e| Error::cuda(call, e))
    }
}
