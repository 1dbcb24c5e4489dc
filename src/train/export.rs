//! Export of a run: the query encoder with torchvision names, and PyTorch MoCo's queue.
//!
//! `moco export` is a thin wrapper around [`export_run`]. The files are plain safetensors
//! (with moco's checksums in their metadata, which other readers ignore):
//!
//! * the encoder: the backbone's tensors named as in torchvision (`conv1.weight`,
//!   `layer1.0.bn1.running_mean`, ...; `fc.*` too with `head`), without
//!   `num_batches_tracked`;
//! * the queue: `queue` as PyTorch MoCo's (C x K) buffer and `queue_ptr` (one value).
//!
//! Nothing of the run directory is ever overwritten, nor one output by another, and an
//! existing file only with `force`.
use std::path::{Path, PathBuf};

use crate::backend::Cpu;
use crate::error::{Error, Result};
use crate::model::{Encoder, EncoderConfig};
use crate::ops::Queue;
use crate::train::checkpoint::{write_tensors, Tensor};
use crate::train::{CheckpointMeta, Trainer, CHECKPOINT_FILE, PREV_CHECKPOINT_FILE};

/// What [`export_run`] writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportOptions {
    /// The encoder file; `None`: `RUN_DIR/encoder_q.safetensors`.
    pub out: Option<PathBuf>,
    /// Also export the MoCo head (`fc.*`), not only the backbone.
    pub head: bool,
    /// Also write the queue (C x K) and its pointer to this file.
    pub queue: Option<PathBuf>,
    /// Replace existing output files (never the run's own files).
    pub force: bool,
}

/// What [`export_run`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportReport {
    /// The encoder file.
    pub encoder: PathBuf,
    /// Tensors in it.
    pub tensors: usize,
    /// The queue file, if asked for.
    pub queue: Option<PathBuf>,
    /// Completed epochs of the exported checkpoint.
    pub epoch: usize,
    /// The run's architecture name.
    pub arch: String,
    /// Queue length K, feature dimension C and write pointer.
    pub queue_shape: (usize, usize, usize),
}

/// Files of a run directory that an export must never replace.
const RUN_FILES: [&str; 6] = [
    CHECKPOINT_FILE,
    PREV_CHECKPOINT_FILE,
    "config.json",
    "metrics.jsonl",
    "steps.jsonl",
    "metrics.png",
];

/// The query encoder's tensors with torchvision names, from a checkpoint's contents.
pub fn encoder_tensors(
    meta: &CheckpointMeta,
    tensors: &[Tensor],
    head: bool,
) -> Result<Vec<Tensor>> {
    let cfg = &meta.config;
    let enc_cfg = EncoderConfig {
        arch: cfg.arch,
        in_channels: meta.in_channels,
        dim: cfg.dim,
        mlp: cfg.mlp,
    };
    let mut enc = Encoder::new(Cpu::<f32>::new(), enc_cfg, cfg.seed)?;
    let p = find(tensors, "encoder_q.params")?;
    let r = find(tensors, "encoder_q.running")?;
    if p.data.len() != enc.params().len() || r.data.len() != enc.running_stats().len() {
        return Err(Error::invalid(
            "checkpoint does not match its own config (corrupt run directory?)",
        ));
    }
    enc.params_mut().copy_from_slice(&p.data);
    enc.running_stats_mut().copy_from_slice(&r.data);
    enc.set_num_batches_tracked(meta.num_batches_tracked.0);
    Ok(enc
        .state_dict()?
        .into_iter()
        .filter(|(name, _, _)| head || !name.starts_with("fc."))
        .filter(|(name, _, _)| !name.ends_with("num_batches_tracked"))
        .map(|(name, shape, data)| Tensor { name, shape, data })
        .collect())
}

/// PyTorch MoCo's `queue` (C x K) and `queue_ptr`, from a checkpoint's contents.
pub fn queue_tensors(meta: &CheckpointMeta, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
    let (k, c) = (meta.config.moco_k, meta.config.dim);
    let q = find(tensors, "queue")?;
    let ck =
        Queue::from_host(&Cpu::<f32>::new(), &q.data, k, c, meta.queue_ptr)?.to_pytorch_layout()?;
    Ok(vec![
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
    ])
}

fn find<'a>(tensors: &'a [Tensor], name: &str) -> Result<&'a Tensor> {
    tensors
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| Error::invalid(format!("checkpoint tensor {name} missing")))
}

/// `path` with its directory made absolute and symbolic links resolved (the file itself
/// need not exist), for comparing output paths.
fn resolved(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match (dir.canonicalize(), path.file_name()) {
        (Ok(d), Some(name)) => d.join(name),
        _ => path.to_path_buf(),
    }
}

/// Whether `a` and `b` name the same file (same resolved path, or the same inode).
fn same_file(a: &Path, b: &Path) -> bool {
    if resolved(a) == resolved(b) {
        return true;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    false
}

/// Checks the output paths before anything is read or written.
fn check_outputs(run_dir: &Path, outs: &[(&str, &Path)], force: bool) -> Result<()> {
    for (flag, out) in outs {
        for f in RUN_FILES {
            let own = run_dir.join(f);
            if same_file(out, &own) {
                return Err(Error::invalid(format!(
                    "{flag} {} is the run's own {f}; export never writes over the run directory's files: pick another path",
                    out.display()
                )));
            }
        }
        if out.is_dir() {
            return Err(Error::invalid(format!(
                "{flag} {} is a directory; give a file path",
                out.display()
            )));
        }
        if out.exists() && !force {
            return Err(Error::invalid(format!(
                "{flag} {} exists; pass --force to replace it",
                out.display()
            )));
        }
    }
    if let [(fa, a), (fb, b)] = outs {
        if same_file(a, b) {
            return Err(Error::invalid(format!(
                "{fa} and {fb} name the same file {}: give two paths",
                a.display()
            )));
        }
    }
    Ok(())
}

/// Exports the run in `run_dir` as [`ExportOptions`] says. Works on any machine (CPU only,
/// no data set needed). Every check (output paths, the checkpoint's checksums, finite
/// values, shapes) is done before the first file is written.
///
/// ```
/// use moco::train::export::{export_run, ExportOptions};
/// let dir = tempfile::tempdir().unwrap();
/// // Not a run directory: a clear error, nothing written.
/// assert!(export_run(dir.path(), &ExportOptions::default()).is_err());
/// assert!(!dir.path().join("encoder_q.safetensors").exists());
/// ```
pub fn export_run(run_dir: &Path, opts: &ExportOptions) -> Result<ExportReport> {
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| run_dir.join("encoder_q.safetensors"));
    let mut outs: Vec<(&str, &Path)> = vec![("--out", &out)];
    if let Some(q) = &opts.queue {
        outs.push(("--queue", q));
    }
    check_outputs(run_dir, &outs, opts.force)?;
    let (meta, tensors) = Trainer::<Cpu>::read_checkpoint(run_dir)?;
    let enc = encoder_tensors(&meta, &tensors, opts.head)?;
    let queue = match &opts.queue {
        Some(_) => Some(queue_tensors(&meta, &tensors)?),
        None => None,
    };
    write_tensors(&out, &enc, None)?;
    if let (Some(path), Some(q)) = (&opts.queue, &queue) {
        write_tensors(path, q, None)?;
    }
    Ok(ExportReport {
        encoder: out,
        tensors: enc.len(),
        queue: opts.queue.clone(),
        epoch: meta.epoch,
        arch: meta.config.arch.to_string(),
        queue_shape: (meta.config.moco_k, meta.config.dim, meta.queue_ptr),
    })
}
