//! `moco train`: pretrain an encoder with MoCo.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use moco::backend::Backend;
use moco::dist::rendezvous::DistEnv;
use moco::dist::{Communicator, ThreadComm};
use moco::train::metrics::{EpochMetrics, MetricsLog};
use moco::train::{TrainConfig, Trainer};
use moco::{Error, Result};

use super::Job;

/// Flags of `moco train`. Every value defaults to the preset's (see `--preset`).
#[derive(Args, Debug, Default, Clone)]
pub struct TrainArgs {
    /// Start from this preset: demo (default: resnet8 on the synthetic set, minutes on a
    /// CPU), v1, v2 (the papers' ImageNet recipes), cifar (the official CIFAR-10 recipe).
    #[arg(long)]
    pub preset: Option<String>,
    /// TOML or JSON file of config values (keys as in the run directory's config.json);
    /// flags given on the command line override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data set: synthetic (built in), idx (MNIST/Fashion-MNIST/KMNIST), cifar10, cifar100,
    /// folder (one subfolder per class). [preset: synthetic]
    #[arg(long)]
    pub dataset: Option<moco::data::DatasetKind>,
    /// Directory holding the data set's files.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Side of the training views in pixels. [preset: 32, v1/v2 224]
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Use only the first N training images (0 = all).
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Use only the first N test images in the kNN monitor (0 = all).
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Backbone: resnet8, resnet20, resnet18-cifar, resnet18, resnet50. [demo: resnet8]
    #[arg(long)]
    pub arch: Option<moco::model::Arch>,
    /// MoCo v2 MLP head. [demo: on]
    #[arg(long, conflicts_with = "no_mlp")]
    pub mlp: bool,
    /// Linear head (MoCo v1).
    #[arg(long)]
    pub no_mlp: bool,
    /// Feature dimension of the head. [demo: 64, others 128]
    #[arg(long)]
    pub dim: Option<usize>,
    /// Augmentation: v1, v2 (with blur), cifar (v2 without blur). [demo: cifar]
    #[arg(long)]
    pub augment: Option<moco::data::augment::Preset>,
    /// Smallest area fraction of the random crop, in (0, 1] (torchvision's
    /// RandomResizedCrop scale=(MIN, 1)). [augmentation's: v1/v2 0.2, cifar 0.08]
    #[arg(long, value_name = "MIN")]
    pub crop_scale: Option<f64>,
    /// Epochs. [demo: 15, others 200]
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Images per step. [demo: 64, v1/v2 256, cifar 512]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Base learning rate. [demo/cifar: 0.06, v1/v2 0.03]
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning-rate decay: cosine, step, constant. [v1: step, others cosine]
    #[arg(long)]
    pub schedule: Option<moco::train::Schedule>,
    /// Linear warmup epochs. [0]
    #[arg(long)]
    pub warmup_epochs: Option<usize>,
    /// Weight decay. [demo/cifar: 5e-4, v1/v2 1e-4]
    #[arg(long)]
    pub wd: Option<f64>,
    /// Queue length K (need not be a multiple of the batch). [demo: 2048, cifar 4096, v1/v2 65536]
    #[arg(long)]
    pub moco_k: Option<usize>,
    /// Key-encoder momentum m. [demo/cifar: 0.99, v1/v2 0.999]
    #[arg(long)]
    pub moco_m: Option<f64>,
    /// Temperature T. [demo/cifar: 0.1, v1 0.07, v2 0.2]
    #[arg(long)]
    pub moco_t: Option<f64>,
    /// Symmetric loss loss(q1,k2) + loss(q2,k1). [off]
    #[arg(long)]
    pub symmetric: bool,
    /// BatchNorm groups that emulate shuffle-BN on one device. [demo: 4, others 8]
    #[arg(long)]
    pub bn_splits: Option<usize>,
    /// Seed of everything random. [0]
    #[arg(long)]
    pub seed: Option<u64>,
    /// auto (GPU if usable, else CPU), cpu, cuda, cuda:N. [auto]
    #[arg(long)]
    pub device: Option<moco::DeviceSpec>,
    /// CPU threads (0 = all cores). [0]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Data-loading worker threads. [2]
    #[arg(long)]
    pub workers: Option<usize>,
    /// Run the kNN monitor every N epochs (0 = only before and after training). [1]
    #[arg(long)]
    pub knn_every: Option<usize>,
    /// InfoNCE on the GPU: fused (default) or unfused (cuBLAS).
    #[arg(long)]
    pub infonce: Option<moco::ops::InfoNceImpl>,
    /// Convolutions on the GPU: im2col (SGEMM, default), cudnn, or auto (cuDNN when it
    /// loads, else im2col). [im2col]
    #[arg(long, value_name = "im2col|cudnn|auto")]
    pub conv: Option<moco::backend::cuda::ConvBackend>,
    /// TF32 tensor cores for GPU convolutions and GEMMs (default: real fp32).
    #[arg(long)]
    pub tf32: bool,
    /// Image folders: what to do with an image that cannot be decoded: error (stop, naming
    /// it) or skip (leave it out, report each and the count). [error]
    #[arg(long, value_name = "error|skip")]
    pub bad_images: Option<moco::data::folder::BadImages>,
    /// Run directory (config, metrics.jsonl, plot, checkpoint). [runs/run-<unix time>]
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its checkpoint (only --epochs, --device, --threads,
    /// --workers, --ranks and --quiet may be given with it; other flags are refused).
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// No progress bars: one log line per epoch.
    #[arg(long)]
    pub quiet: bool,
    /// Data-parallel ranks in this process (threads, one model replica each, the seed's
    /// cross-rank shuffle-BN; `--batch-size` is the global batch). Computes what one rank
    /// computes, up to rounding, so a run may resume with another count. [1]
    #[arg(long, value_name = "N")]
    pub ranks: Option<usize>,
    /// Data-parallel over N GPUs of this machine: one process per GPU over NCCL, as the
    /// seed's DistributedDataParallel (`--batch-size` is the global batch). For several
    /// machines start `moco train` yourself with torchrun's RANK, WORLD_SIZE, LOCAL_RANK,
    /// MASTER_ADDR and MASTER_PORT.
    #[arg(long, value_name = "N")]
    pub gpus: Option<usize>,
}

impl TrainArgs {
    /// The flags given that `--resume` cannot honour (the run's config is fixed).
    pub fn fixed_on_resume(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        macro_rules! given {
            ($($f:ident => $flag:literal),*) => {$( if self.$f.is_some() { v.push($flag); } )*};
        }
        given!(preset => "--preset", config => "--config", dataset => "--dataset",
               data => "--data", image_size => "--image-size", train_limit => "--train-limit",
               test_limit => "--test-limit", arch => "--arch", dim => "--dim",
               augment => "--augment", crop_scale => "--crop-scale", batch_size => "--batch-size", lr => "--lr",
               schedule => "--schedule", warmup_epochs => "--warmup-epochs", wd => "--wd",
               moco_k => "--moco-k", moco_m => "--moco-m", moco_t => "--moco-t",
               bn_splits => "--bn-splits", seed => "--seed", knn_every => "--knn-every",
               infonce => "--infonce", out => "--out");
        for (on, flag) in [
            (self.mlp, "--mlp"),
            (self.no_mlp, "--no-mlp"),
            (self.symmetric, "--symmetric"),
        ] {
            if on {
                v.push(flag);
            }
        }
        v
    }

