//! Datasets, augmentation and the prefetching loader.
//!
//! * [`Dataset`]: labelled images held in memory as `u8`, **CHW** per image (all of channel 0,
//!   then channel 1, ...), images back to back, so the whole set is `N x C x H x W`, the same
//!   order as the `f32` NCHW batches the model eats and as CIFAR's files.
//! * Readers: [`synthetic`] (the default, generated in code), [`idx`] (MNIST, Fashion-MNIST,
//!   KMNIST), [`cifar`] (CIFAR-10/100 binary), [`folder`] (one subfolder per class, JPEG/PNG).
//!   [`open_dataset`] picks one by name.
//! * [`augment`]: the MoCo v1 / v2 / CIFAR augmentations and the plain eval transform.
//! * [`source`]: what a loader draws from: a [`Dataset`] in memory, or an image folder
//!   indexed and decoded per sample ([`folder::FolderIndex`]), photos at their own size.
//! * [`loader`]: shuffled, seeded, prefetched batches of two views (training) or one (eval).
//!
//! ```
//! use moco::data::{open_dataset, augment::Augment, loader::Loader};
//! let train = open_dataset("synthetic", None, true, 32, 0).unwrap();
//! let aug = Augment::v2(32, &train.mean, &train.std).unwrap();
//! let loader = Loader::train(train, aug, 64, 7).unwrap();
//! let batch = loader.epoch(0).next().unwrap();
//! assert_eq!((batch.n, batch.c, batch.h, batch.w), (64, 3, 32, 32));
//! assert_eq!(batch.x_q.len(), 64 * 3 * 32 * 32);
//! ```
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::{Error, Result};

pub mod augment;
pub mod cifar;
pub mod folder;
pub mod idx;
pub mod jpeg;
pub mod loader;
pub mod source;
pub mod synthetic;

pub use augment::Augment;
pub use loader::{Batch, Loader};
pub use source::{Image, Layout, Source};

/// Labelled images in memory.
///
/// `images` holds `len() * channels * height * width` bytes: image `i` is
/// `images[i * image_len()..(i + 1) * image_len()]`, stored CHW (planar), 0 = black,
/// 255 = full intensity.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Short name ("synthetic", "fashion-mnist train", "cifar10 test", ...).
    pub name: String,
    /// Channels per image: 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// All images, `N x C x H x W`, `u8`.
    pub images: Vec<u8>,
    /// One label per image, each `< num_classes`.
    pub labels: Vec<u32>,
    /// Number of classes.
    pub num_classes: usize,
    /// Per-channel mean (of pixel values scaled to [0, 1]) used to normalize this data set.
    ///
    /// CIFAR-10/100 and image folders carry the usual published constants (CIFAR's and
    /// ImageNet's); the synthetic and IDX sets carry their own statistics computed over
    /// the split that was loaded (see [`Dataset::channel_stats`]). Use the *training*
    /// split's values for every split of a run.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation, as [`Dataset::mean`].
    pub std: Vec<f32>,
    /// Class names when the source has them (folder names), else empty.
    pub class_names: Vec<String>,
}

impl Dataset {
    /// Builds a data set after checking that every size agrees and every label is in range.
    /// `mean`/`std` are set from [`Dataset::channel_stats`]; overwrite them if needed.
    pub fn new(
        name: impl Into<String>,
        channels: usize,
        height: usize,
        width: usize,
        images: Vec<u8>,
        labels: Vec<u32>,
        num_classes: usize,
    ) -> Result<Dataset> {
        let name = name.into();
        if channels != 1 && channels != 3 {
            return Err(Error::invalid(format!(
                "{name}: images must have 1 or 3 channels, not {channels}"
            )));
        }
        if height == 0 || width == 0 {
            return Err(Error::invalid(format!(
                "{name}: image size {height}x{width} is empty"
            )));
        }
        let per = channels * height * width;
        if images.len() != labels.len() * per {
            return Err(Error::invalid(format!(
                "{name}: {} bytes of pixels for {} labels of {channels}x{height}x{width} images",
                images.len(),
                labels.len()
            )));
        }
        if let Some((i, &l)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= num_classes)
        {
            return Err(Error::invalid(format!(
                "{name}: label {l} of image {i} is out of range for {num_classes} classes"
            )));
        }
        let mut ds = Dataset {
            name,
            channels,
            height,
            width,
            images,
            labels,
            num_classes,
            mean: vec![0.5; channels],
            std: vec![0.5; channels],
            class_names: Vec::new(),
        };
        let (mean, std) = ds.channel_stats();
        ds.mean = mean;
        ds.std = std;
        Ok(ds)
    }

