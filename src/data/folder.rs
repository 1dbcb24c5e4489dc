//! Image folders in the ImageNet / torchvision `ImageFolder` layout.
//!
//! ```text
//! root/train/<class>/*.{jpg,jpeg,png}     root/val/<class>/*.{jpg,jpeg,png}
//! ```
//!
//! Classes are the subfolders of `root/train` sorted by name (label = position; hidden
//! folders, whose names start with a dot, are skipped), for both
//! splits, so a class missing from `val/` keeps its label. The test split is `root/val` or,
//! failing that, `root/test`. A `root` without a `train/` subfolder is itself the class root
//! and serves both splits.
//!
//! Training streams the folder: [`FolderIndex`] lists the files and labels, and the
//! loader's workers read and decode each image when it is drawn, every epoch, at the
//! photo's own size; the augmentations crop from the whole photo (torchvision's
//! `RandomResizedCrop`). Memory is bounded by the batches in flight, not by the folder
//! (ImageNet-1k works). Normalization uses ImageNet's statistics ([`IMAGENET_MEAN`],
//! [`IMAGENET_STD`]).
//!
//! [`load`] is the other way, for small folders and tests: every image decoded (in
//! parallel), resized so its shorter side is `image_size` (triangle filter, antialiased),
//! center-cropped to a square and held in memory (`N * 3 * image_size^2` bytes).
//!
//! ```no_run
//! let ds = moco::data::folder::load("data/imagenette", true, 64).unwrap();
//! println!("{} images of {} classes", ds.len(), ds.num_classes);
//! ```
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::source::Image;
use super::{data_err, Dataset};
use crate::{Error, Result};

/// ImageNet channel means (RGB, [0, 1] scale).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        .unwrap_or(false)
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<(PathBuf, std::fs::FileType)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        // From the directory entry itself: no extra system call on most file systems.
        let t = e.file_type().map_err(|err| Error::io(e.path(), err))?;
        out.push((e.path(), t));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Largest image file read, in bytes (256 MiB): a bigger file is an error, not read.
pub const MAX_FILE_BYTES: u64 = 256 << 20;
/// Largest width or height of a decoded image (32768 pixels).
pub const MAX_SIDE: u32 = 1 << 15;
/// Most pixels of a decoded image (2^27 = 134 million, 384 MiB as RGB); the decoder's
/// own allocation limit is set from it.
pub const MAX_DECODED_PIXELS: u64 = 1 << 27;
/// Largest ratio of the longer to the shorter side (64).
pub const MAX_ASPECT: u64 = 64;
/// Most pixels of an image after the resize of its shorter side to the stored size
/// (2^26 = 67 million, 192 MiB as RGB), before the center crop.
pub const MAX_RESIZED_PIXELS: u64 = 1 << 26;

/// What the folder reader does with an image it cannot decode (corrupt, truncated,
/// unsupported, too large).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BadImages {
    /// Stop with an error naming the file (the default).
    #[default]
    Error,
    /// Leave the image out, and report each one and their count (see [`load_report`]).
    Skip,
}

impl BadImages {
    /// The name [`FromStr`](std::str::FromStr) accepts: `error` or `skip`.
    pub fn name(self) -> &'static str {
        match self {
            BadImages::Error => "error",
            BadImages::Skip => "skip",
        }
    }
}

impl std::str::FromStr for BadImages {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "error" => Ok(BadImages::Error),
            "skip" => Ok(BadImages::Skip),
            _ => Err(Error::invalid(format!(
                "--bad-images must be error or skip, not {s:?}"
            ))),
        }
    }
}

serde_via_str!(BadImages);

impl std::fmt::Display for BadImages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Runs a third-party decoder and turns a panic in it into an error naming the file: a
/// crafted JPEG makes zune-jpeg 0.5.15 fail an assertion in its upsampler (found by the
/// `image` fuzz target; `fuzz/regressions/image/`). The panic message is still printed
/// by the default hook. Needs `panic = "unwind"`, the default.
fn guard<T>(path: &Path, format: &str, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let why = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        data_err(
            path,
            format!("cannot decode {format}: the decoder failed on this file ({why})"),
        )
    })
}

