//! `moco export`: the query encoder's backbone as safetensors with torchvision names.
use std::path::PathBuf;

use clap::Args;
use moco::backend::Cpu;
use moco::model::{Encoder, EncoderConfig};
use moco::train::checkpoint::{write_tensors, Tensor};
use moco::train::Trainer;
use moco::{Error, Result};

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
}

/// Runs `moco export`. Works on any machine (CPU only, no data set needed).
pub fn run(a: ExportArgs) -> Result<()> {
    let (meta, tensors) = Trainer::<Cpu>::read_checkpoint(&a.checkpoint)?;
    let cfg = &meta.config;
    let enc_cfg = EncoderConfig {
        arch: cfg.arch.parse()?,
        in_channels: meta.in_channels,
        dim: cfg.dim,
        mlp: cfg.mlp,
    };
    let mut enc = Encoder::new(Cpu::<f32>::new(), enc_cfg, cfg.seed)?;
    let get = |name: &str| {
        tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::Data {
                path: a.checkpoint.join(moco::train::CHECKPOINT_FILE),
                message: format!("tensor {name} missing"),
            })
    };
    let p = get("encoder_q.params")?;
    let r = get("encoder_q.running")?;
    if p.data.len() != enc.params().len() || r.data.len() != enc.running_stats().len() {
        return Err(Error::invalid(
            "checkpoint does not match its own config (corrupt run directory?)",
        ));
    }
    enc.params_mut().copy_from_slice(&p.data);
    enc.running_stats_mut().copy_from_slice(&r.data);
    enc.set_num_batches_tracked(meta.num_batches_tracked.0);
    let out: Vec<Tensor> = enc
        .state_dict()?
        .into_iter()
        .filter(|(name, _, _)| a.head || !name.starts_with("fc."))
        .filter(|(name, _, _)| !name.ends_with("num_batches_tracked"))
        .map(|(name, shape, data)| Tensor { name, shape, data })
        .collect();
    let path = a
        .out
        .clone()
        .unwrap_or_else(|| a.checkpoint.join("encoder_q.safetensors"));
    write_tensors(&path, &out, None)?;
    println!(
        "wrote {} ({} tensors, {} arch, epoch {})",
        path.display(),
        out.len(),
        cfg.arch,
        meta.epoch
    );
    if let Some(qpath) = &a.queue {
        let q = get("queue")?;
        let (k, c) = (cfg.moco_k, cfg.dim);
        let ck = moco::ops::Queue::from_parts(q.data.clone(), k, c, meta.queue_ptr, None)?
            .to_pytorch_layout()?;
        let qt = vec![
            Tensor {
                name: "queue".into(),
                shape: vec![c, k],
                data: ck,
            },
            Tensor {
                name: "queue_ptr".into(),
                shape: vec![1],
                data: vec![meta.queue_ptr as f32],
            },
        ];
        write_tensors(qpath, &qt, None)?;
        println!(
            "wrote {} (queue {c} x {k}, ptr {})",
            qpath.display(),
            meta.queue_ptr
        );
    }
    Ok(())
}
