//! CIFAR-10 and CIFAR-100, binary version.
//!
//! CIFAR-10: `data_batch_1.bin` .. `data_batch_5.bin` (train) and `test_batch.bin`, records of
//! 1 label byte + 3072 pixel bytes (R, G, B planes of 32x32: already CHW).
//! Each CIFAR-10 file holds 10000 records; CIFAR-100 `train.bin` 50000 and `test.bin` 10000:
//! a file of any other length is an error (a cut file would otherwise load).
//! CIFAR-100: `train.bin` and `test.bin`, records of 2 label bytes (coarse, fine) + 3072;
//! the fine label (100 classes) is used. The directory may be the one holding the files or
//! its parent (`cifar-10-batches-bin/`, `cifar-100-binary/` are looked into).
//!
//! Normalization uses the published per-channel statistics of the training sets
//! ([`CIFAR10_MEAN`] ..), the same for both splits.
//!
//! ```no_run
//! let test = moco::data::cifar::load_cifar10("data/cifar-10-batches-bin", false).unwrap();
//! assert_eq!((test.len(), test.num_classes), (10_000, 10));
//! ```
use std::path::{Path, PathBuf};

use super::{data_err, Dataset};
use crate::{Error, Result};

/// CIFAR-10 training-set channel means (RGB, [0, 1] scale).
pub const CIFAR10_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
/// CIFAR-10 training-set channel standard deviations.
pub const CIFAR10_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];
/// CIFAR-100 training-set channel means.
pub const CIFAR100_MEAN: [f32; 3] = [0.5071, 0.4865, 0.4409];
/// CIFAR-100 training-set channel standard deviations.
pub const CIFAR100_STD: [f32; 3] = [0.2673, 0.2564, 0.2762];

const PIXELS: usize = 3 * 32 * 32;

/// Records in each CIFAR-10 batch file (`data_batch_N.bin`, `test_batch.bin`) and in the
/// CIFAR-100 test file.
pub const RECORDS_PER_BATCH: usize = 10_000;
/// Records in the CIFAR-100 training file (`train.bin`).
pub const CIFAR100_TRAIN_RECORDS: usize = 50_000;

/// Parses the records of one CIFAR file: `label_bytes` label bytes per record, of which the
/// last is the class (`< num_classes`), then 3072 pixels; appends pixels and labels.
/// `expected` is the record count the file must hold (`None`: any positive count).
/// `path` is only used in the error messages.
pub fn parse_records(
    path: &Path,
    bytes: &[u8],
    label_bytes: usize,
    num_classes: usize,
    expected: Option<usize>,
    images: &mut Vec<u8>,
    labels: &mut Vec<u32>,
) -> Result<()> {
    if label_bytes == 0 {
        return Err(Error::invalid("a CIFAR record has at least one label byte"));
    }
    let rec = label_bytes + PIXELS;
    check_size(path, bytes.len() as u64, rec, expected)?;
    images.reserve(bytes.len() / rec * PIXELS);
    labels.reserve(bytes.len() / rec);
    for (i, r) in bytes.chunks_exact(rec).enumerate() {
        let l = r[label_bytes - 1] as usize;
        if l >= num_classes {
            return Err(data_err(
                path,
                format!("record {i}: label {l} is out of range for {num_classes} classes"),
            ));
        }
        labels.push(l as u32);
        images.extend_from_slice(&r[label_bytes..]);
    }
    Ok(())
}

/// Checks a CIFAR file's length against the record size and the expected count.
fn check_size(path: &Path, len: u64, rec: usize, expected: Option<usize>) -> Result<()> {
    if len == 0 {
        return Err(data_err(path, "empty file"));
    }
    if !len.is_multiple_of(rec as u64) {
        return Err(data_err(
            path,
            format!(
                "truncated or not a CIFAR binary file: {len} bytes is not a multiple of the {rec}-byte record"
            ),
        ));
    }
    if let Some(n) = expected {
        let have = len / rec as u64;
        if have != n as u64 {
            return Err(data_err(
                path,
                format!(
                    "{} {have} records of {rec} bytes, the CIFAR binary version's file holds {n}; download it again",
                    if have < n as u64 { "truncated: has only" } else { "has" }
                ),
            ));
        }
    }
    Ok(())
}

/// Reads CIFAR records from `files`: `label_bytes` label bytes per record, of which the last
/// is the class (`< num_classes`), then 3072 pixels. Each file must hold `expected` records
/// when that is given (its length is checked before it is read).
pub fn read_records(
    files: &[PathBuf],
    label_bytes: usize,
    num_classes: usize,
    expected: Option<usize>,
    name: &str,
) -> Result<Dataset> {
    let rec = label_bytes + PIXELS;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for f in files {
        let len = std::fs::metadata(f).map_err(|e| Error::io(f, e))?.len();
        check_size(f, len, rec, expected)?;
        let bytes = std::fs::read(f).map_err(|e| Error::io(f, e))?;
        parse_records(
            f,
            &bytes,
            label_bytes,
            num_classes,
            expected,
            &mut images,
            &mut labels,
        )?;
    }
    Dataset::new(name, 3, 32, 32, images, labels, num_classes)
}

/// The directory that holds `probe`: `dir` itself or one of `subdirs`.
fn locate(dir: &Path, probe: &str, subdirs: &[&str]) -> Result<PathBuf> {
    if dir.join(probe).is_file() {
        return Ok(dir.to_path_buf());
    }
    for s in subdirs {
        if dir.join(s).join(probe).is_file() {
            return Ok(dir.join(s));
        }
    }
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
        ));
    }
    Err(data_err(
        dir,
        format!("no {probe} here (expected the CIFAR binary version's files)"),
    ))
}

/// Loads CIFAR-10 (binary version) from `dir`: the 50000 training or 10000 test images.
pub fn load_cifar10(dir: impl AsRef<Path>, train: bool) -> Result<Dataset> {
    let dir = dir.as_ref();
    let (files, split): (Vec<String>, _) = if train {
        (
            (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
            "train",
        )
    } else {
        (vec!["test_batch.bin".into()], "test")
    };
    let root = locate(dir, &files[0], &["cifar-10-batches-bin"])?;
    let paths: Vec<PathBuf> = files.iter().map(|f| root.join(f)).collect();
    let mut ds = read_records(
        &paths,
        1,
        10,
        Some(RECORDS_PER_BATCH),
        &format!("cifar10 {split}"),
    )?;
    ds.mean = CIFAR10_MEAN.to_vec();
    ds.std = CIFAR10_STD.to_vec();
    ds.class_names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Ok(ds)
}

/// Loads CIFAR-100 (binary version, fine labels) from `dir`.
pub fn load_cifar100(dir: impl AsRef<Path>, train: bool) -> Result<Dataset> {
    let dir = dir.as_ref();
    let (file, split, records) = if train {
        ("train.bin", "train", CIFAR100_TRAIN_RECORDS)
    } else {
        ("test.bin", "test", RECORDS_PER_BATCH)
    };
    let root = locate(dir, file, &["cifar-100-binary"])?;
    let mut ds = read_records(
        &[root.join(file)],
        2,
        100,
        Some(records),
        &format!("cifar100 {split}"),
    )?;
    ds.mean = CIFAR100_MEAN.to_vec();
    ds.std = CIFAR100_STD.to_vec();
    Ok(ds)
}
