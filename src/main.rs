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
    /// Version, whether this build has CUDA kernels, and the GPUs found.
    Info(cli::info::InfoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
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
