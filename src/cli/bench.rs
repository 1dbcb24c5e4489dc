//! `moco bench`: end-to-end training-step throughput, as one JSON line.
use std::time::Instant;

use clap::Args;
use moco::backend::Backend;
use moco::train::{TrainConfig, Trainer};
use moco::{Error, Result};

use super::Job;

/// Flags of `moco bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Backbone. [resnet18-cifar]
    #[arg(long, default_value = "resnet18-cifar")]
    pub arch: moco::model::Arch,
    /// Images per step. [256]
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Side of the (synthetic) images. [32]
    #[arg(long, default_value_t = 32)]
    pub image_size: usize,
    /// Queue length K. [4096]
    #[arg(long, default_value_t = 4096)]
    pub moco_k: usize,
    /// MLP head.
    #[arg(long)]
    pub mlp: bool,
    /// auto, cpu, cuda, cuda:N. [auto]
    #[arg(long, default_value = "auto")]
    pub device: moco::DeviceSpec,
    /// Convolutions on the GPU: im2col, cudnn or auto. [im2col]
    #[arg(long, default_value = "im2col", value_name = "im2col|cudnn|auto")]
    pub conv: moco::backend::cuda::ConvBackend,
    /// TF32 tensor cores for GPU convolutions and GEMMs (default: real fp32).
    #[arg(long)]
    pub tf32: bool,
    /// Timed steps. [20]
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed warm-up steps. [3]
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Data-loading workers. [4]
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// InfoNCE implementation on the GPU: fused, unfused. [fused]
    #[arg(long, default_value = "fused")]
    pub infonce: moco::ops::InfoNceImpl,
    /// Print the time share of every CPU-backend operation over the timed steps (to
    /// stderr; the CPU backend only).
    #[arg(long)]
    pub profile: bool,
}

struct BenchJob {
    cfg: TrainConfig,
    steps: usize,
    warmup: usize,
    profile: bool,
}

impl Job for BenchJob {
    type Out = String;
    fn run<B: Backend>(self, be: B) -> Result<String> {
        let name = be.name();
        let mut t = Trainer::new(self.cfg.clone(), be)?;
        let loader = t.loader().clone();
        // Data loading excluded: one prepared batch, stepped repeatedly.
        let batch = loader.batch(0, 0)?;
        for _ in 0..self.warmup {
            t.step(&batch)?;
        }
        moco::backend::cpu::profile::take();
        moco::backend::cpu::profile::enable(self.profile);
        let t0 = Instant::now();
        for _ in 0..self.steps {
            t.step(&batch)?;
        }
        let compute = t0.elapsed().as_secs_f64();
        moco::backend::cpu::profile::enable(false);
        if self.profile {
            print_profile(&moco::backend::cpu::profile::take(), compute, self.steps);
        }
        // Data loading included: the prefetching loader feeds the steps.
        let t0 = Instant::now();
        let mut done = 0;
        let mut epoch = 1u64;
        while done < self.steps {
            let mut it = loader.epoch(epoch);
            while let Some(b) = it.try_next() {
                t.step(&b?)?;
                done += 1;
                if done == self.steps {
                    break;
                }
            }
            epoch += 1;
        }
        let with_data = t0.elapsed().as_secs_f64();
        let n = (self.steps * self.cfg.batch_size) as f64;
        Ok(format!(
            "{{\"arch\":\"{}\",\"batch_size\":{},\"image_size\":{},\"moco_k\":{},\"device\":\"{}\",\"steps\":{},\"ms_per_step\":{:.3},\"images_per_sec\":{:.1},\"images_per_sec_with_data\":{:.1},\"infonce\":\"{}\",\"conv\":\"{}\",\"tf32\":{}}}",
            self.cfg.arch,
            self.cfg.batch_size,
            self.cfg.image_size,
            self.cfg.moco_k,
            name,
            self.steps,
            1e3 * compute / self.steps as f64,
            n / compute,
            n / with_data,
            self.cfg.infonce,
            self.cfg.conv,
            self.cfg.tf32
        ))
    }
}

/// The op table of `--profile`: time per step and share of the timed steps, on stderr.
fn print_profile(ops: &[moco::backend::cpu::profile::OpTime], total: f64, steps: usize) {
    if ops.is_empty() {
        eprintln!(
            "profile: no CPU-backend operations were timed (the profiler covers --device cpu)"
        );
        return;
    }
    let per = |s: f64| 1e3 * s / steps as f64;
    eprintln!("{:>9} {:>6} {:>6}  operation", "ms/step", "share", "calls");
    let mut sum = 0.0;
    for o in ops {
        sum += o.secs;
        eprintln!(
            "{:>9.2} {:>5.1}% {:>6}  {}",
            per(o.secs),
            100.0 * o.secs / total,
            o.calls / steps as u64,
            o.name
        );
    }
    let rest = (total - sum).max(0.0);
    eprintln!(
        "{:>9.2} {:>5.1}% {:>6}  (outside the backend's operations)",
        per(rest),
        100.0 * rest / total,
        ""
    );
    eprintln!("{:>9.2} 100.0% {:>6}  step", per(total), "");
}

/// Runs `moco bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    if a.steps == 0 {
        return Err(Error::invalid("--steps must be >= 1"));
    }
    super::set_threads(a.threads)?;
    let mut cfg = TrainConfig::preset("cifar")?;
    cfg.arch = a.arch;
    cfg.batch_size = a.batch_size;
    cfg.image_size = a.image_size;
    cfg.moco_k = a.moco_k;
    cfg.mlp = a.mlp;
    cfg.workers = a.workers;
    cfg.infonce = a.infonce;
    cfg.bn_splits = if a.batch_size.is_multiple_of(8) { 8 } else { 1 };
    cfg.epochs = 1;
    cfg.device = a.device;
    cfg.conv = a.conv;
    cfg.tf32 = a.tf32;
    cfg.validate()?;
    let device = a.device.resolve().to_string();
    let line = super::dispatch(
        &device,
        moco::backend::cuda::CudaOptions {
            conv: a.conv,
            tf32: a.tf32,
        },
        BenchJob {
            cfg,
            steps: a.steps,
            warmup: a.warmup,
            profile: a.profile,
        },
    )?;
    println!("{line}");
    Ok(())
}
