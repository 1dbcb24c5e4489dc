//! `moco info`: version, kernels, devices.
use clap::Args;
use moco::Result;

/// Arguments of `moco info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Also describe this encoder: resnet8, resnet20, resnet18-cifar, resnet18, resnet50.
    #[arg(long)]
    pub arch: Option<String>,
    /// With --arch: the MoCo v2 MLP head instead of the linear head.
    #[arg(long)]
    pub mlp: bool,
    /// With --arch: output feature dimension of the head.
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    /// With --arch: input channels (1 or 3).
    #[arg(long, default_value_t = 3)]
    pub in_channels: usize,
    /// With --arch: print every state-dict tensor's name and shape.
    #[arg(long)]
    pub verbose: bool,
}

/// Prints the encoder's parameter counts (and, verbose, every tensor) for `--arch`.
fn describe_arch(args: &InfoArgs, arch: &str) -> Result<()> {
    let cfg = moco::model::EncoderConfig {
        arch: arch.parse()?,
        in_channels: args.in_channels,
        dim: args.dim,
        mlp: args.mlp,
    };
    let t = moco::model::ParamTable::for_config(&cfg)?;
    println!("arch: {}", cfg.arch);
    println!(
        "head: {}",
        if cfg.mlp {
            "mlp (fc.0, relu, fc.2)"
        } else {
            "linear (fc)"
        }
    );
    println!("in_channels: {}", cfg.in_channels);
    println!("feature_dim: {}", cfg.arch.feature_dim());
    println!("dim: {}", cfg.dim);
    println!("backbone_params: {}", t.backbone_params());
    println!("head_params: {}", t.head_params());
    println!("total_params: {}", t.num_params());
    println!("bn_buffers: {}", t.num_buffers());
    if args.verbose {
        for e in t.entries() {
            let kind = match e.storage {
                moco::model::Storage::Param => "param",
                _ => "buffer",
            };
            println!("{} {:?} {}", e.name, e.shape, kind);
        }
    }
    Ok(())
}

/// Prints version, kernel status and GPUs, one `key: value` per line; with `--arch`,
/// only the encoder's description.
pub fn run(args: InfoArgs) -> Result<()> {
    if let Some(arch) = &args.arch {
        return describe_arch(&args, arch);
    }
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
    if let Some(v) = moco::backend::cuda::cudnn_version() {
        println!("cudnn: {v} (--conv cudnn or auto)");
    } else {
        println!("cudnn: not found (convolutions use im2col + SGEMM)");
    }
    {
        use moco::dist::nccl::{nccl_status, nccl_version, NcclStatus};
        match nccl_status() {
            NcclStatus::Loadable => match nccl_version() {
                Some((a, b, c)) => println!("nccl: {a}.{b}.{c}"),
                None => println!("nccl: loadable, version unknown"),
            },
            NcclStatus::NeedsLink(p) => println!(
                "nccl: {} (needs a libnccl.so link for cudarc; moco train --gpus makes one)",
                p.display()
            ),
            NcclStatus::Missing => println!("nccl: not found (multi-GPU runs need NCCL 2)"),
        }
    }
    println!("default_device: {}", moco::Device::auto());
    println!("cpu_threads: {}", rayon::current_num_threads());
    Ok(())
}
