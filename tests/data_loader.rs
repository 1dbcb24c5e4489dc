//! The loader: seeded shuffling, worker-count independence, resume, eval order.
use std::sync::Arc;

use moco::data::augment::Augment;
use moco::data::loader::Loader;
use moco::data::synthetic::SyntheticConfig;
use moco::data::Dataset;

fn data(n: usize) -> Arc<Dataset> {
    Arc::new(
        SyntheticConfig {
            size: 16,
            train_len: n,
            test_len: n,
            seed: 3,
        }
        .generate(true)
        .unwrap(),
    )
}

fn train_loader(ds: &Arc<Dataset>, workers: usize, prefetch: usize) -> Loader {
    let aug = Augment::v2(16, &ds.mean, &ds.std).unwrap();
    Loader::train(ds.clone(), aug, 8, 42)
        .unwrap()
        .workers(workers)
        .unwrap()
        .prefetch(prefetch)
        .unwrap()
}

#[test]
fn output_is_independent_of_worker_count_and_prefetch() {
    let ds = data(37);
    let one: Vec<_> = train_loader(&ds, 1, 1).epoch(2).collect();
    let three: Vec<_> = train_loader(&ds, 3, 5).epoch(2).collect();
    assert_eq!(one.len(), 4); // 37 / 8, drop_last
    assert_eq!(one, three);
    // The synchronous path agrees too.
    let l = train_loader(&ds, 2, 2);
    for (s, b) in one.iter().enumerate() {
        assert_eq!(&l.batch(2, s).unwrap(), b);
    }
}

#[test]
fn batches_have_two_distinct_views_and_matching_labels() {
    let ds = data(20);
    let l = train_loader(&ds, 2, 2);
    let b = l.epoch(0).next().unwrap();
    assert_eq!((b.n, b.c, b.h, b.w), (8, 3, 16, 16));
    assert_eq!(b.x_q.len(), 8 * 3 * 256);
    assert_eq!(b.x_k.len(), b.x_q.len());
    assert_ne!(b.x_q, b.x_k);
    assert!(b.x_q.iter().chain(&b.x_k).all(|v| v.is_finite()));
    for (i, &idx) in b.indices.iter().enumerate() {
        assert_eq!(b.labels[i], ds.labels[idx]);
    }
}

#[test]
fn epochs_are_distinct_permutations_with_drop_last() {
    let ds = data(37);
    let l = train_loader(&ds, 2, 2);
    let p0 = l.permutation(0);
    let p1 = l.permutation(1);
    assert_ne!(p0, p1);
    let mut s = p0.clone();
    s.sort();
    assert_eq!(s, (0..37).collect::<Vec<_>>());
    let seen: Vec<usize> = l.epoch(0).flat_map(|b| b.indices).collect();
    assert_eq!(seen, p0[..32].to_vec());
    // Same seed, same order; another seed, another order.
    assert_eq!(train_loader(&ds, 1, 1).permutation(0), p0);
    let other = Loader::train(
        ds.clone(),
        Augment::v2(16, &ds.mean, &ds.std).unwrap(),
        8,
        43,
    )
    .unwrap();
    assert_ne!(other.permutation(0), p0);
    // Views differ between epochs even for the same image.
    let a = l.batch(0, 0).unwrap();
    let b = l.batch(1, 0).unwrap();
    assert_ne!(a.x_q, b.x_q);
}

#[test]
fn resume_mid_epoch_yields_the_remaining_batches() {
    let ds = data(37);
    let l = train_loader(&ds, 2, 3);
    let full: Vec<_> = l.epoch(5).collect();
    let resumed: Vec<_> = l.epoch_from(5, 2).unwrap().collect();
    assert_eq!(resumed.len(), 2);
    assert_eq!(resumed[..], full[2..]);
    assert_eq!(resumed[0].step, 2);
    assert_eq!(l.epoch_from(5, 4).unwrap().count(), 0);
    assert!(l.epoch_from(5, 5).is_err());
    assert!(l.batch(5, 4).is_err());
}

#[test]
fn dropping_an_epoch_early_stops_cleanly() {
    let ds = data(64);
    let l = train_loader(&ds, 2, 1);
    let mut it = l.epoch(0);
    let first = it.next().unwrap();
    drop(it);
    assert_eq!(first, l.batch(0, 0).unwrap());
}