    /// The config: preset or file, then the flags.
    pub fn resolve(&self) -> Result<TrainConfig> {
        let mut c = match (&self.config, &self.preset) {
            (Some(path), _) => {
                let mut c = TrainConfig::load(path)?;
                if let Some(p) = &self.preset {
                    let fresh = TrainConfig::preset(p)?;
                    if fresh.preset != c.preset {
                        return Err(Error::invalid(
                            "give the preset in the config file or as --preset, not both",
                        ));
                    }
                    c.preset = fresh.preset;
                }
                c
            }
            (None, Some(p)) => TrainConfig::preset(p)?,
            (None, None) => TrainConfig::default(),
        };
        macro_rules! set {
            ($($f:ident => $g:ident),*) => {$( if let Some(v) = &self.$f { c.$g = v.clone(); } )*};
        }
        set!(dataset => dataset, image_size => image_size, train_limit => train_limit,
             test_limit => test_limit, arch => arch, dim => dim, augment => augment,
             epochs => epochs, batch_size => batch_size, lr => lr, schedule => schedule,
             warmup_epochs => warmup_epochs, wd => weight_decay, moco_k => moco_k,
             moco_m => moco_m, moco_t => moco_t, bn_splits => bn_splits, seed => seed,
             device => device, threads => threads, workers => workers,
             knn_every => knn_every, infonce => infonce, bad_images => bad_images,
             conv => conv);
        if self.data.is_some() {
            c.data = self.data.clone();
        }
        if self.crop_scale.is_some() {
            c.crop_scale = self.crop_scale;
        }
        if self.mlp {
            c.mlp = true;
        }
        if self.no_mlp {
            c.mlp = false;
        }
        if self.symmetric {
            c.symmetric = true;
        }
        if self.tf32 {
            c.tf32 = true;
        }
        c.validate()?;
        Ok(c)
    }
}

/// How `moco train` ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every epoch ran.
    Done,
    /// Stopped by Ctrl-C or SIGTERM after saving a checkpoint (exit status 130).
    Interrupted,
}

