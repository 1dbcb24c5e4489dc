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
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

use super::{data_err, Dataset};
use crate::{Error, Result};

/// Most data bytes an IDX file may promise (16 GiB): a header asking for more is an error.
pub const MAX_IDX_BYTES: usize = 1 << 34;

/// Reads one IDX file of unsigned bytes (gzipped or not): its dimensions and its data.
/// Errors name the file: missing, truncated, wrong magic, sizes that do not match.
///
/// The file is streamed: the header is read and checked first, then exactly the bytes
/// it promises are read (so a gzip bomb is never inflated beyond them), then one more
/// byte is asked for, to reject trailing data.
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let file = crate::fsio::open_regular(path)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    read_idx_stream(path, std::io::BufReader::new(file), len)
}

/// [`read_idx`] on an open stream of `len` bytes (a file's, or a slice's), gzipped or not
/// (found by the gzip magic bytes). `path` is only used in the error messages.
pub fn read_idx_stream(
    path: &Path,
    mut input: impl BufRead,
    len: u64,
) -> Result<(Vec<usize>, Vec<u8>)> {
    let mut magic = [0u8; 2];
    let n = read_full(&mut input, &mut magic).map_err(|e| Error::io(path, e))?;
    let input = std::io::Cursor::new(magic).take(n as u64).chain(input);
    if magic[..n] == [0x1f, 0x8b] {
        read_idx_from(path, flate2::bufread::GzDecoder::new(input), None)
    } else {
        read_idx_from(path, input, Some(len))
    }
}

/// Reads into `buf` until it is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Parses an IDX file of unsigned bytes from a stream that is already uncompressed (see
/// [`read_idx`], which handles gzip): its dimensions and its data. `path` is only used in
/// the error messages; `total_len`, when known, is the stream's length, checked against
/// the header before any data is read.
pub fn read_idx_from(
    path: &Path,
    mut input: impl Read,
    total_len: Option<u64>,
) -> Result<(Vec<usize>, Vec<u8>)> {
    let gz = total_len.is_none();
    let io_err = |e: std::io::Error| {
        if gz {
            data_err(path, format!("gzip stream is truncated or corrupt: {e}"))
        } else {
            Error::io(path, e)
        }
    };
    let mut magic = [0u8; 4];
    let got = read_full(&mut input, &mut magic).map_err(io_err)?;
    if got < 4 {
        return Err(data_err(
            path,
            format!("truncated: {got} bytes, too short for an IDX header"),
        ));
    }
    if magic[0] != 0 || magic[1] != 0 {
        return Err(data_err(
            path,
            format!(
                "wrong magic {:02x}{:02x}{:02x}{:02x}: not an IDX file (expected 0000 08 nn)",
                magic[0], magic[1], magic[2], magic[3]
            ),
        ));
    }
    if magic[2] != 0x08 {
        return Err(data_err(
            path,
            format!(
                "IDX element type 0x{:02x} is not supported (only unsigned bytes, 0x08)",
                magic[2]
            ),
        ));
    }
    let ndim = magic[3] as usize;
    if ndim == 0 {
        return Err(data_err(path, "IDX file with zero dimensions"));
    }
    let header = 4 + 4 * ndim;
    let mut raw_dims = vec![0u8; 4 * ndim];
    let got = read_full(&mut input, &mut raw_dims).map_err(io_err)?;
    if got < raw_dims.len() {
        return Err(data_err(
            path,
            format!(
                "truncated: header needs {header} bytes, file has {}",
                4 + got
            ),
        ));
    }
    let dims: Vec<usize> = raw_dims
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&c| c <= MAX_IDX_BYTES)
        .ok_or_else(|| {
            data_err(
                path,
                format!("dimensions {dims:?} ask for more than {MAX_IDX_BYTES} bytes of data"),
            )
        })?;
    if let Some(len) = total_len {
        let have = len.saturating_sub(header as u64);
        if have < count as u64 {
            return Err(data_err(
                path,
                format!(
                    "truncated: dimensions {dims:?} need {count} bytes of data, file has {have}"
                ),
            ));
        }
        if have > count as u64 {
            return Err(data_err(
                path,
                format!(
                    "{} bytes of trailing data after dimensions {dims:?}",
                    have - count as u64
                ),
            ));
        }
    }
    // Reads grow the buffer as data arrives: a header that promises more than the file
    // holds costs no more memory than the file.
    let mut data = Vec::with_capacity(count.min(1 << 24));
    (&mut input)
        .take(count as u64)
        .read_to_end(&mut data)
        .map_err(io_err)?;
    if data.len() < count {
        return Err(data_err(
            path,
            format!(
                "truncated: dimensions {dims:?} need {count} bytes of data, file has {}",
                data.len()
            ),
        ));
    }
    let mut extra = [0u8; 1];
    if read_full(&mut input, &mut extra).map_err(io_err)? > 0 {
        return Err(data_err(
            path,
            format!("trailing data after the {count} bytes that dimensions {dims:?} call for"),
        ));
    }
    Ok((dims, data))
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
