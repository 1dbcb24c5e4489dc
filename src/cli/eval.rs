//! `moco eval knn | linear`: judge a trained encoder.
use std::path::PathBuf;

use clap::{Args, Subcommand};
use moco::backend::cuda::CudaOptions;
use moco::backend::Backend;
use moco::eval::linear::{linear_probe, LinearConfig};
use moco::train::Trainer;
use moco::Result;

use super::Job;

/// `moco eval` subcommands.
#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Weighted kNN (k, t) top-1 on the test split, training-split features as the bank.
    Knn(KnnArgs),
    /// Linear classifier on frozen backbone features: top-1 and top-5.
    Linear(LinearArgs),
}

/// Flags shared by the evaluations.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Run directory of `moco train` (its checkpoint and config are used).
    #[arg(long, value_name = "RUN_DIR")]
    pub checkpoint: PathBuf,
    /// auto, cpu, cuda, cuda:N. [auto]
    #[arg(long, default_value = "auto")]
    pub device: moco::DeviceSpec,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Use only the first N test images (0 = all; default: as in training).
    #[arg(long)]
    pub test_limit: Option<usize>,
}

/// Flags of `moco eval knn`.
#[derive(Args, Debug)]
pub struct KnnArgs {
    #[command(flatten)]
    common: Common,
    /// Neighbours k. [200]
    #[arg(long, default_value_t = 200)]
    k: usize,
    /// Temperature of the neighbour weights. [0.1]
    #[arg(long, default_value_t = 0.1)]
    t: f32,
}

/// Flags of `moco eval linear`.
#[derive(Args, Debug)]
pub struct LinearArgs {
    #[command(flatten)]
    common: Common,
    /// Epochs of the linear classifier. [30]
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Learning rate (MoCo: 30). [30]
    #[arg(long, default_value_t = 30.0)]
    lr: f64,
    /// Weight decay (MoCo: 0). [0]
    #[arg(long, default_value_t = 0.0)]
    wd: f64,
    /// Batch size. [256]
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Step schedule (x0.1 at 60% and 80%) instead of cosine.
    #[arg(long)]
    step: bool,
}

enum What {
    Knn { k: usize, t: f32 },
    Linear(LinearConfig),
}

struct EvalJob {
    common: Common,
    what: What,
}

impl Job for EvalJob {
    type Out = ();
    fn run<B: Backend>(self, be: B) -> Result<()> {
        let (meta, _) = Trainer::<B>::read_checkpoint(&self.common.checkpoint)?;
        let mut cfg = meta.config;
        cfg.device = self.common.device;
        if let Some(l) = self.common.test_limit {
            cfg.test_limit = l;
        }
        if let What::Knn { k, t } = self.what {
            cfg.knn_k = k;
            cfg.knn_t = t;
        }
        let epoch = meta.epoch;
        let mut tr = Trainer::resume(&self.common.checkpoint, Some(cfg), be)?;
        match self.what {
            What::Knn { k, t } => {
                let top1 = tr.knn_top1()?;
                println!(
                    "{{\"epoch\":{epoch},\"knn_k\":{k},\"knn_t\":{t},\"knn_top1\":{top1:.6}}}"
                );
            }
            What::Linear(lc) => {
                let (train, train_labels) = tr.train_features()?;
                let (test, test_labels) = tr.test_features()?;
                let dim = tr.encoder_q().feature_dim();
                let classes = tr.num_classes();
                let r = linear_probe(
                    &train,
                    &train_labels,
                    &test,
                    &test_labels,
                    dim,
                    classes,
                    &lc,
                )?;
                println!(
                    "{{\"epoch\":{epoch},\"linear_top1\":{:.6},\"linear_top5\":{:.6},\"final_loss\":{:.6},\"epochs\":{},\"lr\":{}}}",
                    r.top1, r.top5, r.final_loss, lc.epochs, lc.lr
                );
            }
        }
        Ok(())
    }
}

/// Runs `moco eval ...`.
pub fn run(cmd: EvalCommand) -> Result<()> {
    let (common, what) = match cmd {
        EvalCommand::Knn(a) => {
            if a.k == 0 {
                return Err(moco::Error::invalid("--k must be >= 1"));
            }
            if !(a.t.is_finite() && a.t > 0.0) {
                return Err(moco::Error::invalid(format!(
                    "--t must be a finite number > 0, got {}",
                    a.t
                )));
            }
            (a.common, What::Knn { k: a.k, t: a.t })
        }
        EvalCommand::Linear(a) => (
            a.common,
            What::Linear(LinearConfig {
                epochs: a.epochs,
                batch_size: a.batch_size,
                lr: a.lr,
                weight_decay: a.wd,
                cosine: !a.step,
                ..Default::default()
            }),
        ),
    };
    super::set_threads(common.threads)?;
    let device = common.device.resolve().to_string();
    super::dispatch(&device, CudaOptions::default(), EvalJob { common, what })
}
