//! The `moco` command-line interface.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

/// MoCo (Momentum Contrast) self-supervised training with CUDA kernels and a CPU reference.
#[derive(Parser, Debug)]
#[command(name = "moco", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Pretrain an encoder with MoCo (default: the demo run on the built-in data set).
    Train(Box<cli::train::TrainArgs>),
    /// Evaluate a trained encoder: kNN monitor or linear probe.
    #[command(subcommand)]
    Eval(cli::eval::EvalCommand),
    /// Export the query encoder (torchvision names) and optionally the queue as safetensors.
    Export(cli::export::ExportArgs),
    /// End-to-end training-step throughput (images/s) as one JSON line.
    Bench(cli::bench::BenchArgs),
    /// Data-loader throughput alone (read, decode, two augmented views), as one JSON line.
    BenchData(cli::bench_data::BenchDataArgs),
    /// Version, whether this build has CUDA kernels, the GPUs found, and (--arch) models.
    Info(cli::info::InfoArgs),
}

/// Keeps freed memory in the process (glibc): a training step frees and allocates the same
/// activation-sized buffers every step, and glibc would otherwise return each large one to
/// the kernel (mmap/munmap), so every step paid page faults and kernel zeroing for all of
/// them. With these settings the allocator reuses the previous step's memory.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const KEEP: libc::c_int = 1 << 30;
        // SAFETY: mallopt only changes glibc's allocation thresholds; it is called before
        // any other thread exists, and failure (return 0) leaves the defaults.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, KEEP);
            libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP);
        }
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Train(a) => match cli::train::run(*a) {
            Ok(cli::train::Outcome::Interrupted) => return ExitCode::from(130),
            Ok(cli::train::Outcome::Done) => Ok(()),
            Err(e) => Err(e),
        },
        Command::Eval(c) => cli::eval::run(c),
        Command::Export(a) => cli::export::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::BenchData(a) => cli::bench_data::run(a),
        Command::Info(a) => cli::info::run(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
