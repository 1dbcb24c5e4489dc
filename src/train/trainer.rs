//! The MoCo training loop, written once for every backend.
//!
//! One step (DESIGN.md): `q = f_q(x_q)`; momentum update `f_k <- m f_k + (1 - m) f_q`
//! (parameters only); shuffle the key batch, `k = normalize(f_k(x_k))` with split
//! BatchNorm, unshuffle; InfoNCE against the queue; backward into `f_q`; SGD; enqueue `k`.
//! The seams where multi-GPU collectives would go are marked `// seam:`; on one device the
//! communicator is the identity.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Cpu, Cuda};
use crate::data::synthetic::SyntheticConfig;
use crate::data::{augment::Preset, Augment, Batch, DataSpec, Dataset, DatasetKind, Loader};
use crate::error::{Error, Result};
use crate::model::{Encoder, EncoderConfig, InputShape};
use crate::ops::{self, ContrastShape, InfoNceImpl, InfoNceStats, Queue};
use crate::optim::{LrSchedule, Sgd};
use crate::train::checkpoint::{read_tensors, write_tensors, Tensor};
use crate::train::{memory, TrainConfig};

/// The contrastive operations on a backend's buffers.
pub trait MocoBackend: Backend {
    /// Per-trainer state of the contrastive operations (the GPU's workspace).
    type Ctx;
    /// Creates that state.
    fn contrast_ctx(&self) -> Result<Self::Ctx>;
    /// A seeded queue of K keys of dimension C on this backend.
    fn new_queue(&self, k: usize, c: usize, seed: u64) -> Result<Queue>;
    /// A queue rebuilt from saved keys and pointer.
    fn queue_from(&self, keys: Vec<f32>, k: usize, c: usize, ptr: usize) -> Result<Queue>;
    /// `key = m key + (1 - m) query` over flat buffers.
    fn momentum(&self, key: &mut Self::Buf, query: &Self::Buf, m: f32) -> Result<()>;
    /// Row-wise L2 normalization of an N x C buffer.
    fn normalize(
        &self,
        ctx: &mut Self::Ctx,
        x: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<Self::Buf>;
    /// InfoNCE forward + backward: (loss and accuracy, dloss/dq).
    fn infonce(
        &self,
        ctx: &mut Self::Ctx,
        q: &Self::Buf,
        k: &Self::Buf,
        queue: &Queue,
        s: ContrastShape,
        imp: InfoNceImpl,
    ) -> Result<(InfoNceStats, Self::Buf)>;
    /// Writes N normalized keys at the queue pointer.
    fn enqueue(&self, queue: &mut Queue, keys: &Self::Buf) -> Result<()>;
    /// For each buffer, how many of its elements are NaN or infinite (the per-step state
    /// check; waits for the device).
    fn count_non_finite(&self, bufs: &[&Self::Buf]) -> Result<Vec<u64>>;
    /// Free memory of the device in bytes, or `None` when the buffers live in host memory.
    fn free_device_memory(&self) -> Result<Option<u64>>;
}

impl MocoBackend for Cpu<f32> {
    type Ctx = ();
    fn contrast_ctx(&self) -> Result<()> {
        Ok(())
    }
    fn new_queue(&self, k: usize, c: usize, seed: u64) -> Result<Queue> {
        Queue::new_cpu(k, c, seed)
    }
    fn queue_from(&self, keys: Vec<f32>, k: usize, c: usize, ptr: usize) -> Result<Queue> {
        Queue::from_parts(keys, k, c, ptr, None)
    }
    fn momentum(&self, key: &mut Vec<f32>, query: &Vec<f32>, m: f32) -> Result<()> {
        ops::momentum_update_cpu(key, query, m)
    }
    fn normalize(&self, _: &mut (), x: &Vec<f32>, n: usize, c: usize) -> Result<Vec<f32>> {
        Ok(ops::l2_normalize_cpu(x, n, c)?.0)
    }
    fn infonce(
        &self,
        _: &mut (),
        q: &Vec<f32>,
        k: &Vec<f32>,
        queue: &Queue,
        s: ContrastShape,
        _imp: InfoNceImpl,
    ) -> Result<(InfoNceStats, Vec<f32>)> {
        let keys = queue
            .host()
            .ok_or_else(|| Error::invalid("CPU training needs a host queue"))?;
        let out = ops::infonce_cpu(q, k, keys, s)?;
        Ok((
            InfoNceStats {
                loss: out.loss,
                accuracy: out.accuracy,
            },
            out.grad_q,
        ))
    }
    fn enqueue(&self, queue: &mut Queue, keys: &Vec<f32>) -> Result<()> {
        queue.enqueue_cpu(keys)
    }
    fn count_non_finite(&self, bufs: &[&Vec<f32>]) -> Result<Vec<u64>> {
        Ok(bufs
            .iter()
            .map(|b| b.iter().filter(|v| !v.is_finite()).count() as u64)
            .collect())
    }
    fn free_device_memory(&self) -> Result<Option<u64>> {
        Ok(None)
    }
}

impl MocoBackend for Cuda {
    type Ctx = ops::Contrast;
    fn contrast_ctx(&self) -> Result<ops::Contrast> {
        Ok(ops::Contrast::new(self.gpu()))
    }
    fn new_queue(&self, k: usize, c: usize, seed: u64) -> Result<Queue> {
        Queue::new_cuda(self.gpu(), k, c, seed)
    }
    fn queue_from(&self, keys: Vec<f32>, k: usize, c: usize, ptr: usize) -> Result<Queue> {
        Queue::from_parts(keys, k, c, ptr, Some(self.gpu()))
    }
    fn momentum(&self, key: &mut Self::Buf, query: &Self::Buf, m: f32) -> Result<()> {
        ops::momentum_update(self.gpu(), key, query, m)
    }
    fn normalize(
        &self,
        ctx: &mut ops::Contrast,
        x: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<Self::Buf> {
        let mut out = self.zeros(n * c)?;
        ctx.normalize(x, &mut out, n, c)?;
        Ok(out)
    }
    fn infonce(
        &self,
        ctx: &mut ops::Contrast,
        q: &Self::Buf,
        k: &Self::Buf,
        queue: &Queue,
        s: ContrastShape,
        imp: InfoNceImpl,
    ) -> Result<(InfoNceStats, Self::Buf)> {
        let keys = queue
            .device()
            .ok_or_else(|| Error::invalid("GPU training needs a device queue"))?;
        let mut grad = self.zeros(s.n * s.c)?;
        let stats = ctx.infonce(q, k, keys, s, &mut grad, imp)?;
        Ok((stats, grad))
    }
    fn enqueue(&self, queue: &mut Queue, keys: &Self::Buf) -> Result<()> {
        queue.enqueue_cuda(keys)
    }
    fn count_non_finite(&self, bufs: &[&Self::Buf]) -> Result<Vec<u64>> {
        Cuda::count_non_finite(self, bufs)
    }
    fn free_device_memory(&self) -> Result<Option<u64>> {
        let (free, _total) = self
            .gpu()
            .context()
            .mem_get_info()
            .map_err(|e| Error::cuda("cuMemGetInfo", e))?;
        Ok(Some(free as u64))
    }
}

/// What one training step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// InfoNCE loss (the sum of both halves with the symmetric loss).
    pub loss: f64,
    /// Contrastive top-1 accuracy in [0, 1].
    pub accuracy: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Images in the batch.
    pub images: usize,
}

/// Running sums of the current epoch (checkpointed so a resumed epoch reports the same).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochSums {
    /// Sum of step losses.
    pub loss: f64,
    /// Sum of step accuracies.
    pub accuracy: f64,
    /// Steps taken.
    pub steps: usize,
    /// Images seen.
    pub images: usize,
    /// Seconds spent in training steps.
    pub seconds: f64,
}