#[derive(Clone)]
struct TrainJob {
    cfg: TrainConfig,
    dir: PathBuf,
    resume: bool,
    quiet: bool,
    stop: Arc<AtomicBool>,
    ranks: usize,
    /// This process's place in a multi-process run (from the environment).
    env: Option<DistEnv>,
}

fn fmt_pct(x: Option<f64>) -> String {
    x.map(|v| format!("{:.2}%", 100.0 * v))
        .unwrap_or_else(|| "-".into())
}

impl Job for TrainJob {
    type Out = Outcome;
    fn run<B: Backend>(self, be: B) -> Result<Outcome> {
        if let Some(env) = &self.env {
            let comm = be.process_group(env, DIST_TIMEOUT)?;
            return self.run_rank(be, Some(comm));
        }
        if self.ranks == 1 {
            return self.run_rank(be, None);
        }
        // One thread per rank; rank 0 (this thread) writes the run directory.
        let group = ThreadComm::group(self.ranks, DIST_TIMEOUT)?;
        let results: Vec<Result<Outcome>> = std::thread::scope(|sc| {
            let mut handles = Vec::new();
            let mut comms = group.into_iter();
            let lead = comms.next();
            for comm in comms {
                let (job, be) = (self.clone(), be.clone());
                handles.push(sc.spawn(move || job.run_rank(be, Some(Box::new(comm)))));
            }
            let mut out = vec![self
                .clone()
                .run_rank(be.clone(), lead.map(|c| Box::new(c) as _))];
            for h in handles {
                out.push(
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Other("a rank's thread panicked".into()))),
                );
            }
            out
        });
        // A rank that failed first breaks the group for the others: report its error
        // rather than the others' "rank left" ones.
        let mut first_comm = None;
        for r in results {
            match r {
                Err(Error::Comm(m)) => {
                    first_comm.get_or_insert(Error::Comm(m));
                }
                Err(e) => return Err(e),
                Ok(o) => {
                    if first_comm.is_none() && matches!(o, Outcome::Interrupted) {
                        return Ok(o);
                    }
                }
            }
        }
        match first_comm {
            Some(e) => Err(e),
            None => Ok(Outcome::Done),
        }
    }
}

/// How long a rank waits for the others at a collective before giving up (the kNN
/// monitor's feature pass is split, so no rank idles through a long one alone).
const DIST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

