//! [`Moco`]: the MoCo model state (two encoders, the head with its queue, the optimizer,
//! the schedule) and its training step, apart from any data pipeline or run directory.
//!
//! The [`Trainer`](crate::train::Trainer) is this plus the loop around it (data, monitor,
//! checkpoints, logs). A program with its own data and loop uses [`Moco`] directly:
//!
//! ```
//! use moco::backend::Cpu;
//! use moco::model::InputShape;
//! use moco::train::{Moco, TrainConfig};
//! let cfg = TrainConfig {
//!     arch: moco::model::Arch::Resnet8,
//!     dim: 16,
//!     moco_k: 32,
//!     batch_size: 4,
//!     bn_splits: 2,
//!     ..TrainConfig::default()
//! };
//! // Any backend: Cpu<f32>, Cpu<f64> (exact to f64 rounding), Cuda.
//! let mut moco = Moco::new(&cfg, Cpu::<f64>::new(), 1, 100).unwrap();
//! let shape = InputShape::new(4, 1, 8, 8);
//! let x_q = moco::rng::uniform(shape.len(), 1); // the caller's two views
//! let x_k = moco::rng::uniform(shape.len(), 2);
//! let st = moco.step(&x_q, &x_k, shape).unwrap();
//! assert!(st.loss.is_finite());
//! // The shuffle-BN permutation is the caller's to choose, too.
//! let perm = vec![vec![3, 2, 1, 0]];
//! moco.step_with_permutations(&x_q, &x_k, shape, &perm).unwrap();
//! assert_eq!(moco.global_step(), 2);
//! ```
use crate::backend::Backend;
use crate::dist::{broadcast_indices, Communicator};
use crate::error::{Error, Result};
use crate::model::{Encoder, EncoderConfig, InputShape};
use crate::ops::{InfoNceImpl, InfoNceStats, MocoHead, Queue};
use crate::optim::{LrSchedule, Sgd};
use crate::train::checkpoint::Tensor;
use crate::train::TrainConfig;

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

/// The names of the tensors a MoCo state consists of (and a checkpoint holds), in order.
pub const STATE_TENSORS: [&str; 6] = [
    "encoder_q.params",
    "encoder_q.running",
    "encoder_k.params",
    "encoder_k.running",
    "optimizer.momentum",
    "queue",
];

/// The non-tensor part of a MoCo state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StateCounters {
    /// Steps taken (the learning rate and the shuffle permutations follow it).
    pub global_step: usize,
    /// The queue's write pointer.
    pub queue_ptr: usize,
    /// `num_batches_tracked` of the query and key encoders.
    pub num_batches_tracked: (u64, u64),
}

/// Two views of `shape.n >= 1` images each.
fn check_views(x_q: &[f32], x_k: &[f32], shape: InputShape) -> Result<()> {
    if shape.n == 0 || x_q.len() != shape.len() || x_k.len() != shape.len() {
        return Err(Error::invalid(format!(
            "a training step needs two views of N >= 1 images of {} values each, got {} and {} for N = {}",
            shape.c * shape.h * shape.w,
            x_q.len(),
            x_k.len(),
            shape.n
        )));
    }
    Ok(())
}

/// The MoCo state and step on backend `B` (see the module docs).
pub struct Moco<B: Backend> {
    cfg: TrainConfig,
    be: B,
    enc_q: Encoder<B>,
    enc_k: Encoder<B>,
    opt: Sgd<B>,
    head: MocoHead<B>,
    sched: LrSchedule,
    global_step: usize,
}

