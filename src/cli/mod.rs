//! Subcommands of the `moco` binary.
pub mod bench;
pub mod bench_data;
pub mod eval;
pub mod export;
pub mod info;
pub mod train;

use moco::backend::cuda::CudaOptions;
use moco::backend::Backend;
use moco::backend::{Cpu, Cuda};
use moco::{Device, Result};

/// Work generic over the backend, run on the device the user picked.
pub trait Job {
    /// What the job returns.
    type Out;
    /// Runs on backend `be`.
    fn run<B: Backend>(self, be: B) -> Result<Self::Out>;
}

/// Resolves `device` (`auto` included), sets up its backend (on a GPU with `opts`: the
/// convolution backend, TF32) and runs `job` on it.
pub fn dispatch<J: Job>(device: &str, opts: CudaOptions, job: J) -> Result<J::Out> {
    let dev: Device = device.parse()?;
    match dev {
        Device::Cpu => job.run(Cpu::<f32>::new()),
        Device::Cuda(i) => {
            let gpu = moco::cuda::Gpu::new(i)?;
            let be = Cuda::with_options(gpu, opts)?;
            if let Some(why) = be.conv_fallback() {
                eprintln!("moco: {why}");
            }
            job.run(be)
        }
    }
}

/// Sets the size of the CPU thread pool (0 = all cores). Must run before any parallel work.
pub fn set_threads(threads: usize) -> Result<()> {
    if threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .map_err(|e| moco::Error::Other(format!("cannot set --threads: {e}")))?;
    }
    Ok(())
}