impl TrainJob {
    fn run_rank<B: Backend>(
        self,
        be: B,
        comm: Option<Box<dyn Communicator<B>>>,
    ) -> Result<Outcome> {
        let name = be.name();
        let mut t = if self.resume {
            Trainer::resume(&self.dir, Some(self.cfg.clone()), be)?
        } else {
            Trainer::new(self.cfg.clone(), be)?
        };
        if let Some(c) = comm {
            t = t.with_comm(c)?;
        }
        let (rank, world) = t.rank();
        if rank > 0 {
            return self.follow(t);
        }
        let cfg = t.config().clone();
        // Only a run that could start gets a directory.
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        cfg.save(&self.dir)?;
        let name = if world > 1 {
            format!("{name} x {world} ranks")
        } else {
            name
        };
        eprintln!(
            "moco: {} on {} | {} {} dim {} mlp {} | K {} m {} T {} | batch {} lr {} | {} epochs x {} steps -> {}",
            cfg.dataset,
            name,
            cfg.arch,
            cfg.augment,
            cfg.dim,
            cfg.mlp,
            cfg.moco_k,
            cfg.moco_m,
            cfg.moco_t,
            cfg.batch_size,
            cfg.lr,
            cfg.epochs,
            t.steps_per_epoch(),
            self.dir.display()
        );
        let mut log = MetricsLog::open(&self.dir, self.resume, t.epoch() + 1)?;
        let steps_path = self.dir.join(STEPS_FILE);
        if self.resume {
            // Steps after the checkpoint will run again: drop their lines.
            trim_steps_log(&steps_path, t.global_step())?;
        }
        let mut steps = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .truncate(false)
            .open(&steps_path)
            .map_err(|e| Error::io(&steps_path, e))?;
        let plot = |log: &MetricsLog| {
            let _ = moco::train::plot::plot_metrics(
                log.records(),
                &self.dir.join("metrics.png"),
                &format!("moco {} {}", cfg.arch, cfg.dataset),
            );
        };
        let logged_epoch0 = log.records().iter().any(|r| r.epoch == 0);
        let knn0 = t.agree(t.epoch() == 0 && t.step_in_epoch() == 0 && !logged_epoch0)?;
        if knn0 {
            let t0 = Instant::now();
            let knn = t.knn_top1()?;
            let m = EpochMetrics {
                epoch: 0,
                loss: None,
                contrast_acc: None,
                knn_top1: Some(knn),
                images_per_sec: None,
                seconds: t0.elapsed().as_secs_f64(),
                lr: None,
            };
            log.append(&m)?;
            plot(&log);
            eprintln!("epoch 0 (untrained): kNN top-1 {}", fmt_pct(Some(knn)));
            t.save_checkpoint(&self.dir)?;
        }
        let (mut skips_seen, mut skips_shown) = (0u64, 0usize);
        while t.epoch() < cfg.epochs {
            let epoch = t.epoch() + 1;
            let t0 = Instant::now();
            let bar = if self.quiet {
                ProgressBar::hidden()
            } else {
                let b = ProgressBar::new(t.steps_per_epoch() as u64);
                b.set_style(
                    ProgressStyle::with_template(
                        "epoch {prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                b.set_prefix(format!("{epoch}/{}", cfg.epochs));
                b.set_position(t.step_in_epoch() as u64);
                b
            };
            let mut last = Instant::now();
            let mut step = t.global_step();
            let done = t.train_epoch(&self.stop, &mut |s| {
                step += 1;
                let dt = last.elapsed().as_secs_f64().max(1e-9);
                last = Instant::now();
                let ips = s.images as f64 / dt;
                bar.set_message(format!(
                    "loss {:.4} acc {:.1}% lr {:.4} {:.0} img/s",
                    s.loss,
                    100.0 * s.accuracy,
                    s.lr,
                    ips
                ));
                bar.inc(1);
                let _ = writeln!(
                    steps,
                    "{{\"step\":{step},\"epoch\":{epoch},\"loss\":{},\"acc\":{},\"lr\":{},\"images_per_sec\":{ips:.1}}}",
                    s.loss, s.accuracy, s.lr
                );
            })?;
            bar.finish_and_clear();
            if !done {
                let p = t.save_checkpoint(&self.dir)?;
                eprintln!(
                    "interrupted at epoch {epoch} step {}: checkpoint {}; continue with `moco train --resume {}`",
                    t.step_in_epoch(),
                    p.display(),
                    self.dir.display()
                );
                return Ok(Outcome::Interrupted);
            }
            let sums = t.finish_epoch();
            let lr = cfg
                .lr_schedule(t.steps_per_epoch())
                .lr_at((epoch - 1) * t.steps_per_epoch());
            let knn_due =
                epoch == cfg.epochs || (cfg.knn_every > 0 && epoch.is_multiple_of(cfg.knn_every));
            let knn = if knn_due { Some(t.knn_top1()?) } else { None };
            let m = EpochMetrics {
                epoch,
                loss: Some(sums.loss / sums.steps.max(1) as f64),
                contrast_acc: Some(sums.accuracy / sums.steps.max(1) as f64),
                knn_top1: knn,
                images_per_sec: Some(sums.images as f64 / sums.seconds.max(1e-9)),
                seconds: t0.elapsed().as_secs_f64(),
                lr: Some(lr),
            };
            log.append(&m)?;
            plot(&log);
            t.save_checkpoint(&self.dir)?;
            eprintln!(
                "epoch {epoch}/{}: loss {:.4} contrast acc {} kNN top-1 {} | {:.0} img/s, {:.1} s",
                cfg.epochs,
                m.loss.unwrap_or(f64::NAN),
                fmt_pct(m.contrast_acc),
                fmt_pct(knn),
                m.images_per_sec.unwrap_or(0.0),
                m.seconds
            );
            if let Some(log) = t.skip_log().filter(|l| l.count > skips_seen) {
                for e in log.first.iter().skip(skips_shown) {
                    eprintln!("moco: skipped {e}");
                }
                skips_shown = log.first.len();
                eprintln!(
                    "moco: {} images could not be read or decoded in epoch {epoch} and were replaced by the next image ({} so far; --bad-images skip)",
                    log.count - skips_seen,
                    log.count
                );
                skips_seen = log.count;
            }
            if t.agree(self.stop.load(Ordering::Relaxed))? {
                eprintln!(
                    "stopped after epoch {epoch}; continue with `moco train --resume {}`",
                    self.dir.display()
                );
                return Ok(Outcome::Interrupted);
            }
        }
        let recs = log.records();
        let first = recs
            .iter()
            .find(|r| r.knn_top1.is_some())
            .and_then(|r| r.knn_top1);
        let last = recs
            .iter()
            .rev()
            .find(|r| r.knn_top1.is_some())
            .and_then(|r| r.knn_top1);
        eprintln!(
            "done: kNN top-1 {} (untrained) -> {} after {} epochs; run directory {}",
            fmt_pct(first),
            fmt_pct(last),
            cfg.epochs,
            self.dir.display()
        );
        Ok(Outcome::Done)
    }
}

impl TrainJob {
    /// A rank other than 0: the same steps and collectives as rank 0, writing nothing.
    fn follow<B: Backend>(self, mut t: Trainer<B>) -> Result<Outcome> {
        let cfg = t.config().clone();
        if t.agree(false)? {
            t.knn_top1()?;
        }
        while t.epoch() < cfg.epochs {
            let epoch = t.epoch() + 1;
            if !t.train_epoch(&self.stop, &mut |_| {})? {
                return Ok(Outcome::Interrupted);
            }
            t.finish_epoch();
            let knn_due =
                epoch == cfg.epochs || (cfg.knn_every > 0 && epoch.is_multiple_of(cfg.knn_every));
            if knn_due {
                t.knn_top1()?;
            }
            if t.agree(self.stop.load(Ordering::Relaxed))? {
                return Ok(Outcome::Interrupted);
            }
        }
        Ok(Outcome::Done)
    }
}

/// The per-step log in a run directory.
pub const STEPS_FILE: &str = "steps.jsonl";

/// Keeps the lines of `steps.jsonl` for steps `<= last_step` (a resumed run logs the later
/// ones again), dropping a last line cut short by a crash. Lines without a step number
/// (older runs) are kept. Rewritten atomically; a missing file is fine.
pub fn trim_steps_log(path: &Path, last_step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut kept = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        if !line.ends_with('\n') {
            break; // torn by a crash
        }
        let step = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
        match step {
            Some(s) if s as usize > last_step => {}
            _ => kept.push_str(line),
        }
    }
    if kept.len() != text.len() {
        moco::train::write_atomic(path, kept.as_bytes())?;
    }
    Ok(())
}

fn default_out() -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Path::new("runs").join(format!("run-{secs}"))
}

