//! Batches of augmented views: seeded shuffling, prefetching workers, resumable.
//!
//! A [`Loader`] turns a [`Source`] (a [`Dataset`](super::Dataset) in memory, or an image
//! folder read and decoded per sample) into [`Batch`]es of `f32` NCHW tensors. Epoch `e` visits
//! the images in a permutation seeded from `(seed, e)` (training) or in order (eval); the
//! views of the image at dataset index `i` in epoch `e` are drawn from a ChaCha8 stream
//! seeded from `(seed, e, i)` (query view first, then key view). The batches therefore
//! depend only on the seed, never on the number of workers or on timing.
//!
//! [`Loader::epoch_from`] starts an epoch at any step (checkpoint resume) and yields exactly
//! what the uninterrupted epoch would have from that step on. Batches are built by a
//! background thread that fills a bounded channel (`prefetch` batches ahead) using a private
//! rayon pool of `workers` threads; the consumer only waits when the workers fall behind.
//! Each image is loaded (borrowed, or read and decoded) once per draw and both views are
//! cut from it, so memory is bounded by the batches in flight.
//!
//! A streamed image that cannot be read or decoded when it is drawn ends the epoch with
//! an error naming the file ([`BadImages::Error`]), or ([`BadImages::Skip`]) is replaced by
//! the next image in data-set order that loads, keeping the views' random stream of the
//! original position; each replacement is counted and logged by the source
//! ([`FolderIndex::skip_log`](super::folder::FolderIndex::skip_log)). More than
//! [`MAX_CONSECUTIVE_BAD`] unusable images in a row is an error (the data is gone).
//!
//! ```
//! use std::sync::Arc;
//! use moco::data::{synthetic::SyntheticConfig, augment::Augment, loader::Loader};
//! let ds = Arc::new(SyntheticConfig { train_len: 40, ..Default::default() }.generate(true).unwrap());
//! let aug = Augment::cifar(32, &ds.mean, &ds.std).unwrap();
//! let loader = Loader::train(ds, aug, 16, 1).unwrap().workers(2).unwrap();
//! assert_eq!(loader.steps_per_epoch(), 2); // 40 / 16, last partial batch dropped
//! let batches: Vec<_> = loader.epoch(0).collect();
//! assert_eq!(batches.len(), 2);
//! // Resuming at step 1 gives the same second batch.
//! let resumed = loader.epoch_from(0, 1).unwrap().next().unwrap();
//! assert_eq!(resumed.x_k, batches[1].x_k);
//! ```
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::augment::Augment;
use super::folder::BadImages;
use super::source::{Image, Source};
use super::synthetic::mix;
use crate::{Error, Result};

/// Most loader worker threads (a larger count is refused, not attempted).
pub const MAX_WORKERS: usize = 256;

/// Most batches the loader may build ahead (each holds the batch's views: 308 MB for 256
/// two-view images at 224 px; the channel's slots are allocated up front).
pub const MAX_PREFETCH: usize = 64;

/// Most images in a row that [`BadImages::Skip`] replaces before the batch fails.
pub const MAX_CONSECUTIVE_BAD: usize = 64;

/// One batch, `f32` NCHW.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Query views (or the only view, for eval), `n x c x h x w`.
    pub x_q: Vec<f32>,
    /// Key views, `n x c x h x w`; empty for a one-view (eval) loader.
    pub x_k: Vec<f32>,
    /// Labels of the images.
    pub labels: Vec<u32>,
    /// Dataset indices of the images.
    pub indices: Vec<usize>,
    /// Batch size.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// Epoch this batch belongs to.
    pub epoch: u64,
    /// Step within the epoch.
    pub step: usize,
}

/// The RNG for the views of dataset image `index` in epoch `epoch`.
pub fn sample_rng(seed: u64, epoch: u64, index: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(seed ^ 0x0005_EED0_FA06, epoch, index as u64))
}

fn build_pool(workers: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .thread_name(|i| format!("moco-loader-{i}"))
        .build()
        .map_err(|e| Error::Other(format!("cannot start {workers} loader threads: {e}")))
}

/// Builds batches from a data set; cheap to clone (the data set, the augmentations and the
/// worker pool are shared).
#[derive(Clone, Debug)]
pub struct Loader {
    dataset: Source,
    aug_q: Arc<Augment>,
    aug_k: Option<Arc<Augment>>,
    batch_size: usize,
    seed: u64,
    shuffle: bool,
    drop_last: bool,
    workers: usize,
    prefetch: usize,
    pool: Arc<rayon::ThreadPool>,
    /// (rank, world) of a distributed run: this loader yields rank's share of each batch.
    shard: (usize, usize),
    /// View buffers handed back by [`Loader::recycle`], reused by the next batches (shared
    /// by the clones that build batches ahead).
    spare: Arc<Mutex<Vec<Vec<f32>>>>,
}

