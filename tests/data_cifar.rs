//! CIFAR-10 / CIFAR-100 binary readers on generated files, including malformed ones.
use std::path::Path;

use moco::data::cifar;
use moco::Error;

fn record(label: &[u8], fill: impl Fn(usize) -> u8) -> Vec<u8> {
    let mut r = label.to_vec();
    r.extend((0..3072).map(fill));
    r
}

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

fn write_cifar10(dir: &Path, per_batch: usize) {
    for b in 1..=5 {
        let mut bytes = Vec::new();
        for i in 0..per_batch {
            let l = ((b * per_batch + i) % 10) as u8;
            bytes.extend(record(&[l], |p| (p as u8).wrapping_add(b as u8)));
        }
        std::fs::write(dir.join(format!("data_batch_{b}.bin")), bytes).unwrap();
    }
    let mut t = Vec::new();
    for i in 0..3 {
        t.extend(record(&[i as u8], |p| (p / 1024) as u8 * 100));
    }
    std::fs::write(dir.join("test_batch.bin"), t).unwrap();
}

#[test]
fn reads_cifar10_in_order_with_chw_pixels() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&dir).unwrap();
    write_cifar10(&dir, 4);
    // Parent directory is accepted too.
    let train = cifar::load_cifar10(root.path(), true).unwrap();
    assert_eq!(
        (train.len(), train.channels, train.height, train.width),
        (20, 3, 32, 32)
    );
    assert_eq!(train.num_classes, 10);
    assert_eq!(train.labels[..6], [4, 5, 6, 7, 8, 9]);
    assert_eq!(train.image(0)[5], 6); // batch 1: p + 1
    assert_eq!(train.image(4)[5], 7); // batch 2: p + 2
    assert_eq!(train.mean, cifar::CIFAR10_MEAN.to_vec());
    let test = cifar::load_cifar10(&dir, false).unwrap();
    assert_eq!(test.labels, vec![0, 1, 2]);
    // Planar: R plane 0, G plane 100, B plane 200.
    assert_eq!(
        (test.image(0)[0], test.image(0)[1024], test.image(0)[2048]),
        (0, 100, 200)
    );
    let by_name = moco::data::open_dataset("cifar10", Some(&dir), false, 32, 0).unwrap();
    assert_eq!(by_name.images, test.images);
}

#[test]
fn reads_cifar100_fine_labels() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Vec::new();
    b.extend(record(&[3, 99], |_| 1));
    b.extend(record(&[19, 0], |_| 2));
    std::fs::write(dir.path().join("train.bin"), &b).unwrap();
    std::fs::write(dir.path().join("test.bin"), record(&[0, 42], |_| 3)).unwrap();
    let train = cifar::load_cifar100(dir.path(), true).unwrap();
    assert_eq!(train.labels, vec![99, 0]);
    assert_eq!(train.num_classes, 100);
    let test = moco::data::open_dataset("cifar100", Some(dir.path()), false, 32, 0).unwrap();
    assert_eq!(test.labels, vec![42]);
}

#[test]
fn malformed_cifar_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_cifar10(d, 2);
    // Truncated batch 3.
    let b3 = d.join("data_batch_3.bin");
    let mut bytes = std::fs::read(&b3).unwrap();
    bytes.pop();
    std::fs::write(&b3, &bytes).unwrap();
    assert_data_err(cifar::load_cifar10(d, true), &b3, "truncated");
    // Label out of range.
    let t = d.join("test_batch.bin");
    std::fs::write(&t, record(&[10], |_| 0)).unwrap();
    assert_data_err(cifar::load_cifar10(d, false), &t, "label 10");
    // Empty file.
    std::fs::write(&t, b"").unwrap();
    assert_data_err(cifar::load_cifar10(d, false), &t, "empty");
    // CIFAR-100 label out of range, and CIFAR-10 files read as CIFAR-100 (size mismatch).
    let tr = d.join("train.bin");
    std::fs::write(&tr, record(&[0, 100], |_| 0)).unwrap();
    assert_data_err(cifar::load_cifar100(d, true), &tr, "label 100");
    std::fs::write(&tr, record(&[0], |_| 0)).unwrap();
    assert_data_err(cifar::load_cifar100(d, true), &tr, "multiple");
    // Missing batch file: the directory is named.
    std::fs::remove_file(&b3).unwrap();
    match cifar::load_cifar10(d, true) {
        Err(Error::Io { path, .. }) => assert_eq!(path, b3),
        other => panic!("expected Io error, got {other:?}"),
    }
    let empty = tempfile::tempdir().unwrap();
    assert_data_err(
        cifar::load_cifar10(empty.path(), true),
        empty.path(),
        "data_batch_1.bin",
    );
}