/// Non-tensor state saved with a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// moco version that wrote it.
    pub version: String,
    /// The run's configuration.
    pub config: TrainConfig,
    /// Completed epochs.
    pub epoch: usize,
    /// Steps done in the current (incomplete) epoch; 0 at an epoch boundary.
    pub step_in_epoch: usize,
    /// Steps done in the whole run.
    pub global_step: usize,
    /// Queue write pointer.
    pub queue_ptr: usize,
    /// Input channels of the encoders (from the data set).
    pub in_channels: usize,
    /// `num_batches_tracked` of the query and key encoders.
    pub num_batches_tracked: (u64, u64),
    /// Sums of the epoch in progress.
    pub epoch_sums: EpochSums,
    /// How randomness continues: every RNG is a pure function of (seed, epoch, step, index),
    /// so this records only that scheme's name.
    pub rng: String,
}

/// Name of the checkpoint file in a run directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// Name of the previous checkpoint in a run directory: the newest checkpoint that was
/// followed by a step whose whole state was finite. [`CHECKPOINT_FILE`] is newer or the
/// same file (a hard link); a divergence right after a checkpoint restores this one.
pub const PREV_CHECKPOINT_FILE: &str = "checkpoint.prev.safetensors";

/// A MoCo training run on backend `B`.
pub struct Trainer<B: MocoBackend> {
    cfg: TrainConfig,
    be: B,
    ctx: B::Ctx,
    enc_q: Encoder<B>,
    enc_k: Encoder<B>,
    opt: Sgd<B>,
    queue: Queue,
    sched: LrSchedule,
    loader: Loader,
    train_set: Arc<Dataset>,
    test_set: Arc<Dataset>,
    eval_aug: Augment,
    imp: InfoNceImpl,
    epoch: usize,
    step_in_epoch: usize,
    global_step: usize,
    sums: EpochSums,
    /// Run directory of the newest checkpoint written or loaded.
    ckpt_dir: Option<PathBuf>,
    /// True while that checkpoint has not yet been followed by a finite step.
    ckpt_unconfirmed: bool,
}