#[test]
fn eval_loader_is_in_order_one_view_keeps_last_batch() {
    let ds = data(19);
    let l = Loader::eval(ds.clone(), Augment::eval(16, &ds.mean, &ds.std).unwrap(), 8).unwrap();
    let bs: Vec<_> = l.epoch(0).collect();
    assert_eq!(bs.iter().map(|b| b.n).collect::<Vec<_>>(), vec![8, 8, 3]);
    let idx: Vec<usize> = bs.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(idx, (0..19).collect::<Vec<_>>());
    assert!(bs[0].x_k.is_empty());
    // Eval views are the normalized images themselves (16x16 stored, 16x16 out).
    let x = &bs[0].x_q[..3 * 256];
    for ch in 0..3 {
        for p in 0..256 {
            let want = (ds.image(0)[ch * 256 + p] as f32 / 255.0 - ds.mean[ch]) / ds.std[ch];
            assert!((x[ch * 256 + p] - want).abs() < 1e-5);
        }
    }
    // Same every epoch.
    assert_eq!(l.batch(3, 1).unwrap().x_q, bs[1].x_q);
}

#[test]
fn bad_loader_settings_are_errors() {
    let ds = data(10);
    let aug = Augment::v2(16, &ds.mean, &ds.std).unwrap();
    assert!(Loader::train(ds.clone(), aug.clone(), 0, 1).is_err());
    assert!(Loader::train(ds.clone(), aug.clone(), 11, 1).is_err()); // no full batch
    assert!(Loader::train(ds.clone(), aug.clone(), 4, 1)
        .unwrap()
        .workers(0)
        .is_err());
    assert!(Loader::train(ds.clone(), aug.clone(), 4, 1)
        .unwrap()
        .prefetch(0)
        .is_err());
    // An absurd prefetch is refused, not allocated (the channel's slots come up front).
    let e = Loader::train(ds.clone(), aug.clone(), 4, 1)
        .unwrap()
        .prefetch(100_000_000)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 to 64"), "{e}");
    let grey = Augment::v2(16, &[0.5], &[0.5]).unwrap();
    assert!(Loader::train(ds.clone(), grey, 4, 1).is_err()); // channel mismatch
    assert!(Loader::eval(ds.clone(), aug.clone(), 11).is_ok()); // eval keeps the partial batch
                                                                // A data set broken after construction is refused, not indexed out of bounds.
    let mut broken = (*ds).clone();
    broken.images.truncate(100);
    assert!(Loader::train(Arc::new(broken), aug.clone(), 4, 1).is_err());
    let mut broken = (*ds).clone();
    broken.labels[3] = 10;
    assert!(Loader::train(Arc::new(broken), aug, 4, 1).is_err());
}

#[test]
fn single_channel_data_loads_with_the_v2_subset() {
    // A one-channel data set (as IDX gives) through the v2 augmentation.
    let n = 12;
    let images: Vec<u8> = (0..n * 28 * 28).map(|i| (i * 7 % 256) as u8).collect();
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
    let ds = Arc::new(Dataset::new("grey", 1, 28, 28, images, labels, 10).unwrap());
    let l = Loader::train(
        ds.clone(),
        Augment::v2(32, &ds.mean, &ds.std).unwrap(),
        4,
        0,
    )
    .unwrap();
    let b = l.epoch(0).next().unwrap();
    assert_eq!((b.c, b.h, b.w), (1, 32, 32));
    assert!(b.x_q.iter().all(|v| v.is_finite()));
}

/// Batches built in recycled buffers (stale views of other images, a shorter last eval
/// batch after full ones) equal batches built in fresh ones, element for element.
#[test]
fn recycled_buffers_give_the_same_batches() {
    let ds = data(37);
    let fresh: Vec<_> = train_loader(&ds, 2, 2).epoch(1).collect();
    let l = train_loader(&ds, 2, 2);
    let mut it = l.epoch(1);
    let mut got = Vec::new();
    while let Some(b) = it.try_next() {
        let b = b.unwrap();
        got.push(b.clone());
        l.recycle(b);
    }
    assert_eq!(got, fresh);
    // An eval loader: 37 images in batches of 8, the last one of 5.
    let aug = Augment::eval(16, &ds.mean, &ds.std).unwrap();
    let ev = Loader::eval(ds.clone(), aug, 8).unwrap();
    let fresh: Vec<_> = ev.epoch(0).collect();
    let mut got = Vec::new();
    // Pre-fill the spare list with buffers of garbage, larger than any batch.
    ev.recycle(moco::data::loader::Batch {
        x_q: vec![f32::NAN; 10_000],
        x_k: vec![f32::NAN; 10_000],
        ..fresh[0].clone()
    });
    let mut it = ev.epoch(0);
    while let Some(b) = it.try_next() {
        let b = b.unwrap();
        got.push(b.clone());
        ev.recycle(b);
    }
    assert_eq!(got.last().unwrap().n, 5);
    assert_eq!(got, fresh);
}
