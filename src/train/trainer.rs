//! The MoCo training loop, written once for every backend: a [`Moco`] state and step (see
//! [`crate::train::moco`]) plus the data sets, the loader, the kNN monitor and the
//! checkpoints of a run directory.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::data::synthetic::SyntheticConfig;
use crate::data::{augment::Preset, Augment, Batch, DataSpec, DatasetKind, Loader, Source};
use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::model::{Encoder, InputShape};
use crate::ops::Queue;
use crate::train::checkpoint::{read_tensors, write_tensors, Tensor};
use crate::train::moco::StepStats;
use crate::train::moco::{Moco, StateCounters};
use crate::train::{memory, TrainConfig};

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
pub struct Trainer<B: Backend> {
    cfg: TrainConfig,
    be: B,
    moco: Moco<B>,
    loader: Loader,
    train_set: Source,
    test_set: Source,
    eval_aug: Augment,
    /// Images per batch of the feature passes ([`memory::eval_batch`]).
    eval_batch: usize,
    epoch: usize,
    step_in_epoch: usize,
    sums: EpochSums,
    /// Run directory of the newest checkpoint written or loaded.
    ckpt_dir: Option<PathBuf>,
    /// True while that checkpoint has not yet been followed by a finite step.
    ckpt_unconfirmed: bool,
    /// The group of a distributed run (see [`Trainer::with_comm`]).
    comm: Option<Box<dyn Communicator<B>>>,
}

