//! The CUDA runtime: a context and stream on one GPU, the embedded kernel images loaded once,
//! and their functions cached.
//!
//! [`Gpu`] is the handle every CUDA operation takes. Embedders that already own a cudarc
//! stream wrap it with [`Gpu::from_stream`] and call the operations on their own
//! `CudaSlice<f32>` buffers.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, DeviceSlice,
};

use crate::error::{CudaResultExt, Error, Result};

pub mod abi;
pub mod driver;

mod images {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// True when this build embeds the CUDA kernels (nvcc was found at build time).
pub fn kernels_available() -> bool {
    !images::KERNEL_IMAGES.is_empty()
}

/// Names of the embedded kernel modules (one per `kernels/*.cu`).
pub fn kernel_modules() -> Vec<&'static str> {
    images::KERNEL_IMAGES.iter().map(|(n, _)| *n).collect()
}

/// The GPU targets the embedded images were compiled for, e.g. `sm_80,sm_90,compute_90`.
pub fn kernel_targets() -> &'static str {
    images::KERNEL_TARGETS
}

/// Size in bytes of the embedded image of one module, if present.
pub fn kernel_image_len(module: &str) -> Option<usize> {
    images::KERNEL_IMAGES
        .iter()
        .find(|(n, _)| *n == module)
        .map(|(_, b)| b.len())
}

/// Threads per block of the elementwise kernels.
pub(crate) const BLOCK: u32 = 256;

/// A CUDA GPU: context, stream, and the moco kernels loaded into that context.
///
/// Cheap to clone (shared state). All moco operations enqueue on [`Gpu::stream`].
#[derive(Clone)]
pub struct Gpu {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    sm_count: u32,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.inner.ctx.ordinal())
            .field("sm_count", &self.inner.sm_count)
            .finish()
    }
}

impl Gpu {
    /// Opens GPU `ordinal` with a new stream.
    ///
    /// Errors (never panics) when the driver is missing, the GPU does not exist, or this build
    /// has no kernels.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        if !kernels_available() {
            return Err(Error::NoKernels);
        }
        if !driver::cuda_driver_present() {
            return Err(Error::NoDriver);
        }
        let found = CudaContext::device_count().call("cuDeviceGetCount")?.max(0) as usize;
        if ordinal >= found {
            return Err(Error::NoGpu { ordinal, found });
        }
        let ctx = CudaContext::new(ordinal).call("cuDevicePrimaryCtxRetain")?;
        let stream = ctx.new_stream().call("cuStreamCreate")?;
        Self::from_stream(stream)
    }

    /// Wraps a stream the caller already owns (its context must be current-capable).
    ///
    /// The moco operations then run on that stream, so they order correctly with the
    /// caller's own work. The kernel image is loaded into the stream's context once per
    /// `Gpu`; clone the `Gpu` rather than calling this repeatedly.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Gpu> {
        if !kernels_available() {
            return Err(Error::NoKernels);
        }
        let ctx = stream.context().clone();
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .call("cuDeviceGetAttribute")?
            .max(1) as u32;
        Ok(Gpu {
            inner: Arc::new(Inner {
                ctx,
                stream,
                modules: Mutex::new(HashMap::new()),
                functions: Mutex::new(HashMap::new()),
                sm_count,
            }),
        })
    }

    /// The stream every operation enqueues on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }

    /// Device ordinal.
    pub fn ordinal(&self) -> usize {
        self.inner.ctx.ordinal()
    }

    /// Number of streaming multiprocessors (for grid sizing).
    pub fn sm_count(&self) -> u32 {
        self.inner.sm_count
    }

    /// Waits for all work on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.stream.synchronize().call("cuStreamSynchronize")
    }

    /// Looks up kernel `name` in module `module`, loading the module on first use.
    pub fn function(&self, module: &'static str, name: &'static str) -> Result<CudaFunction> {
        if let Some(f) = self
            .inner
            .functions
            .lock()
            .expect("function cache")
            .get(name)
        {
            return Ok(f.clone());
        }
        let m = self.module(module)?;
        let f = m.load_function(name).call("cuModuleGetFunction")?;
        self.inner
            .functions
            .lock()
            .expect("function cache")
            .insert(name, f.clone());
        Ok(f)
    }

    fn module(&self, module: &'static str) -> Result<Arc<CudaModule>> {
        let mut mods = self.inner.modules.lock().expect("module cache");
        if let Some(m) = mods.get(module) {
            return Ok(m.clone());
        }
        let image = images::KERNEL_IMAGES
            .iter()
            .find(|(n, _)| *n == module)
            .map(|(_, b)| *b)
            .ok_or(Error::NoKernels)?;
        // Copy into an owned (malloc-aligned) buffer: the driver wants the fatbin aligned.
        let ptx = cudarc::nvrtc::Ptx::from_binary(image.to_vec());
        let m = self.inner.ctx.load_module(ptx).call("cuModuleLoadData")?;
        mods.insert(module, m.clone());
        Ok(m)
    }

    /// Grid size for a grid-stride elementwise kernel over `n` items of `per_thread` each.
    pub(crate) fn grid_for(&self, n: u64, per_thread: u64) -> u32 {
        let blocks = n.div_ceil(per_thread.max(1) * BLOCK as u64).max(1);
        // Enough resident blocks to fill every SM several times over, no more.
        blocks.min(self.inner.sm_count as u64 * 8) as u32
    }

    /// Copies a host slice to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.inner.stream.clone_htod(host).call("cuMemcpyHtoDAsync")
    }

    /// Copies a device buffer back to the host (synchronizes the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        self.inner.stream.clone_dtoh(dev).call("cuMemcpyDtoHAsync")
    }

    /// A zero-filled device buffer of `n` elements.
    pub fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        self.inner.stream.alloc_zeros(n).call("cuMemAllocAsync")
    }

    /// Checks that a buffer lives in this GPU's context.
    pub(crate) fn check_same_device<T, B: DeviceSlice<T> + ?Sized>(
        &self,
        what: &str,
        buf: &B,
    ) -> Result<()> {
        let ctx = buf.stream().context();
        if **ctx != *self.inner.ctx {
            return Err(Error::DeviceMismatch(format!(
                "{what} is on cuda:{} but the stream is on cuda:{}",
                ctx.ordinal(),
                self.inner.ctx.ordinal()
            )));
        }
        Ok(())
    }
}