/// Runs `moco train`. Ctrl-C, SIGTERM or SIGHUP save a checkpoint after the current step
/// and end with [`Outcome::Interrupted`] (exit status 130); a second one quits at once.
pub fn run(args: TrainArgs) -> Result<Outcome> {
    let env = DistEnv::from_env()?;
    if let Some(g) = args.gpus {
        if env.is_some() {
            return Err(Error::invalid(
                "--gpus starts the ranks itself: not with RANK/WORLD_SIZE set",
            ));
        }
        if args.ranks.is_some_and(|r| r > 1) {
            return Err(Error::invalid("--gpus and --ranks are one or the other"));
        }
        return launch(g);
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::Relaxed) {
                std::process::exit(130);
            }
            eprintln!(
                "\ninterrupted: saving a checkpoint after this step (Ctrl-C again to quit now)"
            );
        });
    }
    let (cfg, dir, resume) = if let Some(dir) = &args.resume {
        let fixed = args.fixed_on_resume();
        if !fixed.is_empty() {
            return Err(Error::invalid(format!(
                "--resume continues the run with its saved config; {} cannot change (only --epochs, --device, --threads, --workers, --ranks and --quiet may be given with --resume)",
                fixed.join(", ")
            )));
        }
        let (meta, _) = Trainer::<moco::backend::Cpu>::read_checkpoint(dir)?;
        let mut cfg = meta.config;
        if let Some(e) = args.epochs {
            cfg.epochs = e;
        }
        if let Some(d) = args.device {
            cfg.device = d;
        }
        if let Some(c) = args.conv {
            cfg.conv = c;
        }
        if args.tf32 {
            cfg.tf32 = true;
        }
        if let Some(t) = args.threads {
            cfg.threads = t;
        }
        if let Some(w) = args.workers {
            cfg.workers = w;
        }
        cfg.validate()?;
        (cfg, dir.clone(), true)
    } else {
        let cfg = args.resolve()?;
        let dir = args.out.clone().unwrap_or_else(default_out);
        if dir.join(moco::train::CHECKPOINT_FILE).exists() {
            return Err(Error::invalid(format!(
                "{} already holds a run; use --resume {} to continue it or pick another --out",
                dir.display(),
                dir.display()
            )));
        }
        (cfg, dir, false)
    };
    let ranks = args.ranks.unwrap_or(1);
    if ranks == 0 || ranks > 64 {
        return Err(Error::invalid(format!(
            "--ranks must be in 1..=64, got {ranks}"
        )));
    }
    if ranks > 1 && (cfg.batch_size % ranks != 0 || cfg.bn_splits % ranks != 0) {
        return Err(Error::invalid(format!(
            "--ranks {ranks} must divide --batch-size ({}) and --bn-splits ({}): both count over the global batch",
            cfg.batch_size, cfg.bn_splits
        )));
    }
    if env.is_some() && ranks > 1 {
        return Err(Error::invalid(
            "--ranks is for one process; this one is a rank of a multi-process run (WORLD_SIZE is set)",
        ));
    }
    super::set_threads(cfg.threads)?;
    let mut device = cfg.device.resolve().to_string();
    if let Some(e) = &env {
        if ranks == 1 && !cfg.batch_size.is_multiple_of(e.world) {
            return Err(Error::invalid(format!(
                "WORLD_SIZE {} must divide --batch-size ({}): it is the global batch",
                e.world, cfg.batch_size
            )));
        }
        // Each process drives the GPU of its LOCAL_RANK (shared round-robin when there are
        // more ranks than GPUs).
        if device.starts_with("cuda") {
            let n = moco::device::cuda_device_count().max(1);
            device = format!("cuda:{}", e.local_rank % n);
        }
    }
    super::dispatch(
        &device,
        moco::backend::cuda::CudaOptions {
            conv: cfg.conv,
            tf32: cfg.tf32,
        },
        TrainJob {
            cfg,
            dir,
            resume,
            quiet: args.quiet,
            stop,
            ranks,
            env,
        },
    )
}