    /// Checks the invariants [`Dataset::new`] establishes (the fields are public, so a
    /// changed data set may break them): sizes agree, labels in range, one mean/std per
    /// channel with std > 0. The [`Loader`] calls it.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(format!("{}: {m}", self.name)));
        if self.channels == 0 || self.height == 0 || self.width == 0 {
            return bad(format!(
                "empty image shape {}x{}x{}",
                self.channels, self.height, self.width
            ));
        }
        let per = self
            .channels
            .checked_mul(self.height)
            .and_then(|v| v.checked_mul(self.width));
        if per.and_then(|p| p.checked_mul(self.labels.len())) != Some(self.images.len()) {
            return bad(format!(
                "{} bytes of pixels for {} labels of {}x{}x{} images",
                self.images.len(),
                self.labels.len(),
                self.channels,
                self.height,
                self.width
            ));
        }
        if let Some(l) = self
            .labels
            .iter()
            .find(|&&l| l as usize >= self.num_classes)
        {
            return bad(format!(
                "label {l} is out of range for {} classes",
                self.num_classes
            ));
        }
        if self.mean.len() != self.channels
            || self.std.len() != self.channels
            || self.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
            || self.mean.iter().any(|m| !m.is_finite())
        {
            return bad(format!(
                "normalization mean {:?} / std {:?} must have one finite value per channel, std > 0",
                self.mean, self.std
            ));
        }
        Ok(())
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes per image (`channels * height * width`).
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Image `i`, CHW. Panics if `i >= len()` (an index, not user data).
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// Per-channel mean and standard deviation of the pixels scaled to [0, 1], over the
    /// whole set (f64 sums, so the result does not depend on any thread count). A channel
    /// with zero spread gets std 1 so normalizing never divides by zero.
    pub fn channel_stats(&self) -> (Vec<f32>, Vec<f32>) {
        let plane = self.height * self.width;
        let mut mean = Vec::with_capacity(self.channels);
        let mut std = Vec::with_capacity(self.channels);
        for c in 0..self.channels {
            let mut hist = [0u64; 256];
            for img in self.images.chunks_exact(self.image_len().max(1)) {
                for &p in &img[c * plane..(c + 1) * plane] {
                    hist[p as usize] += 1;
                }
            }
            let n: u64 = hist.iter().sum();
            if n == 0 {
                mean.push(0.5);
                std.push(0.5);
                continue;
            }
            let (mut s, mut s2) = (0.0f64, 0.0f64);
            for (v, &cnt) in hist.iter().enumerate() {
                let x = v as f64 / 255.0;
                s += x * cnt as f64;
                s2 += x * x * cnt as f64;
            }
            let m = s / n as f64;
            let var = (s2 / n as f64 - m * m).max(0.0);
            mean.push(m as f32);
            std.push(if var > 1e-12 { var.sqrt() as f32 } else { 1.0 });
        }
        (mean, std)
    }

    /// A data set with only the first `n` images (or all, if fewer): for quick runs.
    pub fn truncate(mut self, n: usize) -> Dataset {
        if n < self.len() {
            self.labels.truncate(n);
            self.images.truncate(n * self.image_len());
        }
        self
    }
}

/// The data sets [`open_dataset`] knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetKind {
    /// Built-in procedural shapes ([`synthetic`]); needs no path.
    Synthetic,
    /// IDX files: MNIST, Fashion-MNIST, KMNIST ([`idx`]).
    Idx,
    /// CIFAR-10 binary version ([`cifar`]).
    Cifar10,
    /// CIFAR-100 binary version ([`cifar`]).
    Cifar100,
    /// One subfolder per class of JPEG/PNG files ([`folder`]).
    Folder,
}

impl DatasetKind {
    /// The name [`FromStr`] accepts.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Synthetic => "synthetic",
            DatasetKind::Idx => "idx",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
            DatasetKind::Folder => "folder",
        }
    }
}

impl FromStr for DatasetKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "synthetic" | "synth" => DatasetKind::Synthetic,
            "idx" | "mnist" | "fashion-mnist" | "fashion_mnist" | "kmnist" => DatasetKind::Idx,
            "cifar10" | "cifar-10" => DatasetKind::Cifar10,
            "cifar100" | "cifar-100" => DatasetKind::Cifar100,
            "folder" | "imagefolder" | "imagenet" => DatasetKind::Folder,
            _ => {
                return Err(Error::invalid(format!(
                    "unknown data set {s:?}; use synthetic, idx, cifar10, cifar100 or folder"
                )))
            }
        })
    }
}

serde_via_str!(DatasetKind);

impl std::fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a run's data comes from: kind, path, image size, seed. [`DataSpec::open`] loads a split.
#[derive(Clone, Debug, PartialEq)]
pub struct DataSpec {
    /// Which reader.
    pub kind: DatasetKind,
    /// Directory holding the files (not needed for [`DatasetKind::Synthetic`]).
    pub path: Option<PathBuf>,
    /// Side of the square images for the synthetic set and image folders (stored size);
    /// IDX and CIFAR keep their native size (the augmentation resizes).
    pub image_size: usize,
    /// Seed of the synthetic set (other readers ignore it).
    pub seed: u64,
    /// What the image-folder reader does with files it cannot decode (others ignore it).
    pub bad_images: folder::BadImages,
}