impl<B: Backend> Trainer<B> {
    /// A fresh run: opens the data, builds both encoders (the key encoder starts as a copy of
    /// the query encoder), the optimizer and the queue.
    pub fn new(cfg: TrainConfig, be: B) -> Result<Self> {
        cfg.validate()?;
        let spec = DataSpec {
            kind: cfg.dataset,
            path: cfg.data.clone(),
            image_size: cfg.image_size,
            seed: cfg.seed,
            bad_images: cfg.bad_images,
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
        let (train, test): (Source, Source) = if spec.kind == DatasetKind::Synthetic {
            // Only the images that will be used are drawn (image i is the same either way).
            let s = SyntheticConfig {
                train_len: limited(synth.train_len, cfg.train_limit),
                test_len: limited(synth.test_len, cfg.test_limit),
                ..synth.clone()
            };
            (s.generate(true)?.into(), s.generate(false)?.into())
        } else {
            let (train, test) = spec.open_splits()?;
            (
                train.truncate(cfg.train_limit),
                test.truncate(cfg.test_limit),
            )
        };
        let post = memory::estimate(
            &cfg,
            train.channels(),
            train.len() as u64,
            test.len() as u64,
            0, // in memory already, or streamed
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
        let (mean, std) = (train.mean().to_vec(), train.std().to_vec());
        let preset: Preset = cfg.augment;
        let mut aug = Augment::preset(preset, cfg.image_size, &mean, &std)?;
        if let Some(min) = cfg.crop_scale {
            aug = aug.with_crop_scale(min)?;
        }
        // Photos of any size: torchvision's Resize(256) + CenterCrop(224), scaled; in-memory
        // sets are stored at the view size already: the whole image.
        let eval_aug = if train.streamed() {
            Augment::eval_photo(cfg.image_size, &mean, &std)?
        } else {
            Augment::eval(cfg.image_size, &mean, &std)?
        };
        let loader =
            Loader::train(train.clone(), aug, cfg.batch_size, cfg.seed)?.workers(cfg.workers)?;
        let moco = Moco::new(&cfg, be.clone(), train.channels(), loader.steps_per_epoch())?;
        let eval_batch = memory::eval_batch(&cfg, train.channels());
        Ok(Trainer {
            cfg,
            be,
            moco,
            loader,
            train_set: train,
            test_set: test,
            eval_aug,
            eval_batch,
            epoch: 0,
            step_in_epoch: 0,
            sums: EpochSums::default(),
            ckpt_dir: None,
            ckpt_unconfirmed: false,
            comm: None,
        })
    }

    /// Makes this trainer one rank of a distributed run: its loader yields this rank's
    /// share of every global batch ([`Loader::shard`]), its steps are
    /// [`Moco::step_distributed`], the kNN monitor's feature pass is split over the ranks,
    /// and the state is first brought to rank 0's ([`Moco::sync_from_rank0`]). Every rank
    /// builds its trainer with the same configuration (and, to resume, from the same
    /// checkpoint) and calls this. `--batch-size` stays the global batch and `--bn-splits`
    /// the groups over it, so the run computes what one process would, up to rounding.
    ///
    /// Checkpoints, logs and plots are rank 0's to write ([`Trainer::rank`]).
    pub fn with_comm(mut self, comm: Box<dyn Communicator<B>>) -> Result<Self> {
        let (rank, world) = (comm.rank(), comm.world());
        self.loader = self.loader.clone().shard(rank, world)?;
        if !self.cfg.bn_splits.is_multiple_of(world) {
            return Err(Error::invalid(format!(
                "--bn-splits ({}) counts BatchNorm groups over the global batch and must be a multiple of the number of ranks ({world})",
                self.cfg.bn_splits
            )));
        }
        self.moco.sync_from_rank0(comm.as_ref())?;
        // Where each rank stands in the epoch comes from rank 0, too.
        let mut at = [self.epoch, self.step_in_epoch];
        crate::dist::broadcast_indices(comm.as_ref(), &mut at, 0)?;
        if (at[0], at[1]) != (self.epoch, self.step_in_epoch) {
            return Err(Error::Comm(format!(
                "rank {rank} is at epoch {} step {}, rank 0 at epoch {} step {}: resume every rank from the same checkpoint",
                self.epoch, self.step_in_epoch, at[0], at[1]
            )));
        }
        self.comm = Some(comm);
        Ok(self)
    }

    /// Rank 0's `value` on every rank (a single process gets its own back): for the
    /// decisions every rank of a distributed run must take together (stop, run the monitor).
    pub fn agree(&self, value: bool) -> Result<bool> {
        match &self.comm {
            None => Ok(value),
            Some(c) => {
                let mut v = [value as u8 as f64];
                c.broadcast_host(&mut v, 0)?;
                Ok(v[0] != 0.0)
            }
        }
    }

    /// This trainer's rank and the number of ranks (`(0, 1)` for a single process).
    pub fn rank(&self) -> (usize, usize) {
        self.comm
            .as_ref()
            .map(|c| (c.rank(), c.world()))
            .unwrap_or((0, 1))
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
        self.moco.global_step()
    }
    /// The MoCo state and step (encoders, queue, optimizer, schedule).
    pub fn moco(&self) -> &Moco<B> {
        &self.moco
    }
    /// The MoCo state, mutable (to set a starting state).
    pub fn moco_mut(&mut self) -> &mut Moco<B> {
        &mut self.moco
    }
    /// Steps per epoch (drop_last, as the reference).
    pub fn steps_per_epoch(&self) -> usize {
        self.loader.steps_per_epoch()
    }
    /// The query encoder.
    pub fn encoder_q(&self) -> &Encoder<B> {
        self.moco.encoder_q()
    }
    /// The key encoder.
    pub fn encoder_k(&self) -> &Encoder<B> {
        self.moco.encoder_k()
    }
    /// The queue.
    pub fn queue(&self) -> &Queue<B> {
        self.moco.queue()
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

    fn step_inner(&mut self, batch: &Batch) -> Result<StepStats> {
        if batch.x_k.len() != batch.x_q.len() || batch.n == 0 {
            return Err(Error::invalid(
                "a training batch needs two views of N >= 1 images",
            ));
        }
        let shape = self.shape(batch);
        let st = match &self.comm {
            Some(c) => self
                .moco
                .step_distributed(c.as_ref(), &batch.x_q, &batch.x_k, shape),
            None => self.moco.step(&batch.x_q, &batch.x_k, shape),
        }
        .map_err(|e| match e {
            Error::Diverged(m) => Error::Diverged(format!(
                "epoch {} step {}: {m}",
                self.epoch + 1,
                self.step_in_epoch + 1
            )),
            e => e,
        })?;
        self.step_in_epoch += 1;
        Ok(st)
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
            self.loader.recycle(b);
            self.sums.seconds += t.elapsed().as_secs_f64();
            self.sums.loss += st.loss;
            self.sums.accuracy += st.accuracy;
            self.sums.steps += 1;
            self.sums.images += st.images;
            on_step(&st);
            let mut stopping = stop.load(Ordering::Relaxed);
            if let Some(c) = &self.comm {
                // Every rank stops after the same step: any rank's signal stops them all.
                let mut s = [stopping as u8 as f64];
                c.all_reduce_mean_host(&mut s)?;
                stopping = s[0] > 0.0;
            }
            if stopping && self.step_in_epoch < self.steps_per_epoch() {
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

    /// Backbone features (N x D, inference mode) of every image of `ds`, in order. In a
    /// distributed run the batches are dealt round-robin over the ranks and the features
    /// gathered, so every rank returns all of them.
    pub fn features(&mut self, ds: &Source) -> Result<(Vec<f32>, Vec<u32>)> {
        let loader = Loader::eval(ds.clone(), self.eval_aug.clone(), self.eval_batch)?
            .workers(self.cfg.workers)?;
        if self.comm.is_some() {
            return self.features_distributed(ds, &loader);
        }
        let mut it = loader.epoch(0);
        let mut feats = Vec::new();
        let mut labels = Vec::new();
        while let Some(b) = it.try_next() {
            let b = b?;
            let x = self.be.upload_f32(&b.x_q)?;
            let shape = self.shape(&b);
            let f = self.moco.encoder_q_mut().features(&x, shape)?;
            feats.extend(self.be.download_f32(&f)?);
            labels.extend_from_slice(&b.labels);
            loader.recycle(b);
        }
        Ok((feats, labels))
    }

    /// [`Trainer::features`] of a distributed run: rank `r` computes batches `r`,
    /// `r + world`, ...; each round's blocks are gathered.
    fn features_distributed(
        &mut self,
        ds: &Source,
        loader: &Loader,
    ) -> Result<(Vec<f32>, Vec<u32>)> {
        let dim = self.moco.encoder_q().feature_dim();
        let (rank, world) = self.rank();
        let batches = loader.steps_per_epoch();
        let total = ds.len();
        let mut out = Vec::with_capacity(total * dim);
        for round in 0..batches.div_ceil(world) {
            let mine = round * world + rank;
            // Every rank brings a full-size block (zeros past the end) to the gather.
            let mut block = vec![0.0f32; self.eval_batch * dim];
            if mine < batches {
                let b = loader.batch(0, mine)?;
                let x = self.be.upload_f32(&b.x_q)?;
                let shape = self.shape(&b);
                let f = self.moco.encoder_q_mut().features(&x, shape)?;
                let f = self.be.download_f32(&f)?;
                block[..f.len()].copy_from_slice(&f);
            }
            let comm = self.comm.as_ref().ok_or_else(|| {
                Error::Other("internal: a distributed feature pass without a group".into())
            })?;
            let all = comm.all_gather(&self.be, &self.be.upload_f32(&block)?)?;
            let all = self.be.download_f32(&all)?;
            for (r, blk) in all.chunks(self.eval_batch * dim).enumerate() {
                let b = round * world + r;
                if b < batches {
                    let rows = (total - b * self.eval_batch).min(self.eval_batch);
                    out.extend_from_slice(&blk[..rows * dim]);
                }
            }
        }
        Ok((out, ds.labels().to_vec()))
    }

    /// Backbone features and labels of the training split (inference mode, no augmentation).
    pub fn train_features(&mut self) -> Result<(Vec<f32>, Vec<u32>)> {
        self.features(&self.train_set.clone())
    }

    /// Backbone features and labels of the test split.
    pub fn test_features(&mut self) -> Result<(Vec<f32>, Vec<u32>)> {
        self.features(&self.test_set.clone())
    }

    /// The images of the training and test splits that could not be read or decoded so far
    /// and were replaced (`--bad-images skip`; see [`crate::data::folder::SkipLog`]), or
    /// `None` for in-memory data.
    pub fn skip_log(&self) -> Option<crate::data::folder::SkipLog> {
        let mut out = None::<crate::data::folder::SkipLog>;
        for s in [&self.train_set, &self.test_set] {
            if let Some(l) = s.skip_log() {
                let o = out.get_or_insert_with(Default::default);
                o.count += l.count;
                for e in l.first {
                    if o.first.len() < crate::data::folder::SkipLog::KEEP {
                        o.first.push(e);
                    }
                }
            }
        }
        out
    }

    /// Number of classes of the data set.
    pub fn num_classes(&self) -> usize {
        self.train_set.num_classes()
    }

    /// The kNN monitor: training-set features as the bank, weighted kNN (k, t from the
    /// config) top-1 on the test set, in [0, 1].
    pub fn knn_top1(&mut self) -> Result<f64> {
        let (bank, bank_labels) = self.features(&self.train_set.clone())?;
        let (test, test_labels) = self.features(&self.test_set.clone())?;
        let dim = self.moco.encoder_q().feature_dim();
        crate::eval::knn::knn_top1(
            &bank,
            &bank_labels,
            &test,
            &test_labels,
            dim,
            self.cfg.knn_k,
            self.cfg.knn_t,
            self.train_set.num_classes(),
        )
    }

    /// Saves everything needed to continue the same trajectory into `dir` (atomically).
    ///
    /// The checkpoint it replaces is kept as [`PREV_CHECKPOINT_FILE`] until the next step
    /// proves the new one finite (see [`Trainer::step`]).
    pub fn save_checkpoint(&mut self, dir: &Path) -> Result<PathBuf> {
        let tensors = self.moco.tensors()?;
        let counters = self.moco.counters();
        let meta = CheckpointMeta {
            version: crate::VERSION.into(),
            config: self.cfg.clone(),
            epoch: self.epoch,
            step_in_epoch: self.step_in_epoch,
            global_step: counters.global_step,
            queue_ptr: counters.queue_ptr,
            in_channels: self.moco.encoder_q().config().in_channels,
            num_batches_tracked: counters.num_batches_tracked,
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
        let counters = StateCounters {
            global_step: meta.global_step,
            queue_ptr: meta.queue_ptr,
            num_batches_tracked: meta.num_batches_tracked,
        };
        t.moco
            .load_tensors(&tensors, counters)
            .map_err(|e| match e {
                Error::InvalidArgument(m) => bad(m),
                e => e,
            })?;
        if meta.step_in_epoch > t.steps_per_epoch() {
            return Err(bad(
                "step beyond the epoch: the data set or batch size changed".into(),
            ));
        }
        t.epoch = meta.epoch;
        t.step_in_epoch = meta.step_in_epoch;
        t.sums = meta.epoch_sums;
        t.ckpt_dir = Some(dir.to_path_buf());
        t.ckpt_unconfirmed = true;
        Ok(t)
    }
}