/// `moco train --gpus N`: starts this program once per GPU with torchrun's environment
/// (and a `libnccl.so` link where only `libnccl.so.2` exists) and waits for every rank. A
/// rank that fails stops the others.
fn launch(gpus: usize) -> Result<Outcome> {
    use moco::dist::nccl::{nccl_link_dir, nccl_status, NcclStatus};
    if gpus == 0 || gpus > 64 {
        return Err(Error::invalid(format!(
            "--gpus must be in 1..=64, got {gpus}"
        )));
    }
    let have = moco::device::cuda_device_count();
    let shared = std::env::var("NCCL_MULTI_RANK_GPU_ENABLE").is_ok_and(|v| v == "1");
    if have == 0 || (gpus > have && !shared) {
        return Err(Error::invalid(format!(
            "--gpus {gpus} but this machine has {have} GPU(s) (several ranks per GPU need NCCL >= 2.30 and NCCL_MULTI_RANK_GPU_ENABLE=1)"
        )));
    }
    let mut lib_path = std::env::var_os("LD_LIBRARY_PATH").unwrap_or_default();
    match nccl_status() {
        NcclStatus::Loadable => {}
        NcclStatus::NeedsLink(lib) => {
            let cache = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir)
                .join(".cache/moco");
            let dir = nccl_link_dir(&lib, &cache)?;
            let mut parts = vec![dir];
            parts.extend(std::env::split_paths(&lib_path));
            lib_path = std::env::join_paths(parts)
                .map_err(|e| Error::Other(format!("LD_LIBRARY_PATH: {e}")))?;
        }
        NcclStatus::Missing => return Err(Error::invalid(
            "--gpus needs NCCL 2 (libnccl.so.2; pip's nvidia-nccl-cu13 has it) on LD_LIBRARY_PATH",
        )),
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Other(format!("no free port for the rendezvous: {e}")))?;
    let exe = std::env::current_exe().map_err(|e| Error::Other(format!("own path: {e}")))?;
    // The same command line without --gpus (and one run directory for all the ranks).
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        if a == "--gpus" {
            it.next();
        } else if !a.to_string_lossy().starts_with("--gpus=") {
            args.push(a);
        }
    }
    let has = |flag: &str| {
        args.iter().any(|a| {
            let a = a.to_string_lossy();
            a == flag || a.starts_with(&format!("{flag}="))
        })
    };
    if !has("--out") && !has("--resume") {
        args.push("--out".into());
        args.push(default_out().into_os_string());
    }
    // Ctrl-C reaches every rank (one process group); they agree on a step to stop after
    // and save. The launcher itself just waits for them.
    let _ = ctrlc::set_handler(|| {});
    let mut children = Vec::new();
    for rank in 0..gpus {
        let child = std::process::Command::new(&exe)
            .args(&args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", gpus.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("LD_LIBRARY_PATH", &lib_path)
            .spawn()
            .map_err(|e| Error::Other(format!("cannot start rank {rank}: {e}")))?;
        children.push(child);
    }
    let mut failed: Option<(usize, std::process::ExitStatus)> = None;
    let mut done = vec![None; gpus];
    let mut since_fail: Option<Instant> = None;
    while done.iter().any(Option::is_none) {
        for (r, c) in children.iter_mut().enumerate() {
            if done[r].is_none() {
                if let Ok(Some(st)) = c.try_wait() {
                    if !st.success() && failed.is_none() {
                        failed = Some((r, st));
                        since_fail = Some(Instant::now());
                    }
                    done[r] = Some(st);
                }
            }
        }
        // The others get a while to notice a failed rank, then are stopped.
        if since_fail.is_some_and(|t| t.elapsed() > std::time::Duration::from_secs(30)) {
            for (r, c) in children.iter_mut().enumerate() {
                if done[r].is_none() {
                    let _ = c.kill();
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    match failed {
        Some((_, st)) if st.code() == Some(130) => Ok(Outcome::Interrupted),
        Some((r, st)) => Err(Error::Comm(format!(
            "rank {r} of {gpus} failed ({st}); the others were stopped"
        ))),
        None => Ok(Outcome::Done),
    }
}