impl DataSpec {
    /// The training (`train = true`) or test split as a loader [`Source`]: image folders
    /// are indexed and streamed ([`folder::FolderIndex`]: files named like images that are
    /// not readable files are reported, or are errors under `--bad-images error`), the
    /// other kinds are loaded into memory ([`DataSpec::open_memory`]).
    pub fn open(&self, train: bool) -> Result<Source> {
        if self.kind != DatasetKind::Folder {
            return Ok(self.open_memory(train)?.into());
        }
        let (index, skipped) =
            folder::FolderIndex::open(self.need_path()?, train, self.bad_images)?;
        report_skipped(&skipped, index.len(), index.name(), "could not be used");
        Ok(index.into())
    }

    fn need_path(&self) -> Result<&Path> {
        self.path.as_deref().ok_or_else(|| {
            Error::invalid(format!("data set {} needs a path (--data DIR)", self.kind))
        })
    }

    /// Loads the training (`train = true`) or test split into memory: an image folder is
    /// decoded whole at `image_size` squares ([`folder::load_report`], for small folders).
    pub fn open_memory(&self, train: bool) -> Result<Dataset> {
        match self.kind {
            DatasetKind::Synthetic => {
                let cfg = synthetic::SyntheticConfig {
                    size: self.image_size,
                    seed: self.seed,
                    ..Default::default()
                };
                cfg.generate(train)
            }
            DatasetKind::Idx => idx::load_dir(self.need_path()?, train),
            DatasetKind::Cifar10 => cifar::load_cifar10(self.need_path()?, train),
            DatasetKind::Cifar100 => cifar::load_cifar100(self.need_path()?, train),
            DatasetKind::Folder => {
                let (ds, skipped) = folder::load_report(
                    self.need_path()?,
                    train,
                    self.image_size,
                    self.bad_images,
                )?;
                report_skipped(&skipped, ds.len(), &ds.name, "could not be decoded");
                Ok(ds)
            }
        }
    }

    /// Opens the training and the test split ([`DataSpec::open`]) and checks that they
    /// agree ([`check_splits`]).
    pub fn open_splits(&self) -> Result<(Source, Source)> {
        let train = self.open(true)?;
        let test = self.open(false)?;
        check_splits(&train, &test).map_err(|e| match (&self.path, e) {
            (Some(p), Error::InvalidArgument(m)) => data_err(p, m),
            (_, e) => e,
        })?;
        Ok((train, test))
    }
}

/// Prints each skipped file (the first 20) and their count to stderr.
fn report_skipped(skipped: &[folder::Skipped], kept: usize, name: &str, why: &str) {
    if skipped.is_empty() {
        return;
    }
    for s in skipped.iter().take(20) {
        eprintln!("moco: skipped {}", s.error);
    }
    if skipped.len() > 20 {
        eprintln!("moco: ... and {} more", skipped.len() - 20);
    }
    eprintln!(
        "moco: skipped {} of {} images of {name} that {why} (--bad-images skip)",
        skipped.len(),
        skipped.len() + kept,
    );
}

/// Checks that a test split can be evaluated against a training split: the same channels
/// (and, for in-memory sets, the same image size), and labels within the training split's
/// classes.
pub fn check_splits(train: &Source, test: &Source) -> Result<()> {
    let shape = |s: &Source| (s.channels(), s.fixed_size());
    let (a, b) = (shape(train), shape(test));
    if a != b {
        let show = |(c, hw): (usize, Option<(usize, usize)>)| match hw {
            Some((h, w)) => format!("{c}x{h}x{w}"),
            None => format!("{c}-channel photos"),
        };
        return Err(Error::invalid(format!(
            "{}: test images are {} (channels x height x width) but the training images ({}) are {}; both splits must have one shape",
            test.name(),
            show(b),
            train.name(),
            show(a)
        )));
    }
    if let Some((i, &l)) = test
        .labels()
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= train.num_classes())
    {
        return Err(Error::invalid(format!(
            "{}: label {l} of test image {i} is not one of the {} classes of the training split ({}); the splits must share their classes",
            test.name(),
            train.num_classes(),
            train.name()
        )));
    }
    Ok(())
}

/// Opens a data set by name: `"synthetic"`, `"idx"`, `"cifar10"`, `"cifar100"` or `"folder"`.
///
/// `path` is the directory holding the files (ignored for synthetic), `train` picks the
/// split, `image_size` is the stored size for synthetic and folder data sets (IDX and CIFAR
/// keep their native 28x28 / 32x32), `seed` seeds the synthetic set.
///
/// ```
/// let test = moco::data::open_dataset("synthetic", None, false, 32, 0).unwrap();
/// assert_eq!((test.channels, test.height, test.width, test.num_classes), (3, 32, 32, 10));
/// assert!(moco::data::open_dataset("cifar10", None, true, 32, 0).is_err()); // needs a path
/// ```
pub fn open_dataset(
    kind: &str,
    path: Option<&Path>,
    train: bool,
    image_size: usize,
    seed: u64,
) -> Result<Dataset> {
    DataSpec {
        kind: kind.parse()?,
        path: path.map(Path::to_path_buf),
        image_size,
        seed,
        bad_images: folder::BadImages::Error,
    }
    .open_memory(train)
}

/// Shorthand for a malformed-file error.
pub(crate) fn data_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        message: message.into(),
    }
}