impl<B: MocoBackend> Trainer<B> {
    /// A fresh run: opens the data, builds both encoders (the key encoder starts as a copy of
    /// the query encoder), the optimizer and the queue.
    pub fn new(cfg: TrainConfig, be: B) -> Result<Self> {
        cfg.validate()?;
        let spec = DataSpec {
            kind: cfg.dataset.parse()?,
            path: cfg.data.clone(),
            image_size: cfg.image_size,
            seed: cfg.seed,
            bad_images: cfg.bad_images.parse()?,
        };
        // Refuse a config that cannot fit before anything large is allocated: first with
        // what is known before reading the data (the synthetic set's size is), then again
        // with the data set's real size.
        let device_free = be.free_device_memory()?;
        let synth = SyntheticConfig {
            size: cfg.image_size,
            seed: cfg.seed,
            ..SyntheticConfig::default()
        };
        let limited = |len: usize, limit: usize| if limit > 0 { len.min(limit) } else { len };
        let pre = if spec.kind == DatasetKind::Synthetic {
            let img = 3 * (cfg.image_size as u64).pow(2);
            let (tr, te) = (
                limited(synth.train_len, cfg.train_limit),
                limited(synth.test_len, cfg.test_limit),
            );
            memory::estimate(&cfg, 3, tr as u64, te as u64, img)?
        } else {
            memory::estimate(&cfg, 1, 0, 0, 0)?
        };
        memory::check_fits(&pre, memory::host_available_bytes(), device_free)?;
        let cut = |ds: Dataset, limit: usize| if limit > 0 { ds.truncate(limit) } else { ds };
        let (train, test) = if spec.kind == DatasetKind::Synthetic {
            // Only the images that will be used are drawn (image i is the same either way).
            let s = SyntheticConfig {
                train_len: limited(synth.train_len, cfg.train_limit),
                test_len: limited(synth.test_len, cfg.test_limit),
                ..synth.clone()
            };
            (s.generate(true)?, s.generate(false)?)
        } else {
            let (train, test) = spec.open_splits()?;
            (cut(train, cfg.train_limit), cut(test, cfg.test_limit))
        };
        let post = memory::estimate(
            &cfg,
            train.channels,
            train.len() as u64,
            test.len() as u64,
            0, // already in memory
        )?;
        memory::check_fits(&post, memory::host_available_bytes(), device_free)?;
        if train.len() < cfg.batch_size {
            return Err(Error::invalid(format!(
                "the training set has {} images, fewer than one batch of {}",
                train.len(),
                cfg.batch_size
            )));
        }
        // Every split is normalized with the training split's statistics, which the reader
        // set (published constants for CIFAR and ImageNet-style folders, the data's own
        // otherwise).
        let (mean, std) = (train.mean.clone(), train.std.clone());
        let preset: Preset = cfg.augment.parse()?;
        let aug = Augment::preset(preset, cfg.image_size, &mean, &std)?;
        let eval_aug = Augment::eval(cfg.image_size, &mean, &std)?;
        let train = Arc::new(train);
        let loader =
            Loader::train(train.clone(), aug, cfg.batch_size, cfg.seed)?.workers(cfg.workers)?;
        let enc_cfg = EncoderConfig {
            arch: cfg.arch.parse()?,
            in_channels: train.channels,
            dim: cfg.dim,
            mlp: cfg.mlp,
        };
        let enc_q = Encoder::new(be.clone(), enc_cfg, cfg.seed)?;
        let enc_k = Encoder::new(be.clone(), enc_cfg, cfg.seed)?; // same seed: a copy of f_q
        let opt = Sgd::new(
            be.clone(),
            enc_q.table().num_params(),
            cfg.sgd_momentum,
            cfg.weight_decay,
        )?;
        let queue = be.new_queue(cfg.moco_k, cfg.dim, cfg.seed)?;
        let sched = cfg.lr_schedule(loader.steps_per_epoch());
        sched.validate()?;
        let ctx = be.contrast_ctx()?;
        Ok(Trainer {
            imp: cfg.infonce.parse()?,
            cfg,
            be,
            ctx,
            enc_q,
            enc_k,
            opt,
            queue,
            sched,
            loader,
            train_set: train,
            test_set: Arc::new(test),
            eval_aug,
            epoch: 0,
            step_in_epoch: 0,
            global_step: 0,
            sums: EpochSums::default(),
            ckpt_dir: None,
            ckpt_unconfirmed: false,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }
    /// Completed epochs.
    pub fn epoch(&self) -> usize {
        self.epoch
    }
    /// Steps done in the current epoch.
    pub fn step_in_epoch(&self) -> usize {
        self.step_in_epoch
    }
    /// Steps done in the whole run.
    pub fn global_step(&self) -> usize {
        self.global_step
    }
    /// Steps per epoch (drop_last, as the reference).
    pub fn steps_per_epoch(&self) -> usize {
        self.loader.steps_per_epoch()
    }
    /// The query encoder.
    pub fn encoder_q(&self) -> &Encoder<B> {
        &self.enc_q
    }
    /// The key encoder.
    pub fn encoder_k(&self) -> &Encoder<B> {
        &self.enc_k
    }
    /// The queue.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }
    /// The training-data loader.
    pub fn loader(&self) -> &Loader {
        &self.loader
    }
    /// Sums of the epoch in progress.
    pub fn epoch_sums(&self) -> &EpochSums {
        &self.sums
    }

    fn shape(&self, b: &Batch) -> InputShape {
        InputShape::new(b.n, b.c, b.h, b.w)
    }

    /// Keys for the views `x` (N images): shuffle, key encoder with split BatchNorm,
    /// unshuffle, normalize. Shuffle-BN on one device.
    fn keys(&mut self, x: &[f32], shape: InputShape, salt: u64) -> Result<B::Buf> {
        let n = shape.n;
        let img = shape.c * shape.h * shape.w;
        // seam: a multi-GPU run gathers x across ranks and shuffles the global batch here.
        let mut perm: Vec<usize> = (0..n).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.cfg.seed ^ 0x5348_5546 ^ (self.global_step as u64) << 1 ^ salt,
        );
        perm.shuffle(&mut rng);
        let mut shuffled = vec![0.0f32; x.len()];
        for (dst, &src) in perm.iter().enumerate() {
            shuffled[dst * img..(dst + 1) * img].copy_from_slice(&x[src * img..(src + 1) * img]);
        }
        let xd = self.be.upload_f32(&shuffled)?;
        let k = self
            .enc_k
            .forward_no_grad(&xd, shape, true, self.cfg.bn_splits)?;
        // Unshuffle: row dst of the output belongs to image perm[dst].
        let dim = self.cfg.dim;
        let kh = self.be.download_f32(&k)?;
        let mut un = vec![0.0f32; kh.len()];
        for (dst, &src) in perm.iter().enumerate() {
            un[src * dim..(src + 1) * dim].copy_from_slice(&kh[dst * dim..(dst + 1) * dim]);
        }
        let ku = self.be.upload_f32(&un)?;
        self.be.normalize(&mut self.ctx, &ku, n, dim)
    }

    /// Query forward, loss, backward for one (query view, key) pair; accumulates into the
    /// gradient buffer.
    fn query_pass(&mut self, x: &[f32], shape: InputShape, k: &B::Buf) -> Result<InfoNceStats> {
        let xd = self.be.upload_f32(x)?;
        let q = self.enc_q.forward(&xd, shape, true, self.cfg.bn_splits)?;
        let s = ContrastShape::new(shape.n, self.cfg.dim, self.cfg.moco_k, self.cfg.moco_t)?;
        let (stats, grad) = self
            .be
            .infonce(&mut self.ctx, &q, k, &self.queue, s, self.imp)?;
        if !stats.loss.is_finite() {
            return Err(Error::Diverged(format!(
                "loss is {} at epoch {} step {}",
                stats.loss,
                self.epoch + 1,
                self.step_in_epoch + 1
            )));
        }
        self.enc_q.backward(&grad)?;
        Ok(stats)
    }

    /// One training step on a two-view batch.
    ///
    /// After the optimizer step the whole state is checked (both encoders' parameters and
    /// BatchNorm statistics, the SGD momentum, and the keys about to enter the queue, which
    /// is all that changes in it): the first step that makes any of it NaN or infinite, or
    /// whose loss is, returns [`Error::Diverged`] without touching the queue. If a
    /// checkpoint was written since the last finite step, it is replaced by the one before
    /// it ([`PREV_CHECKPOINT_FILE`]), so a divergence always leaves a usable checkpoint from
    /// before it. The in-memory state after such an error is not usable.
    pub fn step(&mut self, batch: &Batch) -> Result<StepStats> {
        match self.step_inner(batch) {
            Ok(st) => {
                self.confirm_checkpoint()?;
                Ok(st)
            }
            Err(Error::Diverged(m)) => Err(Error::Diverged(self.after_divergence(m))),
            Err(e) => Err(e),
        }
    }

    /// The previous checkpoint becomes the newest one (hard link, or copy).
    fn confirm_checkpoint(&mut self) -> Result<()> {
        if let (true, Some(dir)) = (self.ckpt_unconfirmed, &self.ckpt_dir) {
            let cur = dir.join(CHECKPOINT_FILE);
            if cur.exists() {
                crate::train::checkpoint::link_atomic(&cur, &dir.join(PREV_CHECKPOINT_FILE))?;
            }
            self.ckpt_unconfirmed = false;
        }
        Ok(())
    }

    /// The message of a divergence, after restoring the checkpoint from before it.
    fn after_divergence(&mut self, what: String) -> String {
        let advice = "Lower --lr or raise --moco-t";
        let Some(dir) = self.ckpt_dir.clone() else {
            return format!("{what}. {advice}");
        };
        let cur = dir.join(CHECKPOINT_FILE);
        let prev = dir.join(PREV_CHECKPOINT_FILE);
        if !self.ckpt_unconfirmed || !prev.exists() {
            return format!("{what}; {} is the state before it. {advice}", cur.display());
        }
        self.ckpt_unconfirmed = false;
        let at = Self::read_checkpoint(&dir)
            .map(|(m, _)| format!(" (epoch {} step {})", m.epoch, m.step_in_epoch))
            .unwrap_or_default();
        match crate::train::checkpoint::link_atomic(&prev, &cur) {
            Ok(()) => {
                let back = Self::read_checkpoint(&dir)
                    .map(|(m, _)| format!("epoch {} step {}", m.epoch, m.step_in_epoch))
                    .unwrap_or_else(|e| format!("unreadable: {e}"));
                format!(
                    "{what}; the checkpoint written since the last finite step{at} may already hold exploded weights, so {} is restored to the one before it ({back}). {advice}",
                    cur.display()
                )
            }
            Err(e) => format!(
                "{what}; the checkpoint{at} may hold exploded weights and restoring {} failed: {e}. {advice}",
                prev.display()
            ),
        }
    }

    /// The whole state is finite (see [`Trainer::step`]).
    fn check_state(&self, keys: &[&B::Buf]) -> Result<()> {
        let mut names = vec![
            "encoder_q.params",
            "encoder_k.params",
            "encoder_q.running",
            "encoder_k.running",
            "optimizer.momentum",
        ];
        let mut bufs = vec![
            self.enc_q.params(),
            self.enc_k.params(),
            self.enc_q.running_stats(),
            self.enc_k.running_stats(),
            self.opt.momentum_buffer(),
        ];
        for k in keys {
            names.push("keys");
            bufs.push(k);
        }
        let counts = self.be.count_non_finite(&bufs)?;
        let bad: Vec<String> = names
            .iter()
            .zip(&counts)
            .filter(|(_, &c)| c > 0)
            .map(|(n, c)| format!("{n} ({c} values)"))
            .collect();
        if bad.is_empty() {
            return Ok(());
        }
        Err(Error::Diverged(format!(
            "epoch {} step {} made the state non-finite: {}",
            self.epoch + 1,
            self.step_in_epoch + 1,
            bad.join(", ")
        )))
    }

    fn step_inner(&mut self, batch: &Batch) -> Result<StepStats> {
        if batch.x_k.len() != batch.x_q.len() || batch.n == 0 {
            return Err(Error::invalid(
                "a training batch needs two views of N >= 1 images",
            ));
        }
        let shape = self.shape(batch);
        let lr = self.sched.lr_at(self.global_step);
        // Key encoder: momentum update (parameters only), then keys without gradients.
        self.be.momentum(
            self.enc_k.params_mut(),
            self.enc_q.params(),
            self.cfg.moco_m,
        )?;
        self.enc_q.zero_grad()?;
        let stats = if self.cfg.symmetric {
            let k1 = self.keys(&batch.x_q, shape, 1)?;
            let k2 = self.keys(&batch.x_k, shape, 2)?;
            let a = self.query_pass(&batch.x_q, shape, &k2)?;
            let b = self.query_pass(&batch.x_k, shape, &k1)?;
            self.apply_sgd(lr)?;
            self.check_state(&[&k1, &k2])?;
            // seam: gather keys from every rank before the enqueue.
            self.be.enqueue(&mut self.queue, &k1)?;
            self.be.enqueue(&mut self.queue, &k2)?;
            InfoNceStats {
                loss: a.loss + b.loss,
                accuracy: 0.5 * (a.accuracy + b.accuracy),
            }
        } else {
            let k = self.keys(&batch.x_k, shape, 0)?;
            let st = self.query_pass(&batch.x_q, shape, &k)?;
            self.apply_sgd(lr)?;
            self.check_state(&[&k])?;
            // seam: gather keys from every rank before the enqueue.
            self.be.enqueue(&mut self.queue, &k)?;
            st
        };
        self.global_step += 1;
        self.step_in_epoch += 1;
        Ok(StepStats {
            loss: stats.loss,
            accuracy: stats.accuracy,
            lr,
            images: batch.n,
        })
    }

    fn apply_sgd(&mut self, lr: f64) -> Result<()> {
        // seam: all-reduce the gradients across ranks here.
        let (params, grads) = self.enc_q.params_and_grads();
        self.opt.step(params, grads, lr as f32)
    }

    /// Trains the rest of the current epoch (from its current step), calling `on_step`
    /// after each step. Returns `Ok(true)` at the end of the epoch, `Ok(false)` when `stop`
    /// was raised (the state is then mid-epoch and can be checkpointed).
    pub fn train_epoch(
        &mut self,
        stop: &AtomicBool,
        on_step: &mut dyn FnMut(&StepStats),
    ) -> Result<bool> {
        let mut it = self
            .loader
            .epoch_from(self.epoch as u64, self.step_in_epoch)?;
        while let Some(b) = it.try_next() {
            let b = b?;
            let t = Instant::now();
            let st = self.step(&b)?;
            self.sums.seconds += t.elapsed().as_secs_f64();
            self.sums.loss += st.loss;
            self.sums.accuracy += st.accuracy;
            self.sums.steps += 1;
            self.sums.images += st.images;
            on_step(&st);
            if stop.load(Ordering::Relaxed) && self.step_in_epoch < self.steps_per_epoch() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Marks the current epoch complete and returns its sums (resetting them).
    pub fn finish_epoch(&mut self) -> EpochSums {
        self.epoch += 1;
        self.step_in_epoch = 0;
        std::mem::take(&mut self.sums)
    }

    /// Backbone features (N x D, inference mode) of every image of `ds`, in order.
    pub fn features(&mut self, ds: &Arc<Dataset>) -> Result<(Vec<f32>, Vec<u32>)> {
        let loader =
            Loader::eval(ds.clone(), self.eval_aug.clone(), 256)?.workers(self.cfg.workers)?;
        let mut it = loader.epoch(0);
        let mut feats = Vec::new();
        let mut labels = Vec::new();
        while let Some(b) = it.try_next() {
            let b = b?;
            let x = self.be.upload_f32(&b.x_q)?;
            let f = self.enc_q.features(&x, self.shape(&b))?;
            feats.extend(self.be.download_f32(&f)?);
            labels.extend(b.labels);
        }
        Ok((feats, labels))
    }

    /// Backbone features and labels of the training split (inference mode, no augmentation).
    pub fn train_features(&mut self) -> Result<(Vec<f32>, Vec<u32>)> {
        self.features(&self.train_set.clone())
    }

    /// Backbone features and labels of the test split.
    pub fn test_features(&mut self) -> Result<(Vec<f32>, Vec<u32>)> {
        self.features(&self.test_set.clone())
    }

    /// Number of classes of the data set.
    pub fn num_classes(&self) -> usize {
        self.train_set.num_classes
    }

    /// The kNN monitor: training-set features as the bank, weighted kNN (k, t from the
    /// config) top-1 on the test set, in [0, 1].
    pub fn knn_top1(&mut self) -> Result<f64> {
        let (bank, bank_labels) = self.features(&self.train_set.clone())?;
        let (test, test_labels) = self.features(&self.test_set.clone())?;
        let dim = self.enc_q.feature_dim();
        crate::eval::knn::knn_top1(
            &bank,
            &bank_labels,
            &test,
            &test_labels,
            dim,
            self.cfg.knn_k,
            self.cfg.knn_t,
            self.train_set.num_classes,
        )
    }

    /// Saves everything needed to continue the same trajectory into `dir` (atomically).
    ///
    /// The checkpoint it replaces is kept as [`PREV_CHECKPOINT_FILE`] until the next step
    /// proves the new one finite (see [`Trainer::step`]).
    pub fn save_checkpoint(&mut self, dir: &Path) -> Result<PathBuf> {
        let be = &self.be;
        let flat = |name: &str, buf: &B::Buf| -> Result<Tensor> {
            let data = be.download_f32(buf)?;
            Ok(Tensor {
                name: name.to_string(),
                shape: vec![data.len()],
                data,
            })
        };
        let tensors = vec![
            flat("encoder_q.params", self.enc_q.params())?,
            flat("encoder_q.running", self.enc_q.running_stats())?,
            flat("encoder_k.params", self.enc_k.params())?,
            flat("encoder_k.running", self.enc_k.running_stats())?,
            flat("optimizer.momentum", self.opt.momentum_buffer())?,
            Tensor {
                name: "queue".into(),
                shape: vec![self.queue.len(), self.queue.dim()],
                data: self.queue.to_host()?,
            },
        ];
        let meta = CheckpointMeta {
            version: crate::VERSION.into(),
            config: self.cfg.clone(),
            epoch: self.epoch,
            step_in_epoch: self.step_in_epoch,
            global_step: self.global_step,
            queue_ptr: self.queue.ptr(),
            in_channels: self.enc_q.config().in_channels,
            num_batches_tracked: (
                self.enc_q.num_batches_tracked(),
                self.enc_k.num_batches_tracked(),
            ),
            epoch_sums: self.sums.clone(),
            rng: "pure(seed, epoch, step, index)".into(),
        };
        let meta = serde_json::to_value(&meta).map_err(|e| Error::Other(e.to_string()))?;
        let path = dir.join(CHECKPOINT_FILE);
        write_tensors(&path, &tensors, Some(&meta))?;
        self.ckpt_dir = Some(dir.to_path_buf());
        self.ckpt_unconfirmed = true;
        Ok(path)
    }

    /// Reads the metadata and tensors of `dir/checkpoint.safetensors` without building a
    /// trainer (for export).
    pub fn read_checkpoint(dir: &Path) -> Result<(CheckpointMeta, Vec<Tensor>)> {
        let path = dir.join(CHECKPOINT_FILE);
        let (tensors, meta) = read_tensors(&path)?;
        let bad = |m: String| Error::Data {
            path: path.clone(),
            message: m,
        };
        let meta: CheckpointMeta =
            serde_json::from_value(meta.ok_or_else(|| bad("no moco metadata".into()))?)
                .map_err(|e| bad(format!("bad metadata: {e}")))?;
        for t in &tensors {
            if let Some((i, v)) = t.first_non_finite() {
                return Err(bad(format!(
                    "tensor {} holds a non-finite value ({v} at index {i}): the run diverged before this checkpoint was written; use {PREV_CHECKPOINT_FILE} if the run directory has one",
                    t.name
                )));
            }
        }
        Ok((meta, tensors))
    }

    /// Continues a run from `dir/checkpoint.safetensors` with `cfg` (the saved config, whose
    /// `epochs` and `device` may be changed).
    pub fn resume(dir: &Path, cfg: Option<TrainConfig>, be: B) -> Result<Self> {
        let path = dir.join(CHECKPOINT_FILE);
        let (meta, tensors) = Self::read_checkpoint(dir)?;
        let bad = |m: String| Error::Data {
            path: path.clone(),
            message: m,
        };
        let cfg = cfg.unwrap_or_else(|| meta.config.clone());
        let mut t = Trainer::new(cfg, be)?;
        let get = |name: &str| -> Result<&Tensor> {
            tensors
                .iter()
                .find(|x| x.name == name)
                .ok_or_else(|| bad(format!("tensor {name} missing")))
        };
        let load = |be: &B, buf: &mut B::Buf, name: &str| -> Result<()> {
            let src = get(name)?;
            if src.data.len() != be.len(buf) {
                return Err(bad(format!(
                    "{name} has {} values, this model needs {} (different --arch/--dim/--mlp?)",
                    src.data.len(),
                    be.len(buf)
                )));
            }
            be.write_f32(buf, 0, &src.data)
        };
        load(&t.be, t.enc_q.params_mut(), "encoder_q.params")?;
        load(&t.be, t.enc_q.running_stats_mut(), "encoder_q.running")?;
        load(&t.be, t.enc_k.params_mut(), "encoder_k.params")?;
        load(&t.be, t.enc_k.running_stats_mut(), "encoder_k.running")?;
        load(&t.be, t.opt.momentum_buffer_mut(), "optimizer.momentum")?;
        let q = get("queue")?;
        if q.shape != [t.cfg.moco_k, t.cfg.dim] {
            return Err(bad(format!(
                "queue shape {:?} does not match K x C = {} x {}",
                q.shape, t.cfg.moco_k, t.cfg.dim
            )));
        }
        t.queue =
            t.be.queue_from(q.data.clone(), t.cfg.moco_k, t.cfg.dim, meta.queue_ptr)?;
        t.enc_q.set_num_batches_tracked(meta.num_batches_tracked.0);
        t.enc_k.set_num_batches_tracked(meta.num_batches_tracked.1);
        if meta.step_in_epoch > t.steps_per_epoch() {
            return Err(bad(
                "step beyond the epoch: the data set or batch size changed".into(),
            ));
        }
        t.epoch = meta.epoch;
        t.step_in_epoch = meta.step_in_epoch;
        t.global_step = meta.global_step;
        t.sums = meta.epoch_sums;
        t.ckpt_dir = Some(dir.to_path_buf());
        t.ckpt_unconfirmed = true;
        Ok(t)
    }
}
