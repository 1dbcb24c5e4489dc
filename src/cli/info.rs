//! `moco info`: version, kernels, devices.
use clap::Args;
use moco::Result;

/// Arguments of `moco info`.
#[derive(Args, Debug)]
pub struct InfoArgs {}

/// Prints version, kernel status and GPUs, one `key: value` per line.
pub fn run(_args: InfoArgs) -> Result<()> {
    println!("moco: {}", moco::VERSION);
    if moco::cuda::kernels_available() {
        println!("kernels: yes ({})", moco::cuda::kernel_targets());
        println!("kernel_modules: {}", moco::cuda::kernel_modules().join(","));
    } else {
        println!("kernels: no (built without nvcc; run scripts/install-cuda-toolchain and rebuild to get the CUDA kernels)");
    }
    if !moco::device::cuda_driver_present() {
        println!("cuda_driver: not found (CPU only)");
    } else {
        let gpus = moco::device::list_gpus()?;
        println!("cuda_driver: found, {} GPU(s)", gpus.len());
        for g in gpus {
            println!(
                "gpu{}: {}, {:.1} GiB, compute capability {}.{}, {} SMs",
                g.ordinal,
                g.name,
                g.total_memory as f64 / (1u64 << 30) as f64,
                g.compute_capability.0,
                g.compute_capability.1,
                g.multiprocessors
            );
        }
    }
    println!("default_device: {}", moco::Device::auto());
    println!("cpu_threads: {}", rayon::current_num_threads());
    Ok(())
}
