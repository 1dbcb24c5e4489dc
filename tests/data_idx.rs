//! IDX reader (MNIST / Fashion-MNIST / KMNIST): generated files, malformed files, and the
//! real Fashion-MNIST when the Debian package `dataset-fashion-mnist` is installed.
use std::io::Write;
use std::path::{Path, PathBuf};

use moco::data::idx;
use moco::Error;

fn idx_bytes(magic_type: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, magic_type, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Writes a split of `n` images of 4x3 with pixel value `i * 12 + p` and label `i % 10`.
fn write_split(dir: &Path, prefix: &str, n: usize, gzip: bool) -> (Vec<u8>, Vec<u8>) {
    let pixels: Vec<u8> = (0..n * 12).map(|p| (p % 251) as u8).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    let ib = idx_bytes(8, &[n as u32, 4, 3], &pixels);
    let lb = idx_bytes(8, &[n as u32], &labels);
    let ext = if gzip { ".gz" } else { "" };
    std::fs::write(
        dir.join(format!("{prefix}-images-idx3-ubyte{ext}")),
        if gzip { gz(&ib) } else { ib },
    )
    .unwrap();
    std::fs::write(
        dir.join(format!("{prefix}-labels-idx1-ubyte{ext}")),
        if gzip { gz(&lb) } else { lb },
    )
    .unwrap();
    (pixels, labels)
}

/// Asserts `r` is a `Data` error about `file` whose message contains `needle`.
#[track_caller]
fn assert_data_err<T: std::fmt::Debug>(r: moco::Result<T>, file: &Path, needle: &str) {
    match r {
        Err(Error::Data { path, message }) => {
            assert_eq!(path, file, "error names the wrong file: {message}");
            assert!(
                message.contains(needle),
                "message {message:?} lacks {needle:?}"
            );
        }
        other => panic!(
            "expected a Data error about {}, got {other:?}",
            file.display()
        ),
    }
}

#[test]
fn reads_plain_and_gzipped_splits() {
    let dir = tempfile::tempdir().unwrap();
    let (px, lb) = write_split(dir.path(), "train", 25, false);
    let (px_t, lb_t) = write_split(dir.path(), "t10k", 7, true);
    let train = idx::load_dir(dir.path(), true).unwrap();
    assert_eq!(
        (train.len(), train.channels, train.height, train.width),
        (25, 1, 4, 3)
    );
    assert_eq!(train.images, px);
    assert_eq!(
        train.labels,
        lb.iter().map(|&l| l as u32).collect::<Vec<_>>()
    );
    assert_eq!(train.num_classes, 10);
    assert_eq!(train.image(1), &px[12..24]);
    let test = idx::load_dir(dir.path(), false).unwrap();
    assert_eq!(test.len(), 7);
    assert_eq!(test.images, px_t);
    assert_eq!(test.labels.len(), lb_t.len());
    // Own statistics, in [0, 1].
    assert!(train.mean[0] > 0.0 && train.mean[0] < 1.0 && train.std[0] > 0.0);
    // Through the by-name entry point too.
    let by_name = moco::data::open_dataset("idx", Some(dir.path()), true, 32, 0).unwrap();
    assert_eq!(by_name.images, train.images);
}

#[test]
fn labels_above_nine_widen_the_class_count() {
    let dir = tempfile::tempdir().unwrap();
    let im = dir.path().join("im");
    let lb = dir.path().join("lb");
    std::fs::write(&im, idx_bytes(8, &[3, 2, 2], &[0; 12])).unwrap();
    std::fs::write(&lb, idx_bytes(8, &[3], &[0, 46, 3])).unwrap();
    let ds = idx::load(&im, &lb, "emnist-ish").unwrap();
    assert_eq!(ds.num_classes, 47);
}

#[test]
fn malformed_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let im = d.join("train-images-idx3-ubyte");
    let lb = d.join("train-labels-idx1-ubyte");
    let good_labels = idx_bytes(8, &[4], &[1, 2, 3, 4]);
    std::fs::write(&lb, &good_labels).unwrap();

    // Truncated data.
    let mut b = idx_bytes(8, &[4, 5, 5], &[7; 100]);
    b.truncate(b.len() - 1);
    std::fs::write(&im, &b).unwrap();
    assert_data_err(idx::load_dir(d, true), &im, "truncated");
    // Truncated header.
    std::fs::write(&im, [0u8, 0, 8, 3, 0, 0]).unwrap();
    assert_data_err(idx::load_dir(d, true), &im, "truncated");
    std::fs::write(&im, [0u8, 0]).unwrap();
    assert_data_err(idx::load_dir(d, true), &im, "truncated");
    // Wrong magic (a PNG header, say).
    std::fs::write(&im, b"\x89PNG\r\n\x1a\n....").unwrap();
    assert_data_err(idx::load_dir(d, true), &im, "magic");
    // Wrong element type (0x0D = float).
    std::fs::write(&im, idx_bytes(0x0D, &[4, 5, 5], &[0; 400])).unwrap();
    assert_data_err(idx::load_dir(d, true), &im, "type");
    // Wrong number of dimensions.
    std::fs::write(&im, idx_bytes(8, &[4, 25], &[0; 100])).unwrap();
    assert_data_err(idx::load_dir(d, true), &im, "3 dimensions");
    // Trailing garbage.
    let mut b = idx_bytes(8, &[4, 5, 5], &[7; 100]);
    b.push(0);
    std::fs::write(&im, &b).unwrap();
    assert_data_err(idx::load_dir(d, true), &im, "trailing");
    // Label count mismatch.
    std::fs::write(&im, idx_bytes(8, &[5, 5, 5], &[7; 125])).unwrap();
    assert_data_err(idx::load_dir(d, true), &lb, "5 images");
    // Labels with two dimensions.
    std::fs::write(&im, idx_bytes(8, &[4, 5, 5], &[7; 100])).unwrap();
    std::fs::write(&lb, idx_bytes(8, &[2, 2], &[1, 2, 3, 4])).unwrap();
    assert_data_err(idx::load_dir(d, true), &lb, "1 dimension");
    // Now both good: loads.
    std::fs::write(&lb, &good_labels).unwrap();
    assert_eq!(idx::load_dir(d, true).unwrap().len(), 4);

    // Truncated gzip stream.
    std::fs::remove_file(&im).unwrap();
    let img_gz = d.join("train-images-idx3-ubyte.gz");
    let z = gz(&idx_bytes(8, &[4, 5, 5], &[7; 100]));
    std::fs::write(&img_gz, &z[..z.len() / 2]).unwrap();
    assert_data_err(idx::load_dir(d, true), &img_gz, "gzip");

    // Missing test split: names the directory.
    assert_data_err(idx::load_dir(d, false), d, "t10k-images-idx3-ubyte");
    // Missing directory: an I/O error naming it.
    let nowhere: PathBuf = d.join("nope");
    match idx::load_dir(&nowhere, true) {
        Err(Error::Io { path, .. }) => assert_eq!(path, nowhere),
        other => panic!("expected an Io error, got {other:?}"),
    }
}