/// Decodes an image file's bytes (JPEG or PNG, found by their signature) to RGB, with
/// the bounds of this module: at most [`MAX_SIDE`] per side and [`MAX_DECODED_PIXELS`].
/// JPEGs are checked by [`jpeg::check`](super::jpeg::check) (truncation, corrupt image
/// data), then decoded strictly (a decoder warning is an error). `path` is only used in
/// the error messages.
pub fn decode_rgb(bytes: &[u8], path: &Path) -> Result<image::RgbImage> {
    let bad = |m: String| data_err(path, m);
    let check_dims = |w: u64, h: u64| -> Result<()> {
        if w == 0 || h == 0 {
            return Err(bad(format!("image has no pixels ({w}x{h})")));
        }
        if w > MAX_SIDE as u64 || h > MAX_SIDE as u64 || w * h > MAX_DECODED_PIXELS {
            return Err(bad(format!(
                "image is {w}x{h} pixels, larger than the reader's limit ({MAX_SIDE} per side, {MAX_DECODED_PIXELS} pixels); downscale it or leave it out"
            )));
        }
        Ok(())
    };
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        use zune_jpeg::zune_core::bytestream::ZCursor;
        use zune_jpeg::zune_core::colorspace::ColorSpace;
        use zune_jpeg::zune_core::options::DecoderOptions;
        super::jpeg::check(bytes).map_err(|m| bad(format!("cannot decode JPEG: {m}")))?;
        let options = DecoderOptions::default()
            .set_strict_mode(true)
            .set_max_width(MAX_SIDE as usize)
            .set_max_height(MAX_SIDE as usize)
            .jpeg_set_out_colorspace(ColorSpace::RGB);
        let mut dec = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
        dec.decode_headers()
            .map_err(|e| bad(format!("cannot decode JPEG: {e:?}")))?;
        let (w, h) = dec
            .dimensions()
            .ok_or_else(|| bad("cannot decode JPEG: no frame header".into()))?;
        check_dims(w as u64, h as u64)?;
        let pixels = guard(path, "JPEG", || dec.decode())?
            .map_err(|e| bad(format!("cannot decode JPEG: {e:?}")))?;
        let got = dec.output_colorspace();
        if got != Some(ColorSpace::RGB) || pixels.len() != w * h * 3 {
            return Err(bad(format!(
                "cannot decode JPEG: decoder gave {} bytes of {got:?} for {w}x{h} RGB",
                pixels.len()
            )));
        }
        image::RgbImage::from_raw(w as u32, h as u32, pixels)
            .ok_or_else(|| bad("cannot decode JPEG: wrong buffer size".into()))
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        // The header alone (a few bytes), to report the size in our own words ...
        let reader =
            image::ImageReader::with_format(std::io::Cursor::new(bytes), image::ImageFormat::Png);
        let (w, h) = reader
            .into_dimensions()
            .map_err(|e| bad(format!("cannot decode PNG: {e}")))?;
        check_dims(w as u64, h as u64)?;
        // ... then the image, with the decoder's limits set as well.
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(MAX_SIDE);
        limits.max_image_height = Some(MAX_SIDE);
        // 16-bit RGBA is the widest a PNG decodes to: 8 bytes a pixel.
        limits.max_alloc = Some(MAX_DECODED_PIXELS * 8);
        let mut reader =
            image::ImageReader::with_format(std::io::Cursor::new(bytes), image::ImageFormat::Png);
        reader.limits(limits);
        let img = guard(path, "PNG", || reader.decode())?
            .map_err(|e| bad(format!("cannot decode PNG: {e}")))?;
        Ok(img.to_rgb8())
    } else {
        Err(bad(
            "not a JPEG or PNG file (its first bytes are neither signature)".into(),
        ))
    }
}