impl<B: Backend> Moco<B> {
    /// A fresh state from `cfg` (architecture, head, MoCo and optimizer fields; the data
    /// fields are not used) for inputs of `in_channels` channels, with the learning-rate
    /// schedule of `cfg` over `steps_per_epoch` steps per epoch. The key encoder starts as
    /// a copy of the query encoder; the queue is seeded from `cfg.seed`.
    pub fn new(
        cfg: &TrainConfig,
        be: B,
        in_channels: usize,
        steps_per_epoch: usize,
    ) -> Result<Self> {
        cfg.validate()?;
        if in_channels == 0 || steps_per_epoch == 0 {
            return Err(Error::invalid(format!(
                "moco: in_channels ({in_channels}) and steps_per_epoch ({steps_per_epoch}) must be >= 1"
            )));
        }
        let enc_cfg = EncoderConfig {
            arch: cfg.arch,
            in_channels,
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
        let imp: InfoNceImpl = cfg.infonce;
        let head =
            MocoHead::new(be.clone(), cfg.moco_k, cfg.dim, cfg.moco_t, cfg.seed)?.with_impl(imp);
        let sched = cfg.lr_schedule(steps_per_epoch);
        sched.validate()?;
        Ok(Moco {
            cfg: cfg.clone(),
            be,
            enc_q,
            enc_k,
            opt,
            head,
            sched,
            global_step: 0,
        })
    }

    /// A state built from tensors in memory (named as [`STATE_TENSORS`], flat f32 as a
    /// checkpoint holds them; the queue K x C) and counters. Every tensor is checked
    /// against the model `cfg` describes.
    pub fn from_tensors(
        cfg: &TrainConfig,
        be: B,
        in_channels: usize,
        steps_per_epoch: usize,
        tensors: &[Tensor],
        counters: StateCounters,
    ) -> Result<Self> {
        let mut m = Moco::new(cfg, be, in_channels, steps_per_epoch)?;
        m.load_tensors(tensors, counters)?;
        Ok(m)
    }

    /// Replaces the whole state with `tensors` and `counters` (see [`Moco::from_tensors`]);
    /// nothing is changed when any tensor is missing or has the wrong size.
    pub fn load_tensors(&mut self, tensors: &[Tensor], counters: StateCounters) -> Result<()> {
        let get = |name: &str| -> Result<&Tensor> {
            tensors
                .iter()
                .find(|x| x.name == name)
                .ok_or_else(|| Error::invalid(format!("state tensor {name} missing")))
        };
        let (k, c) = (self.head.queue().len(), self.head.queue().dim());
        let want = [
            self.be.len(self.enc_q.params()),
            self.be.len(self.enc_q.running_stats()),
            self.be.len(self.enc_k.params()),
            self.be.len(self.enc_k.running_stats()),
            self.be.len(self.opt.momentum_buffer()),
            k * c,
        ];
        for (name, n) in STATE_TENSORS.iter().zip(want) {
            let t = get(name)?;
            if t.data.len() != n {
                return Err(Error::invalid(format!(
                    "{name} has {} values, this model needs {n} (different --arch/--dim/--mlp/--moco-k?)",
                    t.data.len()
                )));
            }
        }
        let q = get("queue")?;
        if q.shape != [k, c] {
            return Err(Error::invalid(format!(
                "queue shape {:?} does not match K x C = {k} x {c}",
                q.shape
            )));
        }
        let queue = Queue::from_host(&self.be, &q.data, k, c, counters.queue_ptr)?;
        self.be
            .write_f32(self.enc_q.params_mut(), 0, &get(STATE_TENSORS[0])?.data)?;
        self.be.write_f32(
            self.enc_q.running_stats_mut(),
            0,
            &get(STATE_TENSORS[1])?.data,
        )?;
        self.be
            .write_f32(self.enc_k.params_mut(), 0, &get(STATE_TENSORS[2])?.data)?;
        self.be.write_f32(
            self.enc_k.running_stats_mut(),
            0,
            &get(STATE_TENSORS[3])?.data,
        )?;
        self.be.write_f32(
            self.opt.momentum_buffer_mut(),
            0,
            &get(STATE_TENSORS[4])?.data,
        )?;
        *self.head.queue_mut() = queue;
        self.enc_q
            .set_num_batches_tracked(counters.num_batches_tracked.0);
        self.enc_k
            .set_num_batches_tracked(counters.num_batches_tracked.1);
        self.global_step = counters.global_step;
        Ok(())
    }

    /// The whole state as f32 tensors named as [`STATE_TENSORS`] (what a checkpoint holds).
    pub fn tensors(&self) -> Result<Vec<Tensor>> {
        let flat = |name: &str, buf: &B::Buf| -> Result<Tensor> {
            let data = self.be.download_f32(buf)?;
            Ok(Tensor {
                name: name.to_string(),
                shape: vec![data.len()],
                data,
            })
        };
        let q = self.head.queue();
        Ok(vec![
            flat(STATE_TENSORS[0], self.enc_q.params())?,
            flat(STATE_TENSORS[1], self.enc_q.running_stats())?,
            flat(STATE_TENSORS[2], self.enc_k.params())?,
            flat(STATE_TENSORS[3], self.enc_k.running_stats())?,
            flat(STATE_TENSORS[4], self.opt.momentum_buffer())?,
            Tensor {
                name: STATE_TENSORS[5].into(),
                shape: vec![q.len(), q.dim()],
                data: q.to_host()?,
            },
        ])
    }

    /// The counters that go with [`Moco::tensors`].
    pub fn counters(&self) -> StateCounters {
        StateCounters {
            global_step: self.global_step,
            queue_ptr: self.head.queue().ptr(),
            num_batches_tracked: (
                self.enc_q.num_batches_tracked(),
                self.enc_k.num_batches_tracked(),
            ),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }
    /// The backend.
    pub fn backend(&self) -> &B {
        &self.be
    }
    /// The query encoder.
    pub fn encoder_q(&self) -> &Encoder<B> {
        &self.enc_q
    }
    /// The query encoder, mutable (to set a starting state).
    pub fn encoder_q_mut(&mut self) -> &mut Encoder<B> {
        &mut self.enc_q
    }
    /// The key encoder.
    pub fn encoder_k(&self) -> &Encoder<B> {
        &self.enc_k
    }
    /// The key encoder, mutable.
    pub fn encoder_k_mut(&mut self) -> &mut Encoder<B> {
        &mut self.enc_k
    }
    /// The head: queue, temperature and contrastive operations.
    pub fn head(&self) -> &MocoHead<B> {
        &self.head
    }
    /// The head, mutable.
    pub fn head_mut(&mut self) -> &mut MocoHead<B> {
        &mut self.head
    }
    /// The queue.
    pub fn queue(&self) -> &Queue<B> {
        self.head.queue()
    }
    /// The optimizer of the query encoder (its momentum buffer is part of the state).
    pub fn optimizer(&self) -> &Sgd<B> {
        &self.opt
    }
    /// The optimizer, mutable.
    pub fn optimizer_mut(&mut self) -> &mut Sgd<B> {
        &mut self.opt
    }
    /// The learning-rate schedule.
    pub fn schedule(&self) -> &LrSchedule {
        &self.sched
    }
    /// Steps taken.
    pub fn global_step(&self) -> usize {
        self.global_step
    }
    /// Sets the step counter (the learning rate and permutations of the next step follow).
    pub fn set_global_step(&mut self, step: usize) {
        self.global_step = step;
    }
    /// The learning rate of the next step.
    pub fn lr(&self) -> f64 {
        self.sched.lr_at(self.global_step)
    }

    /// The shuffle-BN permutations the next step uses for a batch of `n` by default: one,
    /// or two with the symmetric loss (for the keys of `x_q`, then of `x_k`). See
    /// [`crate::rng::shuffle_permutation`].
    pub fn permutations(&self, n: usize) -> Vec<Vec<usize>> {
        let step = self.global_step as u64;
        let perm = |salt| crate::rng::shuffle_permutation(self.cfg.seed, step, salt, n);
        if self.cfg.symmetric {
            vec![perm(1), perm(2)]
        } else {
            vec![perm(0)]
        }
    }

    /// One training step on the caller's two views (N images each, NCHW, f32; `shape` is
    /// one view's), with the default permutations ([`Moco::permutations`]).
    pub fn step(&mut self, x_q: &[f32], x_k: &[f32], shape: InputShape) -> Result<StepStats> {
        let perms = self.permutations(shape.n);
        self.step_with_permutations(x_q, x_k, shape, &perms)
    }

    /// One training step with the caller's shuffle-BN permutations (`perm[dst] = src`: row
    /// `dst` of the shuffled key batch is image `src`), one per key batch as
    /// [`Moco::permutations`] returns them.
    ///
    /// The step: momentum update of the key encoder (parameters only); keys of the
    /// shuffled views with split BatchNorm, unshuffled and normalized; query forward,
    /// InfoNCE against the queue, backward; SGD; the whole state checked finite; enqueue.
    /// A state that turns NaN or infinite returns [`Error::Diverged`] before the queue is
    /// touched (the encoders and optimizer are then not usable).
    pub fn step_with_permutations(
        &mut self,
        x_q: &[f32],
        x_k: &[f32],
        shape: InputShape,
        perms: &[Vec<usize>],
    ) -> Result<StepStats> {
        let want = if self.cfg.symmetric { 2 } else { 1 };
        check_views(x_q, x_k, shape)?;
        if perms.len() != want {
            return Err(Error::invalid(format!(
                "this step needs {want} permutation(s) ({}), got {}",
                if want == 2 {
                    "symmetric loss"
                } else {
                    "one key batch"
                },
                perms.len()
            )));
        }
        for p in perms {
            crate::rng::check_permutation(p, shape.n)?;
        }
        let lr = self.sched.lr_at(self.global_step);
        // Key encoder: momentum update (parameters only), then keys without gradients.
        self.be.momentum(
            self.enc_k.params_mut(),
            self.enc_q.params(),
            self.cfg.moco_m,
        )?;
        self.enc_q.zero_grad()?;
        let stats = if self.cfg.symmetric {
            let k1 = self.keys(x_q, shape, &perms[0])?;
            let k2 = self.keys(x_k, shape, &perms[1])?;
            let a = self.query_pass(x_q, shape, &k2)?;
            let b = self.query_pass(x_k, shape, &k1)?;
            self.apply_sgd(lr)?;
            self.check_state(&[&k1, &k2])?;
            self.head.enqueue(&k1)?;
            self.head.enqueue(&k2)?;
            InfoNceStats {
                loss: a.loss + b.loss,
                accuracy: 0.5 * (a.accuracy + b.accuracy),
            }
        } else {
            let k = self.keys(x_k, shape, &perms[0])?;
            let st = self.query_pass(x_q, shape, &k)?;
            self.apply_sgd(lr)?;
            self.check_state(&[&k])?;
            self.head.enqueue(&k)?;
            st
        };
        self.global_step += 1;
        Ok(StepStats {
            loss: stats.loss,
            accuracy: stats.accuracy,
            lr,
            images: shape.n,
        })
    }

    /// Brings this rank to rank 0's state: both encoders' parameters and BatchNorm
    /// statistics, the optimizer's momentum, the queue and the counters (as DDP broadcasts
    /// the model when it wraps it). Every rank calls it, once after building or resuming.
    pub fn sync_from_rank0(&mut self, comm: &dyn Communicator<B>) -> Result<()> {
        comm.broadcast(&self.be, self.enc_q.params_mut(), 0)?;
        comm.broadcast(&self.be, self.enc_q.running_stats_mut(), 0)?;
        comm.broadcast(&self.be, self.enc_k.params_mut(), 0)?;
        comm.broadcast(&self.be, self.enc_k.running_stats_mut(), 0)?;
        comm.broadcast(&self.be, self.opt.momentum_buffer_mut(), 0)?;
        let c = self.counters();
        let mut idx = [
            c.global_step,
            c.queue_ptr,
            c.num_batches_tracked.0 as usize,
            c.num_batches_tracked.1 as usize,
        ];
        broadcast_indices(comm, &mut idx, 0)?;
        let (k, dim) = (self.head.queue().len(), self.head.queue().dim());
        let mut keys = self.be.copy(self.head.queue().keys())?;
        comm.broadcast(&self.be, &mut keys, 0)?;
        *self.head.queue_mut() = Queue::from_buffer(&self.be, keys, k, dim, idx[1])?;
        self.global_step = idx[0];
        self.enc_q.set_num_batches_tracked(idx[2] as u64);
        self.enc_k.set_num_batches_tracked(idx[3] as u64);
        Ok(())
    }

    /// One data-parallel training step, the seed's: this rank's two views (`shape.n`
    /// images each; the global batch is `shape.n x world`, rank `r` holding its images
    /// `r, r + world, r + 2 world, ...`, as PyTorch's `DistributedSampler` deals them), with the default permutations of the global batch drawn on rank 0
    /// and broadcast. Every rank of `comm` calls it with the same `shape`.
    ///
    /// What happens, as in the seed's `MoCo.forward` under DDP: the key images are
    /// gathered from every rank, shuffled with rank 0's permutation, each rank runs the key
    /// encoder on its block, the keys are gathered and unshuffled back to their images; the
    /// query pass is local; the gradients are averaged over the ranks before SGD; the keys
    /// of the whole global batch are enqueued on every rank. BatchNorm normalizes per rank
    /// (shuffle-BN, no SyncBN); `bn_splits` counts groups over the global batch, so each
    /// rank splits its block into `bn_splits / world`. Unlike the seed, the BatchNorm
    /// running statistics are averaged over the ranks after each step (the seed keeps rank
    /// 0's for the query encoder and each rank's own for the key encoder), so that every
    /// rank holds the same state.
    ///
    /// The result equals [`Moco::step`] on the global batch with the same configuration,
    /// up to rounding (the tests hold f64 to 1e-12).
    pub fn step_distributed(
        &mut self,
        comm: &dyn Communicator<B>,
        x_q: &[f32],
        x_k: &[f32],
        shape: InputShape,
    ) -> Result<StepStats> {
        let global = shape.n.checked_mul(comm.world()).ok_or_else(|| {
            Error::invalid(format!(
                "{} images x {} ranks overflows",
                shape.n,
                comm.world()
            ))
        })?;
        let perms = if comm.rank() == 0 {
            self.permutations(global)
        } else {
            let want = if self.cfg.symmetric { 2 } else { 1 };
            vec![(0..global).collect(); want]
        };
        self.step_distributed_with_permutations(comm, x_q, x_k, shape, &perms)
    }

    /// [`Moco::step_distributed`] with permutations of the global batch chosen by the
    /// caller; rank 0's are broadcast and used by every rank (the others' are ignored
    /// beyond their count and length).
    pub fn step_distributed_with_permutations(
        &mut self,
        comm: &dyn Communicator<B>,
        x_q: &[f32],
        x_k: &[f32],
        shape: InputShape,
        perms: &[Vec<usize>],
    ) -> Result<StepStats> {
        let (rank, world) = (comm.rank(), comm.world());
        crate::dist::check_rank(rank, world)?;
        let want = if self.cfg.symmetric { 2 } else { 1 };
        check_views(x_q, x_k, shape)?;
        if !self.cfg.bn_splits.is_multiple_of(world) {
            return Err(Error::invalid(format!(
                "--bn-splits ({}) counts BatchNorm groups over the global batch and must be a multiple of the world size ({world})",
                self.cfg.bn_splits
            )));
        }
        let splits = self.cfg.bn_splits / world;
        if !shape.n.is_multiple_of(splits) {
            return Err(Error::invalid(format!(
                "each rank's {} images do not split into {splits} BatchNorm groups",
                shape.n
            )));
        }
        let global = shape.n * world;
        if perms.len() != want || perms.iter().any(|p| p.len() != global) {
            return Err(Error::invalid(format!(
                "this step needs {want} permutation(s) of the global batch of {global}"
            )));
        }
        // Rank 0's permutations, on every rank.
        let mut perms = perms.to_vec();
        for p in perms.iter_mut() {
            broadcast_indices(comm, p, 0)?;
            crate::rng::check_permutation(p, global)?;
        }
        let lr = self.sched.lr_at(self.global_step);
        self.be.momentum(
            self.enc_k.params_mut(),
            self.enc_q.params(),
            self.cfg.moco_m,
        )?;
        self.enc_q.zero_grad()?;
        let (stats, keys) = if self.cfg.symmetric {
            let (k1, g1) = self.keys_distributed(comm, x_q, shape, &perms[0], splits)?;
            let (k2, g2) = self.keys_distributed(comm, x_k, shape, &perms[1], splits)?;
            let a = self.query_pass_splits(x_q, shape, &k2, splits, false)?;
            let b = self.query_pass_splits(x_k, shape, &k1, splits, false)?;
            let st = InfoNceStats {
                loss: a.loss + b.loss,
                accuracy: 0.5 * (a.accuracy + b.accuracy),
            };
            (st, vec![g1, g2])
        } else {
            let (k, g) = self.keys_distributed(comm, x_k, shape, &perms[0], splits)?;
            let st = self.query_pass_splits(x_q, shape, &k, splits, false)?;
            (st, vec![g])
        };
        // The loss and accuracy over the global batch; every rank sees the same numbers,
        // so a divergence stops them all.
        let mut s = [stats.loss, stats.accuracy];
        comm.all_reduce_mean_host(&mut s)?;
        if !s[0].is_finite() {
            return Err(Error::Diverged(format!(
                "loss is {} at step {}",
                s[0],
                self.global_step + 1
            )));
        }
        comm.all_reduce_mean(&self.be, self.enc_q.grads_mut())?;
        comm.all_reduce_mean(&self.be, self.enc_q.running_stats_mut())?;
        comm.all_reduce_mean(&self.be, self.enc_k.running_stats_mut())?;
        self.apply_sgd(lr)?;
        self.check_state(&keys.iter().collect::<Vec<_>>())?;
        for k in &keys {
            self.head.enqueue(k)?;
        }
        self.global_step += 1;
        Ok(StepStats {
            loss: s[0],
            accuracy: s[1],
            lr,
            images: global,
        })
    }

    /// This rank's normalized keys in a distributed step, and (second) the keys of the
    /// whole global batch in global order for the enqueue: gather the key images of every
    /// rank, take this rank's rows of the shuffled global batch, key encoder with `splits`
    /// groups, gather the keys, pick this rank's images' rows (the unshuffle).
    ///
    /// Global image `j * world + r` is rank `r`'s image `j` (the layout of PyTorch's
    /// `DistributedSampler`); after an all-gather it sits at position `r * n + j`. With
    /// that layout rank `r`'s BatchNorm groups are exactly the single-device split groups
    /// `r, r + world, ...` (split BatchNorm groups images by index modulo the splits).
    fn keys_distributed(
        &mut self,
        comm: &dyn Communicator<B>,
        x: &[f32],
        shape: InputShape,
        perm: &[usize],
        splits: usize,
    ) -> Result<(B::Buf, B::Buf)> {
        let (rank, world, n) = (comm.rank(), comm.world(), shape.n);
        let img = shape.c * shape.h * shape.w;
        let pos = |global: usize| (global % world) * n + global / world;
        let xd = self.be.upload_f32(x)?;
        let all = comm.all_gather(&self.be, &xd)?;
        // Row j of this rank's block of the shuffled batch is shuffled row j * world + rank.
        let mine: Vec<usize> = (0..n).map(|j| pos(perm[j * world + rank])).collect();
        let shuffled = self.be.gather_rows(&all, &mine, img)?;
        let k = self.enc_k.forward_no_grad(&shuffled, shape, true, splits)?;
        let k = self.head.normalize(&k, n)?;
        let k_all = comm.all_gather(&self.be, &k)?;
        let mut inv = vec![0usize; perm.len()];
        for (dst, &src) in perm.iter().enumerate() {
            inv[src] = dst;
        }
        let rows: Vec<usize> = (0..n).map(|j| pos(inv[j * world + rank])).collect();
        let local = self.be.gather_rows(&k_all, &rows, self.cfg.dim)?;
        let global: Vec<usize> = (0..perm.len()).map(|i| pos(inv[i])).collect();
        let ordered = self.be.gather_rows(&k_all, &global, self.cfg.dim)?;
        Ok((local, ordered))
    }

    /// Normalized keys for the views `x` (N images): shuffle by `perm`, key encoder with
    /// split BatchNorm, unshuffle, normalize. Shuffle-BN on one device.
    fn keys(&mut self, x: &[f32], shape: InputShape, perm: &[usize]) -> Result<B::Buf> {
        let n = shape.n;
        let img = shape.c * shape.h * shape.w;
        let mut shuffled = vec![0.0f32; x.len()];
        for (dst, &src) in perm.iter().enumerate() {
            shuffled[dst * img..(dst + 1) * img].copy_from_slice(&x[src * img..(src + 1) * img]);
        }
        let xd = self.be.upload_f32(&shuffled)?;
        let k = self
            .enc_k
            .forward_no_grad(&xd, shape, true, self.cfg.bn_splits)?;
        // Unshuffle: row dst of the output belongs to image perm[dst], so image i's key is
        // row inv[i] with inv[perm[dst]] = dst.
        let mut inv = vec![0usize; n];
        for (dst, &src) in perm.iter().enumerate() {
            inv[src] = dst;
        }
        let ku = self.be.gather_rows(&k, &inv, self.cfg.dim)?;
        self.head.normalize(&ku, n)
    }

    /// Query forward, loss, backward for one (query view, key) pair; accumulates into the
    /// gradient buffer.
    fn query_pass(&mut self, x: &[f32], shape: InputShape, k: &B::Buf) -> Result<InfoNceStats> {
        self.query_pass_splits(x, shape, k, self.cfg.bn_splits, true)
    }

    /// [`Moco::query_pass`] with `splits` BatchNorm groups; `check` refuses a non-finite
    /// loss before the backward pass (a distributed step checks the averaged loss instead,
    /// so that every rank stops together).
    fn query_pass_splits(
        &mut self,
        x: &[f32],
        shape: InputShape,
        k: &B::Buf,
        splits: usize,
        check: bool,
    ) -> Result<InfoNceStats> {
        let xd = self.be.upload_f32(x)?;
        let q = self.enc_q.forward(&xd, shape, true, splits)?;
        let (stats, grad) = self.head.loss_normalized_keys(&q, k, shape.n)?;
        if check && !stats.loss.is_finite() {
            return Err(Error::Diverged(format!(
                "loss is {} at step {}",
                stats.loss,
                self.global_step + 1
            )));
        }
        self.enc_q.backward_params(&grad)?;
        Ok(stats)
    }

    fn apply_sgd(&mut self, lr: f64) -> Result<()> {
        let (params, grads) = self.enc_q.params_and_grads();
        self.opt.step(params, grads, lr)
    }

    /// The whole state is finite (see [`Moco::step_with_permutations`]).
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
            "step {} made the state non-finite: {}",
            self.global_step + 1,
            bad.join(", ")
        )))
    }
}