/// The real Fashion-MNIST, when the Debian package is installed
/// (`apt-get install dataset-fashion-mnist`).
#[test]
fn real_fashion_mnist_when_installed() {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    if !dir.join("train-images-idx3-ubyte.gz").is_file() {
        eprintln!(
            "skipped: {} not present (apt-get install dataset-fashion-mnist)",
            dir.display()
        );
        return;
    }
    let train = idx::load_dir(dir, true).unwrap();
    let test = idx::load_dir(dir, false).unwrap();
    assert_eq!(
        (train.len(), train.height, train.width, train.channels),
        (60_000, 28, 28, 1)
    );
    assert_eq!(test.len(), 10_000);
    assert_eq!((train.num_classes, test.num_classes), (10, 10));
    // Balanced: 6000 per class in train, 1000 in test.
    for c in 0..10 {
        assert_eq!(train.labels.iter().filter(|&&l| l == c).count(), 6000);
        assert_eq!(test.labels.iter().filter(|&&l| l == c).count(), 1000);
    }
    // Published statistics of Fashion-MNIST train: mean 0.2860, std 0.3530.
    assert!(
        (train.mean[0] - 0.2860).abs() < 1e-3,
        "mean {}",
        train.mean[0]
    );
    assert!((train.std[0] - 0.3530).abs() < 1e-3, "std {}", train.std[0]);
    // First training label of Fashion-MNIST is 9 (ankle boot), first test label 9 too.
    assert_eq!(train.labels[0], 9);
    assert_eq!(test.labels[0], 9);
}