/// The size an image of `w x h` pixels is resized to so that its shorter side is `size`
/// (the longer side rounded, never below `size`), or an error naming `path` when the
/// aspect ratio exceeds [`MAX_ASPECT`] or the result would exceed [`MAX_RESIZED_PIXELS`].
pub fn resize_target(path: &Path, w: u32, h: u32, size: usize) -> Result<(u32, u32)> {
    let (w, h, s) = (w as u64, h as u64, size as u64);
    if w == 0 || h == 0 || s == 0 {
        return Err(data_err(path, format!("image has no pixels ({w}x{h})")));
    }
    let (short, long) = (w.min(h), w.max(h));
    if long > short * MAX_ASPECT {
        return Err(data_err(
            path,
            format!(
                "image is {w}x{h} pixels: its aspect ratio exceeds {MAX_ASPECT}:1, the reader's limit; crop it or leave it out"
            ),
        ));
    }
    // round(long * s / short), in integers (no overflow: long, s < 2^32).
    let scaled = ((2 * long * s + short) / (2 * short)).max(s);
    if scaled.saturating_mul(s) > MAX_RESIZED_PIXELS {
        let (nw, nh) = if w <= h { (s, scaled) } else { (scaled, s) };
        return Err(data_err(
            path,
            format!(
                "image is {w}x{h} pixels: resized to a shorter side of {s} it would be {nw}x{nh}, more than the reader's limit of {MAX_RESIZED_PIXELS} pixels; use a smaller --image-size or crop it"
            ),
        ));
    }
    let scaled = scaled as u32; // <= MAX_RESIZED_PIXELS
    Ok(if w <= h {
        (s as u32, scaled)
    } else {
        (scaled, s as u32)
    })
}

/// Decodes an image file's bytes and returns it as `size x size` RGB, CHW: shorter side
/// resized to `size`, then center-cropped. `path` is only used in the error messages.
pub fn decode_image(bytes: &[u8], path: &Path, size: usize) -> Result<Vec<u8>> {
    if !(1..=4096).contains(&size) {
        return Err(Error::invalid(format!(
            "image size must be in 1..=4096, not {size}"
        )));
    }
    let img = decode_rgb(bytes, path)?;
    let (w, h) = (img.width(), img.height());
    let (nw, nh) = resize_target(path, w, h, size)?;
    let resized = if (nw, nh) == (w, h) {
        img
    } else {
        image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle)
    };
    let (nw, nh) = (nw as usize, nh as usize);
    let (x0, y0) = ((nw - size) / 2, (nh - size) / 2);
    let plane = size * size;
    let mut out = vec![0u8; 3 * plane];
    let raw = resized.as_raw();
    for y in 0..size {
        let row = &raw[((y0 + y) * nw + x0) * 3..((y0 + y) * nw + x0 + size) * 3];
        for (x, p) in row.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + y * size + x] = p[c];
            }
        }
    }
    Ok(out)
}

/// Reads an image file's bytes, refusing anything that is not a regular file (a named
/// pipe, a device, a directory: opened without blocking, then checked) and anything larger
/// than [`MAX_FILE_BYTES`] (checked again while reading, in case the file grows).
pub fn read_image_file(path: &Path) -> Result<Vec<u8>> {
    crate::fsio::read_regular(path, MAX_FILE_BYTES, "image file")
}

/// Decodes one image file and returns it as `size x size` RGB, CHW (see [`decode_image`]).
pub fn load_image(path: &Path, size: usize) -> Result<Vec<u8>> {
    let bytes = read_image_file(path)?;
    decode_image(&bytes, path, size)
}

/// Loads the training or test split of an image folder at `image_size` x `image_size`.
/// Any image that cannot be decoded is an error naming it ([`BadImages::Error`]).
pub fn load(root: impl AsRef<Path>, train: bool, image_size: usize) -> Result<Dataset> {
    Ok(load_report(root, train, image_size, BadImages::Error)?.0)
}

