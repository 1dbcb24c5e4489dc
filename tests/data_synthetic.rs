//! The built-in synthetic data set.
use moco::data::synthetic::{SyntheticConfig, CLASS_NAMES, NUM_CLASSES};
use moco::data::{open_dataset, DatasetKind};

#[test]
fn default_sizes_shapes_and_balanced_labels() {
    let train = open_dataset("synthetic", None, true, 32, 0).unwrap();
    let test = open_dataset("synthetic", None, false, 32, 0).unwrap();
    assert_eq!((train.len(), test.len()), (5000, 1000));
    assert_eq!((train.channels, train.height, train.width), (3, 32, 32));
    assert_eq!(train.num_classes, NUM_CLASSES);
    assert_eq!(train.class_names.len(), CLASS_NAMES.len());
    for c in 0..NUM_CLASSES as u32 {
        assert_eq!(train.labels.iter().filter(|&&l| l == c).count(), 500);
    }
    assert_eq!(train.images.len(), 5000 * 3 * 1024);
    // Not degenerate: pixels spread over the range, splits differ.
    assert!(train.std.iter().all(|&s| s > 0.15), "std {:?}", train.std);
    assert_ne!(train.images[..3072], test.images[..3072]);
}

#[test]
fn deterministic_from_the_seed() {
    let cfg = SyntheticConfig {
        train_len: 50,
        test_len: 10,
        ..Default::default()
    };
    let a = cfg.generate(true).unwrap();
    assert_eq!(a.images, cfg.generate(true).unwrap().images);
    let b = SyntheticConfig {
        seed: 1,
        ..cfg.clone()
    }
    .generate(true)
    .unwrap();
    assert_ne!(a.images, b.images);
    // A longer set starts with the same images (per-image streams).
    let long = SyntheticConfig {
        train_len: 80,
        ..cfg
    }
    .generate(true)
    .unwrap();
    assert_eq!(long.images[..a.images.len()], a.images[..]);
    // Other sizes work; tiny ones are refused.
    let big = SyntheticConfig {
        size: 64,
        train_len: 3,
        ..Default::default()
    }
    .generate(true)
    .unwrap();
    assert_eq!(big.image_len(), 3 * 64 * 64);
    assert!(SyntheticConfig {
        size: 4,
        ..Default::default()
    }
    .generate(true)
    .is_err());
    assert_eq!(
        "synthetic".parse::<DatasetKind>().unwrap(),
        DatasetKind::Synthetic
    );
    assert!("mnist2".parse::<DatasetKind>().is_err());
}

/// Colour is random per image: mean colour alone should not tell the classes apart, so
/// a learner must use shape. kNN on the per-image mean RGB stays near chance (10%).
#[test]
fn colour_alone_does_not_reveal_the_class() {
    let train = SyntheticConfig {
        train_len: 2000,
        test_len: 500,
        ..Default::default()
    };
    let (tr, te) = (
        train.generate(true).unwrap(),
        train.generate(false).unwrap(),
    );
    let feat = |ds: &moco::data::Dataset| -> Vec<f32> {
        (0..ds.len())
            .flat_map(|i| {
                let img = ds.image(i);
                (0..3).map(move |c| {
                    img[c * 1024..(c + 1) * 1024]
                        .iter()
                        .map(|&v| v as f32)
                        .sum::<f32>()
                        / 1024.0
                        - 128.0
                })
            })
            .collect()
    };
    let acc = moco::eval::knn_top1(
        &feat(&tr),
        &tr.labels,
        &feat(&te),
        &te.labels,
        3,
        20,
        0.1,
        10,
    )
    .unwrap();
    assert!(acc < 0.25, "mean colour predicts the class too well: {acc}");
}
