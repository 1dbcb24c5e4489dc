//! Data pipeline throughput (images/s): augmentation of one view, the loader's two-view
//! training batches with 1 and 2 workers, synthetic generation, and the kNN monitor.
//!
//! `cargo bench --bench data` (`MOCO_BENCH_QUICK=1` for a short run).
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moco::data::augment::{Augment, Preset};
use moco::data::loader::Loader;
use moco::data::synthetic::SyntheticConfig;
use rand::Rng;

mod common;

fn augment(c: &mut Criterion) {
    let mut g = c.benchmark_group("augment_view");
    g.throughput(Throughput::Elements(1));
    // (name, stored side, output side): CIFAR-sized and ImageNet-sized views.
    for (side, out) in [(32usize, 32usize), (256, 224)] {
        let mut r = moco::testing::rng(1);
        let img: Vec<u8> = (0..3 * side * side).map(|_| r.random()).collect();
        for preset in [Preset::V1, Preset::V2, Preset::Cifar, Preset::Eval] {
            let aug = Augment::preset(preset, out, &[0.5; 3], &[0.25; 3]).unwrap();
            let mut dst = vec![0.0f32; 3 * out * out];
            let mut rng = moco::testing::rng(2);
            g.bench_with_input(
                BenchmarkId::new(format!("{preset:?}"), format!("{side}to{out}")),
                &side,
                |b, _| b.iter(|| aug.apply(&img, 3, side, side, &mut rng, &mut dst).unwrap()),
            );
        }
    }
    g.finish();
}

fn loader(c: &mut Criterion) {
    let mut g = c.benchmark_group("loader_epoch");
    let n = 2048;
    let ds = Arc::new(
        SyntheticConfig {
            train_len: n,
            ..Default::default()
        }
        .generate(true)
        .unwrap(),
    );
    // Images per second; each image yields two augmented views.
    g.throughput(Throughput::Elements(n as u64));
    for preset in [Preset::V2, Preset::Cifar] {
        for workers in [1usize, 2] {
            let aug = Augment::preset(preset, 32, &ds.mean, &ds.std).unwrap();
            let l = Loader::train(ds.clone(), aug, 256, 0)
                .unwrap()
                .workers(workers)
                .unwrap();
            g.bench_with_input(
                BenchmarkId::new(format!("{preset:?}_32px_2views"), format!("{workers}w")),
                &workers,
                |b, _| b.iter(|| l.epoch(0).map(|b| b.n).sum::<usize>()),
            );
        }
    }
    g.finish();
}

fn synthetic(c: &mut Criterion) {
    let mut g = c.benchmark_group("synthetic_generate");
    g.throughput(Throughput::Elements(1000));
    let cfg = SyntheticConfig {
        train_len: 1000,
        ..Default::default()
    };
    g.bench_function("1000x32px", |b| b.iter(|| cfg.generate(true).unwrap()));
    g.finish();
}

fn knn(c: &mut Criterion) {
    let mut g = c.benchmark_group("knn_predict");
    let (m, q, d) = (10_000usize, 1_000usize, 128usize);
    let bank = moco::testing::normal(m * d, 1);
    let queries = moco::testing::normal(q * d, 2);
    let labels: Vec<u32> = (0..m as u32).map(|i| i % 10).collect();
    g.throughput(Throughput::Elements(q as u64));
    g.bench_function("bank10k_q1k_d128_k200", |b| {
        b.iter(|| moco::eval::knn_predict(&bank, &labels, &queries, d, 200, 0.1, 10).unwrap())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::configure(Criterion::default());
    targets = augment, loader, synthetic, knn
}
criterion_main!(benches);