/// An image [`load_report`] or [`FolderIndex::open`] left out, and why.
#[derive(Debug)]
pub struct Skipped {
    /// The file.
    pub path: PathBuf,
    /// The error that reading it gave.
    pub error: Error,
}

/// The files of one split of an image folder, before anything is decoded.
struct Listing {
    name: String,
    split_root: PathBuf,
    classes: Vec<String>,
    files: Vec<(PathBuf, u32)>,
    skipped: Vec<Skipped>,
}

/// A directory's entries sorted by name, with their names as UTF-8 (a name that is not
/// valid UTF-8 is an error naming it: two such names could not be told apart).
fn read_dir_named(dir: &Path) -> Result<Vec<(String, PathBuf, std::fs::FileType)>> {
    let mut out = Vec::new();
    for (p, t) in read_dir_sorted(dir)? {
        let name = p.file_name().unwrap_or_default();
        let Some(s) = name.to_str() else {
            return Err(data_err(
                &p,
                format!(
                    "the name {:?} is not valid UTF-8; rename it (class names and labels are taken from folder names)",
                    name.to_string_lossy()
                ),
            ));
        };
        out.push((s.to_string(), p, t));
    }
    Ok(out)
}

/// The class folders under `dir` (sorted; hidden ones, starting with a dot, skipped).
/// A symlink to a folder counts as a folder.
fn class_folders(dir: &Path) -> Result<Vec<String>> {
    Ok(read_dir_named(dir)?
        .into_iter()
        .filter(|(n, p, _)| !n.starts_with('.') && p.is_dir())
        .map(|(n, ..)| n)
        .collect())
}