impl Loader {
    /// A training loader: two views per image (both with `augment`), shuffled every epoch,
    /// last partial batch dropped; 2 workers, 4 batches of prefetch.
    pub fn train(
        dataset: impl Into<Source>,
        augment: Augment,
        batch_size: usize,
        seed: u64,
    ) -> Result<Loader> {
        let k = Arc::new(augment);
        Self::new(
            dataset.into(),
            k.clone(),
            Some(k),
            batch_size,
            seed,
            true,
            true,
        )
    }

    /// An evaluation loader: one view per image (`augment`, typically [`Augment::eval`]), in
    /// dataset order, last partial batch kept.
    pub fn eval(dataset: impl Into<Source>, augment: Augment, batch_size: usize) -> Result<Loader> {
        Self::new(
            dataset.into(),
            Arc::new(augment),
            None,
            batch_size,
            0,
            false,
            false,
        )
    }

    /// The general constructor: query augmentation, optional key augmentation (two views
    /// when present), shuffling, dropping of the last partial batch.
    pub fn new(
        dataset: Source,
        aug_q: Arc<Augment>,
        aug_k: Option<Arc<Augment>>,
        batch_size: usize,
        seed: u64,
        shuffle: bool,
        drop_last: bool,
    ) -> Result<Loader> {
        if batch_size == 0 {
            return Err(Error::invalid("batch size must be at least 1"));
        }
        dataset.validate()?;
        for a in std::iter::once(&aug_q).chain(aug_k.as_ref()) {
            a.validate()?;
            if a.mean.len() != dataset.channels() {
                return Err(Error::invalid(format!(
                    "augmentation normalizes {} channels but {} has {}",
                    a.mean.len(),
                    dataset.name(),
                    dataset.channels()
                )));
            }
        }
        if let Some(k) = &aug_k {
            if k.size != aug_q.size {
                return Err(Error::invalid(format!(
                    "query and key views differ in size ({} vs {})",
                    aug_q.size, k.size
                )));
            }
        }
        let l = Loader {
            dataset,
            aug_q,
            aug_k,
            batch_size,
            seed,
            shuffle,
            drop_last,
            workers: 2,
            prefetch: 4,
            pool: Arc::new(build_pool(2)?),
            shard: (0, 1),
            spare: Arc::default(),
        };
        if l.steps_per_epoch() == 0 {
            return Err(Error::invalid(format!(
                "{} has {} images, fewer than one batch of {}{}",
                l.dataset.name(),
                l.dataset.len(),
                batch_size,
                if drop_last {
                    " (training drops partial batches)"
                } else {
                    ""
                }
            )));
        }
        Ok(l)
    }

    /// Sets the number of worker threads (>= 1). Output does not depend on it.
    pub fn workers(mut self, workers: usize) -> Result<Loader> {
        if workers == 0 || workers > MAX_WORKERS {
            return Err(Error::invalid(format!(
                "the loader takes 1 to {MAX_WORKERS} workers, not {workers}"
            )));
        }
        self.pool = Arc::new(build_pool(workers)?);
        self.workers = workers;
        Ok(self)
    }

    /// Makes this the loader of rank `rank` of `world` in a distributed run: every rank
    /// walks the same epoch order with the same global batch size, and batch `s` of rank
    /// `r` holds the images at positions `r, r + world, ...` of global batch `s` (PyTorch's
    /// `DistributedSampler` deal), with the same augmentations as a single process would
    /// draw for them. The global batch must split evenly.
    pub fn shard(mut self, rank: usize, world: usize) -> Result<Loader> {
        crate::dist::check_rank(rank, world)?;
        if !self.batch_size.is_multiple_of(world) || !self.drop_last {
            return Err(Error::invalid(format!(
                "a distributed loader needs whole batches that split over the ranks: batch {} over {world} ranks",
                self.batch_size
            )));
        }
        self.shard = (rank, world);
        Ok(self)
    }

    /// `(rank, world)` of this loader (`(0, 1)` unless [`Loader::shard`] was called).
    pub fn shard_of(&self) -> (usize, usize) {
        self.shard
    }

    /// Sets how many finished batches may wait for the consumer (1 to [`MAX_PREFETCH`]).
    pub fn prefetch(mut self, batches: usize) -> Result<Loader> {
        if batches == 0 || batches > MAX_PREFETCH {
            return Err(Error::invalid(format!(
                "prefetch takes 1 to {MAX_PREFETCH} batches, not {batches}"
            )));
        }
        self.prefetch = batches;
        Ok(self)
    }

