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

/// Writes the five training batches and the test batch, each of the 10000 records the
/// real files hold.
fn write_cifar10(dir: &Path) {
    let per_batch = cifar::RECORDS_PER_BATCH;
    for b in 1..=5 {
        let mut bytes = Vec::with_capacity(per_batch * 3073);
        for i in 0..per_batch {
            let l = ((b * per_batch + i) % 10) as u8;
            bytes.extend(record(&[l], |p| (p as u8).wrapping_add(b as u8)));
        }
        std::fs::write(dir.join(format!("data_batch_{b}.bin")), bytes).unwrap();
    }
    let mut t = Vec::new();
    for i in 0..per_batch {
        t.extend(record(&[(i % 10) as u8], |p| (p / 1024) as u8 * 100));
    }
    std::fs::write(dir.join("test_batch.bin"), t).unwrap();
}

#[test]
fn reads_cifar10_in_order_with_chw_pixels() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&dir).unwrap();
    write_cifar10(&dir);
    // Parent directory is accepted too.
    let train = cifar::load_cifar10(root.path(), true).unwrap();
    assert_eq!(
        (train.len(), train.channels, train.height, train.width),
        (50_000, 3, 32, 32)
    );
    assert_eq!(train.num_classes, 10);
    assert_eq!(train.labels[..6], [0, 1, 2, 3, 4, 5]);
    assert_eq!(train.image(0)[5], 6); // batch 1: p + 1
    assert_eq!(train.image(10_000)[5], 7); // batch 2: p + 2
    assert_eq!(train.mean, cifar::CIFAR10_MEAN.to_vec());
    let test = cifar::load_cifar10(&dir, false).unwrap();
    assert_eq!(test.len(), 10_000);
    assert_eq!(test.labels[..3], [0, 1, 2]);
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
    for i in 2..cifar::CIFAR100_TRAIN_RECORDS {
        b.extend(record(&[0, (i % 100) as u8], |_| 0));
    }
    std::fs::write(dir.path().join("train.bin"), &b).unwrap();
    let mut t = record(&[0, 42], |_| 3);
    for _ in 1..cifar::RECORDS_PER_BATCH {
        t.extend(record(&[0, 0], |_| 0));
    }
    std::fs::write(dir.path().join("test.bin"), &t).unwrap();
    let train = cifar::load_cifar100(dir.path(), true).unwrap();
    assert_eq!(train.labels[..3], [99, 0, 2]);
    assert_eq!(train.num_classes, 100);
    let test = moco::data::open_dataset("cifar100", Some(dir.path()), false, 32, 0).unwrap();
    assert_eq!(test.labels[0], 42);
    // A CIFAR-100 test file of the training file's size is refused.
    std::fs::write(dir.path().join("test.bin"), &b).unwrap();
    assert_data_err(
        cifar::load_cifar100(dir.path(), false),
        &dir.path().join("test.bin"),
        "has 50000 records",
    );
}

#[test]
fn malformed_cifar_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_cifar10(d);
    // Truncated batch 3.
    let b3 = d.join("data_batch_3.bin");
    let full = std::fs::read(&b3).unwrap();
    std::fs::write(&b3, &full[..full.len() - 1]).unwrap();
    assert_data_err(cifar::load_cifar10(d, true), &b3, "truncated");
    // Cut at a record boundary (issue 13 item 10: this loaded 49999 images), or one
    // record too many.
    std::fs::write(&b3, &full[..full.len() - 3073]).unwrap();
    assert_data_err(cifar::load_cifar10(d, true), &b3, "has only 9999 records");
    std::fs::write(&b3, &full[..3073 * 10]).unwrap();
    assert_data_err(cifar::load_cifar10(d, true), &b3, "has only 10 records");
    let mut more = full.clone();
    more.extend_from_slice(&full[..3073]);
    std::fs::write(&b3, &more).unwrap();
    assert_data_err(cifar::load_cifar10(d, true), &b3, "has 10001 records");
    std::fs::write(&b3, &full).unwrap();
    assert_eq!(cifar::load_cifar10(d, true).unwrap().len(), 50_000);
    // Label out of range.
    let t = d.join("test_batch.bin");
    let mut tb = std::fs::read(&t).unwrap();
    tb[5 * 3073] = 10;
    std::fs::write(&t, &tb).unwrap();
    assert_data_err(cifar::load_cifar10(d, false), &t, "record 5: label 10");
    // Empty file.
    std::fs::write(&t, b"").unwrap();
    assert_data_err(cifar::load_cifar10(d, false), &t, "empty");
    // CIFAR-100 label out of range, and CIFAR-10 files read as CIFAR-100 (size mismatch).
    let tr = d.join("train.bin");
    let (mut im, mut lb) = (Vec::new(), Vec::new());
    let r = cifar::parse_records(
        &tr,
        &record(&[0, 100], |_| 0),
        2,
        100,
        None,
        &mut im,
        &mut lb,
    );
    assert_data_err(r, &tr, "label 100");
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