/// Lists one split: classes from `train/` (or the root), files with an image extension
/// from the split's class folders. An entry named like an image that is not a readable
/// regular file (a directory, a pipe, a device, a broken link, a link loop) is an error
/// naming it, or, with [`BadImages::Skip`], left out and reported. A class folder of the
/// test split that the training split does not have is an error.
fn list_split(root: &Path, train: bool, bad_images: BadImages) -> Result<Listing> {
    let meta = std::fs::metadata(root).map_err(|e| Error::io(root, e))?;
    if !meta.is_dir() {
        return Err(data_err(root, "is not a directory"));
    }
    let train_dir = root.join("train");
    let has_split = train_dir.is_dir();
    let class_root = if has_split {
        train_dir.clone()
    } else {
        root.to_path_buf()
    };
    let split_root = if !has_split || train {
        class_root.clone()
    } else if root.join("val").is_dir() {
        root.join("val")
    } else if root.join("test").is_dir() {
        root.join("test")
    } else {
        return Err(data_err(
            root,
            "has a train/ folder but no val/ or test/ folder for the test split",
        ));
    };
    let classes = class_folders(&class_root)?;
    if classes.is_empty() {
        return Err(data_err(
            &class_root,
            "no class subfolders (expected one folder of images per class)",
        ));
    }
    if split_root != class_root {
        let extra: Vec<String> = class_folders(&split_root)?
            .into_iter()
            .filter(|c| classes.binary_search(c).is_err())
            .collect();
        if !extra.is_empty() {
            return Err(data_err(
                &split_root,
                format!(
                    "has class folders that {} does not have: {}; both splits must share their classes",
                    class_root.display(),
                    extra.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    let mut files: Vec<(PathBuf, u32)> = Vec::new();
    let mut skipped = Vec::new();
    for (label, c) in classes.iter().enumerate() {
        let dir = split_root.join(c);
        if !dir.is_dir() {
            continue;
        }
        for (_, p, t) in read_dir_named(&dir)? {
            if !is_image(&p) {
                continue;
            }
            // A regular file is known from its directory entry; anything else is looked
            // at through its links: a broken link or a loop fails here.
            let meta = if t.is_file() {
                Ok(None)
            } else {
                std::fs::metadata(&p).map(Some)
            };
            let problem = match meta {
                Ok(None) => None,
                Ok(Some(m)) if m.is_file() => None,
                Ok(Some(m)) if m.is_dir() => {
                    Some(data_err(&p, "is a directory named like an image"))
                }
                Ok(Some(_)) => Some(data_err(
                    &p,
                    "is not a regular file (a pipe, socket or device named like an image)",
                )),
                Err(e) => Some(data_err(
                    &p,
                    format!("cannot be read ({e}; a broken link or a link loop?)"),
                )),
            };
            match problem {
                None => files.push((p, label as u32)),
                Some(e) if bad_images == BadImages::Skip => {
                    skipped.push(Skipped { path: p, error: e })
                }
                Some(e) => return Err(e),
            }
        }
    }
    if files.is_empty() {
        return Err(data_err(
            &split_root,
            if skipped.is_empty() {
                "no .jpg, .jpeg or .png images in the class subfolders".to_string()
            } else {
                format!(
                    "none of the {} files named like images is a readable file (first: {})",
                    skipped.len(),
                    skipped[0].error
                )
            },
        ));
    }
    let base = root
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "folder".into());
    let split = if train { "train" } else { "test" };
    Ok(Listing {
        name: format!("{base} {split}"),
        split_root,
        classes,
        files,
        skipped,
    })
}

/// As [`load`], with a choice of what to do with images that cannot be decoded: with
/// [`BadImages::Skip`] they are left out and returned, with their errors, next to the
/// data set (an error still if no image is left).
///
/// This decodes the whole split into memory at one square size (shorter side resized,
/// center crop): for small folders. Training streams folders instead ([`FolderIndex`]).
pub fn load_report(
    root: impl AsRef<Path>,
    train: bool,
    image_size: usize,
    bad_images: BadImages,
) -> Result<(Dataset, Vec<Skipped>)> {
    let root = root.as_ref();
    if !(1..=4096).contains(&image_size) {
        return Err(Error::invalid(format!(
            "image size must be in 1..=4096, not {image_size}"
        )));
    }
    let Listing {
        name,
        split_root,
        classes,
        files,
        mut skipped,
    } = list_split(root, train, bad_images)?;
    let decoded: Vec<Result<Vec<u8>>> = files
        .par_iter()
        .map(|(p, _)| load_image(p, image_size))
        .collect();
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for ((p, l), r) in files.iter().zip(decoded) {
        match r {
            Ok(img) => {
                images.extend_from_slice(&img);
                labels.push(*l);
            }
            // Unreadable files (permissions, I/O) are errors in either mode.
            Err(e @ Error::Data { .. }) if bad_images == BadImages::Skip => skipped.push(Skipped {
                path: p.clone(),
                error: e,
            }),
            Err(e) => return Err(e),
        }
    }
    if labels.is_empty() {
        return Err(data_err(
            &split_root,
            format!(
                "none of the {} images could be decoded (first: {})",
                files.len(),
                skipped
                    .first()
                    .map(|s| s.error.to_string())
                    .unwrap_or_default()
            ),
        ));
    }
    let mut ds = Dataset::new(
        name,
        3,
        image_size,
        image_size,
        images,
        labels,
        classes.len(),
    )?;
    ds.mean = IMAGENET_MEAN.to_vec();
    ds.std = IMAGENET_STD.to_vec();
    ds.class_names = classes;
    Ok((ds, skipped))
}

/// How many images a source could not read or decode while training, and the first few
/// of them (see [`FolderIndex::skip_log`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SkipLog {
    /// Times an image was replaced because it could not be read or decoded.
    pub count: u64,
    /// The first few of those errors (at most [`SkipLog::KEEP`]), one line each.
    pub first: Vec<String>,
}

impl SkipLog {
    /// Errors kept in [`SkipLog::first`].
    pub const KEEP: usize = 20;
}

/// One split of an image folder as an index: file paths and labels, nothing decoded.
///
/// The loader's workers read and decode image `i` ([`FolderIndex::load`]) each time it is
/// drawn, so memory does not grow with the folder. Listing is all [`FolderIndex::open`]
/// does (about a second for 50,000 files on a local disk). Files that turn unreadable
/// after the listing are handled by the [`BadImages`] policy when they are drawn.
///
/// ```no_run
/// use moco::data::folder::{BadImages, FolderIndex};
/// let (index, skipped) = FolderIndex::open("data/imagenet", true, BadImages::Error).unwrap();
/// assert!(skipped.is_empty());
/// let img = index.load(0).unwrap(); // decoded now, at the photo's own size
/// println!("{}: {}x{}", index.path(0).unwrap().display(), img.width, img.height);
/// ```
#[derive(Debug)]
pub struct FolderIndex {
    name: String,
    files: Vec<PathBuf>,
    labels: Vec<u32>,
    classes: Vec<String>,
    bad_images: BadImages,
    skips: std::sync::Mutex<SkipLog>,
}

impl FolderIndex {
    /// Lists the training (`train = true`) or test split of the folder at `root` (layout
    /// as [`load`]). Entries named like images that are not readable regular files are
    /// errors, or with [`BadImages::Skip`] returned as skipped; nothing is decoded.
    pub fn open(
        root: impl AsRef<Path>,
        train: bool,
        bad_images: BadImages,
    ) -> Result<(FolderIndex, Vec<Skipped>)> {
        let l = list_split(root.as_ref(), train, bad_images)?;
        let (files, labels) = l.files.into_iter().unzip();
        Ok((
            FolderIndex {
                name: l.name,
                files,
                labels,
                classes: l.classes,
                bad_images,
                skips: Default::default(),
            },
            l.skipped,
        ))
    }

    /// Short name ("imagenet train").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// One label per image (the position of its class folder).
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Number of classes (class folders of the training split).
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Class names, in label order.
    pub fn class_names(&self) -> &[String] {
        &self.classes
    }

    /// The policy for images that cannot be read or decoded.
    pub fn bad_images(&self) -> BadImages {
        self.bad_images
    }

    /// The file of image `i`.
    pub fn path(&self, i: usize) -> Option<&Path> {
        self.files.get(i).map(PathBuf::as_path)
    }

    /// Reads and decodes image `i` to RGB at its own size (interleaved, HWC), with the
    /// bounds of [`decode_rgb`] and [`read_image_file`].
    pub fn load(&self, i: usize) -> Result<Image<'static>> {
        let path = self.files.get(i).ok_or_else(|| {
            Error::invalid(format!(
                "{}: image {i} is out of range for {} images",
                self.name,
                self.files.len()
            ))
        })?;
        let bytes = read_image_file(path)?;
        let img = decode_rgb(&bytes, path)?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        Image::hwc(3, h, w, img.into_raw())
    }

    /// Records that an image could not be used (the loader calls this under
    /// [`BadImages::Skip`]).
    pub fn note_skip(&self, error: &Error) {
        let mut log = self.skips.lock().unwrap_or_else(|p| p.into_inner());
        log.count += 1;
        if log.first.len() < SkipLog::KEEP {
            log.first.push(error.to_string());
        }
    }

    /// The images skipped so far in this process, over every epoch and pass.
    pub fn skip_log(&self) -> SkipLog {
        self.skips.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The same index with only its first `n` images (the skip log starts empty).
    pub fn truncated(&self, n: usize) -> FolderIndex {
        let n = n.min(self.files.len());
        FolderIndex {
            name: self.name.clone(),
            files: self.files[..n].to_vec(),
            labels: self.labels[..n].to_vec(),
            classes: self.classes.clone(),
            bad_images: self.bad_images,
            skips: Default::default(),
        }
    }
}
