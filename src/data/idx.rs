//! IDX files: MNIST, Fashion-MNIST, KMNIST (and anything else in that format).
//!
//! A split is two files: `{train,t10k}-images-idx3-ubyte` (magic `0x00000803`: unsigned
//! bytes, three dimensions N x H x W) and `{train,t10k}-labels-idx1-ubyte` (magic
//! `0x00000801`, N labels), each optionally gzipped (`.gz`, detected by its magic bytes).
//! `images.idx3-ubyte` spellings (a dot instead of the dash) are found too. Sizes are
//! big-endian `u32`. The data set has one channel; the class count is
//! `max(10, largest label + 1)`; mean/std are the loaded split's own statistics.
//!
//! ```no_run
//! let train = moco::data::idx::load_dir("/usr/share/datasets/fashion-mnist", true).unwrap();
//! assert_eq!((train.len(), train.height, train.width), (60_000, 28, 28));
//! ```
use std::io::Read;
use std::path::{Path, PathBuf};

use super::{data_err, Dataset};
use crate::{Error, Result};

/// Reads one IDX file of unsigned bytes (gzipped or not): its dimensions and its data.
/// Errors name the file: missing, truncated, wrong magic, sizes that do not match.
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| data_err(path, format!("gzip stream is truncated or corrupt: {e}")))?;
        out
    } else {
        raw
    };
    if bytes.len() < 4 {
        return Err(data_err(
            path,
            format!(
                "truncated: {} bytes, too short for an IDX header",
                bytes.len()
            ),
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(data_err(
            path,
            format!(
                "wrong magic {:02x}{:02x}{:02x}{:02x}: not an IDX file (expected 0000 08 nn)",
                bytes[0], bytes[1], bytes[2], bytes[3]
            ),
        ));
    }
    if bytes[2] != 0x08 {
        return Err(data_err(
            path,
            format!(
                "IDX element type 0x{:02x} is not supported (only unsigned bytes, 0x08)",
                bytes[2]
            ),
        ));
    }
    let ndim = bytes[3] as usize;
    if ndim == 0 {
        return Err(data_err(path, "IDX file with zero dimensions"));
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(data_err(
            path,
            format!(
                "truncated: header needs {header} bytes, file has {}",
                bytes.len()
            ),
        ));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|d| {
            let o = 4 + 4 * d;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| data_err(path, format!("dimensions {dims:?} overflow")))?;
    let have = bytes.len() - header;
    if have < count {
        return Err(data_err(
            path,
            format!("truncated: dimensions {dims:?} need {count} bytes of data, file has {have}"),
        ));
    }
    if have > count {
        return Err(data_err(
            path,
            format!(
                "{} bytes of trailing data after dimensions {dims:?}",
                have - count
            ),
        ));
    }
    let mut bytes = bytes;
    bytes.drain(..header);
    Ok((dims, bytes))
}

/// Loads an image file (N x H x W) and a label file (N) into a one-channel [`Dataset`].
pub fn load(images: &Path, labels: &Path, name: impl Into<String>) -> Result<Dataset> {
    let (idims, pixels) = read_idx(images)?;
    if idims.len() != 3 {
        return Err(data_err(
            images,
            format!(
                "expected 3 dimensions (N x H x W) for images, found {} ({idims:?})",
                idims.len()
            ),
        ));
    }
    if idims[1] == 0 || idims[2] == 0 {
        return Err(data_err(images, format!("empty image size {idims:?}")));
    }
    let (ldims, labels_u8) = read_idx(labels)?;
    if ldims.len() != 1 {
        return Err(data_err(
            labels,
            format!(
                "expected 1 dimension for labels, found {} ({ldims:?})",
                ldims.len()
            ),
        ));
    }
    if ldims[0] != idims[0] {
        return Err(data_err(
            labels,
            format!(
                "{} labels for {} images in {}",
                ldims[0],
                idims[0],
                images.display()
            ),
        ));
    }
    let max = labels_u8.iter().copied().max().unwrap_or(0) as usize;
    let num_classes = (max + 1).max(10);
    let labels: Vec<u32> = labels_u8.iter().map(|&l| l as u32).collect();
    Dataset::new(name, 1, idims[1], idims[2], pixels, labels, num_classes)
}

/// Finds `{prefix}-{kind}-idx{d}-ubyte[.gz]` (or `{prefix}-{kind}.idx{d}-ubyte[.gz]`) in `dir`.
fn find(dir: &Path, prefix: &str, kind: &str, d: u32) -> Result<PathBuf> {
    let names = [
        format!("{prefix}-{kind}-idx{d}-ubyte"),
        format!("{prefix}-{kind}.idx{d}-ubyte"),
    ];
    for n in &names {
        for ext in ["", ".gz"] {
            let p = dir.join(format!("{n}{ext}"));
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(data_err(
        dir,
        format!(
            "no IDX file {}[.gz] in this directory (expected the MNIST file names)",
            names[0]
        ),
    ))
}

/// Loads the training (`train-*`) or test (`t10k-*`) split from a directory of IDX files.
pub fn load_dir(dir: impl AsRef<Path>, train: bool) -> Result<Dataset> {
    let dir = dir.as_ref();
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
        ));
    }
    let prefix = if train { "train" } else { "t10k" };
    let images = find(dir, prefix, "images", 3)?;
    let labels = find(dir, prefix, "labels", 1)?;
    let base = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "idx".into());
    let split = if train { "train" } else { "test" };
    load(&images, &labels, format!("{base} {split}"))
}