fn write_idx(dir: &Path, prefix: &str, dims: &[u32], labels: &[u8]) {
    let n: usize = dims.iter().map(|&d| d as usize).product();
    let pixels: Vec<u8> = (0..n).map(|p| (p % 253) as u8).collect();
    std::fs::write(
        dir.join(format!("{prefix}-images-idx3-ubyte")),
        idx_bytes(8, dims, &pixels),
    )
    .unwrap();
    std::fs::write(
        dir.join(format!("{prefix}-labels-idx1-ubyte")),
        idx_bytes(8, &[labels.len() as u32], labels),
    )
    .unwrap();
}

/// A small CPU run on the IDX files of `dir`.
fn idx_run(dir: &Path) -> moco::Result<moco::train::Trainer<moco::backend::Cpu>> {
    let cfg = moco::train::TrainConfig {
        dataset: moco::data::DatasetKind::Idx,
        data: Some(dir.to_path_buf()),
        arch: moco::model::Arch::Resnet8,
        dim: 8,
        batch_size: 4,
        bn_splits: 1,
        moco_k: 8,
        knn_k: 2,
        device: moco::DeviceSpec::Is(moco::Device::Cpu),
        epochs: 1,
        ..Default::default()
    };
    moco::train::Trainer::new(cfg, moco::backend::Cpu::<f32>::new())
}

/// Issue 13 item 10: test labels outside the training classes, and test images of another
/// size than the training images, were accepted. Both are errors naming the test split.
#[test]
fn test_split_must_match_the_training_split() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let train_labels: Vec<u8> = (0..8).map(|i| i % 10).collect();
    write_idx(d, "train", &[8, 8, 8], &train_labels);
    write_idx(d, "t10k", &[4, 8, 8], &[0, 1, 2, 3]);
    idx_run(d).unwrap();
    // Label 12: not one of the training split's 10 classes.
    write_idx(d, "t10k", &[4, 8, 8], &[0, 1, 12, 3]);
    let e = idx_run(d).err().expect("label 12 refused").to_string();
    assert!(e.contains("label 12") && e.contains("10 classes"), "{e}");
    assert!(e.contains("test"), "{e}");
    // Test images of 9x8.
    write_idx(d, "t10k", &[4, 9, 8], &[0, 1, 2, 3]);
    let e = idx_run(d).err().expect("9x8 refused").to_string();
    assert!(e.contains("1x9x8") && e.contains("1x8x8"), "{e}");
    // The check on its own.
    let spec = moco::data::DataSpec {
        kind: moco::data::DatasetKind::Idx,
        path: Some(d.to_path_buf()),
        image_size: 32,
        seed: 0,
        bad_images: Default::default(),
    };
    assert!(spec.open_splits().is_err());
    write_idx(d, "t10k", &[4, 8, 8], &[0, 1, 2, 9]);
    let (tr, te) = spec.open_splits().unwrap();
    moco::data::check_splits(&tr, &te).unwrap();
}