    /// The images this loader draws from.
    pub fn source(&self) -> &Source {
        &self.dataset
    }

    /// Batch size (the global one in a distributed run: each rank's batches hold
    /// `batch_size / world` images).
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Output view shape `(c, h, w)`.
    pub fn view_shape(&self) -> (usize, usize, usize) {
        (self.dataset.channels(), self.aug_q.size, self.aug_q.size)
    }

    /// Batches per epoch.
    pub fn steps_per_epoch(&self) -> usize {
        let n = self.dataset.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// The order in which epoch `epoch` visits the data set.
    pub fn permutation(&self, epoch: u64) -> Vec<usize> {
        let mut p: Vec<usize> = (0..self.dataset.len()).collect();
        if self.shuffle {
            let mut r = ChaCha8Rng::seed_from_u64(mix(self.seed, 0x5045_524D, epoch));
            p.shuffle(&mut r);
        }
        p
    }

    /// Most view buffers [`Loader::recycle`] keeps.
    const MAX_SPARE: usize = 16;

    /// Hands a consumed batch's view buffers back for the next batches to fill: a batch
    /// of 256 two-view 224 px images is 308 MB, and fresh memory costs the kernel's page
    /// zeroing on every batch (about a tenth of the loader's time). Optional: a batch
    /// that is dropped instead is simply freed. What comes back is never read, only
    /// overwritten (every element of a view is written when it is built).
    ///
    /// ```
    /// use moco::data::{augment::Augment, loader::Loader, synthetic::SyntheticConfig};
    /// let ds = SyntheticConfig { train_len: 8, ..Default::default() }.generate(true).unwrap();
    /// let aug = Augment::v2(32, &ds.mean, &ds.std).unwrap();
    /// let loader = Loader::train(ds, aug, 4, 0).unwrap();
    /// let mut it = loader.epoch(0);
    /// while let Some(b) = it.try_next() {
    ///     let b = b.unwrap();
    ///     // ... use b.x_q and b.x_k ...
    ///     loader.recycle(b);
    /// }
    /// ```
    pub fn recycle(&self, batch: Batch) {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        for v in [batch.x_q, batch.x_k] {
            if v.capacity() > 0 && spare.len() < Self::MAX_SPARE {
                spare.push(v);
            }
        }
    }

    /// A view buffer of `len` elements: a recycled one when there is one large enough
    /// (its old contents are left, to be overwritten), else zeros.
    fn buffer(&self, len: usize) -> Vec<f32> {
        let reused = {
            let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
            spare
                .iter()
                .position(|v| v.capacity() >= len)
                .map(|i| spare.swap_remove(i))
        };
        match reused {
            Some(mut v) => {
                if v.len() >= len {
                    v.truncate(len);
                } else {
                    v.resize(len, 0.0);
                }
                v
            }
            None => vec![0.0f32; len],
        }
    }

    /// Builds batch `step` of `epoch` in the calling thread's rayon pool (no prefetch).
    pub fn batch(&self, epoch: u64, step: usize) -> Result<Batch> {
        if step >= self.steps_per_epoch() {
            return Err(Error::invalid(format!(
                "step {step} is past the end of an epoch of {} steps",
                self.steps_per_epoch()
            )));
        }
        self.build(&self.permutation(epoch), epoch, step)
    }

    fn build(&self, perm: &[usize], epoch: u64, step: usize) -> Result<Batch> {
        let start = step * self.batch_size;
        let end = (start + self.batch_size).min(perm.len());
        let (rank, world) = self.shard;
        let indices: Vec<usize> = perm[start..end]
            .iter()
            .skip(rank)
            .step_by(world)
            .copied()
            .collect();
        let n = indices.len();
        let (c, h, w) = self.view_shape();
        let per = c * h * w;
        let mut x_q = self.buffer(n * per);
        let mut x_k = if self.aug_k.is_some() {
            self.buffer(n * per)
        } else {
            Vec::new()
        };
        let mut used = indices.clone();
        let work = |((j, q), k): ((usize, &mut [f32]), Option<&mut [f32]>),
                    slot: &mut usize|
         -> Result<()> {
            let i = indices[j];
            let mut rng = sample_rng(self.seed, epoch, i);
            let (got, img) = self.load_or_replace(i)?;
            *slot = got;
            self.aug_q.apply_image(&img, &mut rng, q)?;
            if let (Some(a), Some(k)) = (&self.aug_k, k) {
                a.apply_image(&img, &mut rng, k)?;
            }
            Ok(())
        };
        if self.aug_k.is_some() {
            x_q.par_chunks_mut(per)
                .zip(x_k.par_chunks_mut(per))
                .zip(used.par_iter_mut())
                .enumerate()
                .try_for_each(|(j, ((q, k), slot))| work(((j, q), Some(k)), slot))?;
        } else {
            x_q.par_chunks_mut(per)
                .zip(used.par_iter_mut())
                .enumerate()
                .try_for_each(|(j, (q, slot))| work(((j, q), None), slot))?;
        }
        let labels = self.dataset.labels();
        Ok(Batch {
            x_q,
            x_k,
            labels: used.iter().map(|&i| labels[i]).collect(),
            indices: used,
            n,
            c,
            h,
            w,
            epoch,
            step,
        })
    }

    /// Image `i`, or under [`BadImages::Skip`] the first of `i + 1, i + 2, ...` (wrapping)
    /// that loads when it does not; returns the index used. Every replaced image is noted
    /// in the source's skip log.
    fn load_or_replace(&self, i: usize) -> Result<(usize, Image<'_>)> {
        let len = self.dataset.len();
        let mut first_err = None;
        for t in 0..=MAX_CONSECUTIVE_BAD.min(len.saturating_sub(1)) {
            let at = (i + t) % len;
            match self.dataset.load(at) {
                Ok(img) => return Ok((at, img)),
                Err(e) if self.dataset.bad_images() == BadImages::Skip => {
                    self.dataset.note_skip(&e);
                    first_err.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Other(format!(
            "{}: {} images in a row from position {i} could not be read or decoded (first: {}); is the data still there?",
            self.dataset.name(),
            MAX_CONSECUTIVE_BAD.min(len),
            first_err.map(|e| e.to_string()).unwrap_or_default()
        )))
    }

    /// All batches of `epoch`, prefetched in the background.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        self.spawn(epoch, 0)
    }

    /// The batches of `epoch` from step `start` on (to resume mid-epoch); `start` may equal
    /// [`Loader::steps_per_epoch`] (an empty iterator).
    pub fn epoch_from(&self, epoch: u64, start: usize) -> Result<EpochIter> {
        if start > self.steps_per_epoch() {
            return Err(Error::invalid(format!(
                "cannot start at step {start} of an epoch of {} steps",
                self.steps_per_epoch()
            )));
        }
        Ok(self.spawn(epoch, start))
    }

    fn spawn(&self, epoch: u64, start: usize) -> EpochIter {
        let (tx, rx) = sync_channel::<Result<Batch>>(self.prefetch);
        let me = self.clone();
        let handle = std::thread::Builder::new()
            .name("moco-loader".into())
            .spawn(move || {
                let perm = me.permutation(epoch);
                for step in start..me.steps_per_epoch() {
                    let b = me.pool.install(|| me.build(&perm, epoch, step));
                    let failed = b.is_err();
                    // The consumer hung up: stop.
                    if tx.send(b).is_err() || failed {
                        return;
                    }
                }
            });
        match handle {
            Ok(h) => EpochIter {
                rx: Some(rx),
                handle: Some(h),
                error: None,
            },
            Err(e) => EpochIter {
                rx: None,
                handle: None,
                error: Some(Error::Other(format!("cannot start the loader thread: {e}"))),
            },
        }
    }
}

/// The batches of one epoch, in order. Items are `Batch`; an error (which the in-memory
/// pipeline does not produce after the loader's checks) ends the iteration and is kept
/// in [`EpochIter::error`]. Dropping the iterator stops the background thread.
#[derive(Debug)]
pub struct EpochIter {
    rx: Option<Receiver<Result<Batch>>>,
    handle: Option<JoinHandle<()>>,
    error: Option<Error>,
}

impl EpochIter {
    /// The error that ended the iteration early, if any.
    pub fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }

    /// The next batch, or the error that stopped the epoch; `None` at the end.
    pub fn try_next(&mut self) -> Option<Result<Batch>> {
        if let Some(e) = self.error.take() {
            self.rx = None;
            return Some(Err(e));
        }
        let r = self.rx.as_ref()?.recv().ok();
        if r.is_none() {
            self.rx = None;
        }
        r
    }
}

impl Iterator for EpochIter {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        if self.error.is_some() {
            return None;
        }
        match self.rx.as_ref()?.recv() {
            Ok(Ok(b)) => Some(b),
            Ok(Err(e)) => {
                self.error = Some(e);
                self.rx = None;
                None
            }
            Err(_) => {
                self.rx = None;
                None
            }
        }
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        // Hang up first so a producer blocked on a full channel wakes and exits.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
