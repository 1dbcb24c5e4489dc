//! `moco bench-data`: the data loader alone (read, decode, two augmented views, normalized
//! `f32` NCHW batches, as the trainer receives them), images/s as one JSON line.
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use moco::data::augment::{Augment, Preset};
use moco::data::folder::BadImages;
use moco::data::{DataSpec, DatasetKind, Loader};
use moco::{Error, Result};

/// Flags of `moco bench-data`.
#[derive(Args, Debug)]
pub struct BenchDataArgs {
    /// The data: an image folder (torchvision ImageFolder layout), or a data set directory.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Kind of data set: folder, synthetic, idx, cifar10, cifar100. [folder]
    #[arg(long, default_value = "folder")]
    pub dataset: DatasetKind,
    /// Augmentation: v1, v2, cifar or eval. [v2]
    #[arg(long, default_value = "v2")]
    pub augment: Preset,
    /// Side of the views. [224]
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// Images per batch. [256]
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Loader worker threads. [2]
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Finished batches the loader may hold ahead. [4]
    #[arg(long, default_value_t = 4)]
    pub prefetch: usize,
    /// Timed batches, after one untimed warm-up batch. [10]
    #[arg(long, default_value_t = 10)]
    pub batches: usize,
    /// Seed of the order and the views. [0]
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// What to do with images that cannot be decoded: error or skip. [error]
    #[arg(long, default_value = "error")]
    pub bad_images: BadImages,
}

/// Peak resident memory of this process so far, in bytes (Linux; `None` elsewhere).
pub fn peak_rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line["VmHWM:".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Runs `moco bench-data`: prints one JSON line.
pub fn run(a: BenchDataArgs) -> Result<()> {
    if a.batches == 0 {
        return Err(Error::invalid("--batches must be at least 1"));
    }
    let spec = DataSpec {
        kind: a.dataset,
        path: a.data.clone(),
        image_size: a.image_size,
        seed: a.seed,
        bad_images: a.bad_images,
    };
    let t_open = Instant::now();
    let source = spec.open(true)?;
    let open_s = t_open.elapsed().as_secs_f64();
    let aug = Augment::preset(a.augment, a.image_size, source.mean(), source.std())?;
    let loader = Loader::train(source.clone(), aug, a.batch_size, a.seed)?
        .workers(a.workers)?
        .prefetch(a.prefetch)?;
    let steps = loader.steps_per_epoch();
    let t_first = Instant::now();
    let mut epoch = 0u64;
    let mut it = loader.epoch(epoch);
    let next = |it: &mut moco::data::loader::EpochIter, epoch: &mut u64| -> Result<usize> {
        loop {
            match it.try_next() {
                Some(b) => {
                    // As the trainer does once a batch is uploaded.
                    let b = b?;
                    let n = b.n;
                    loader.recycle(b);
                    return Ok(n);
                }
                None => {
                    *epoch += 1;
                    *it = loader.epoch(*epoch);
                }
            }
        }
    };
    next(&mut it, &mut epoch)?;
    let first_s = t_first.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let mut images = 0usize;
    for _ in 0..a.batches {
        images += next(&mut it, &mut epoch)?;
    }
    let secs = t0.elapsed().as_secs_f64().max(1e-9);
    drop(it);
    let skipped = source.skip_log().map_or(0, |l| l.count);
    println!(
        "{{\"images_per_sec\":{:.1},\"workers\":{},\"images\":{images},\"batches\":{},\"batch_size\":{},\"image_size\":{},\"augment\":\"{}\",\"dataset\":\"{}\",\"data_images\":{},\"steps_per_epoch\":{steps},\"index_seconds\":{open_s:.3},\"first_batch_seconds\":{first_s:.3},\"seconds\":{secs:.3},\"peak_rss_mib\":{},\"skipped\":{skipped}}}",
        images as f64 / secs,
        a.workers,
        a.batches,
        a.batch_size,
        a.image_size,
        a.augment,
        a.dataset,
        source.len(),
        peak_rss_bytes().map_or("null".to_string(), |b| format!("{:.1}", b as f64 / 1048576.0)),
    );
    Ok(())
}
