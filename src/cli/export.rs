//! `moco export`: the query encoder's backbone as safetensors with torchvision names (a thin
//! wrapper around [`moco::train::export::export_run`]).
use std::path::PathBuf;

use clap::Args;
use moco::train::export::{export_run, ExportOptions};
use moco::Result;

/// Flags of `moco export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Run directory of `moco train`.
    #[arg(long, value_name = "RUN_DIR")]
    pub checkpoint: PathBuf,
    /// Output file. [RUN_DIR/encoder_q.safetensors]
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also export the MoCo head (`fc.*`), not only the backbone.
    #[arg(long)]
    pub head: bool,
    /// Also write PyTorch MoCo's queue buffer (C x K) and queue_ptr to this file.
    #[arg(long, value_name = "FILE")]
    pub queue: Option<PathBuf>,
    /// Replace output files that exist (the run directory's own files are never replaced).
    #[arg(long)]
    pub force: bool,
}

/// Runs `moco export`. Works on any machine (CPU only, no data set needed).
pub fn run(a: ExportArgs) -> Result<()> {
    let r = export_run(
        &a.checkpoint,
        &ExportOptions {
            out: a.out,
            head: a.head,
            queue: a.queue,
            force: a.force,
        },
    )?;
    println!(
        "wrote {} ({} tensors, {} arch, epoch {})",
        r.encoder.display(),
        r.tensors,
        r.arch,
        r.epoch
    );
    if let Some(q) = &r.queue {
        let (k, c, ptr) = r.queue_shape;
        println!("wrote {} (queue {c} x {k}, ptr {ptr})", q.display());
    }
    Ok(())
}
