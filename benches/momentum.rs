//! Momentum (EMA) update bandwidth: 12 bytes moved per f32 parameter.
//! Sizes: ResNet-18 (11.2M) and ResNet-50 (23.5M) parameter counts.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

mod common;

const SIZES: &[(&str, usize)] = &[
    ("resnet18_11.2M", 11_200_000),
    ("resnet50_23.5M", 23_500_000),
];

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("momentum_update");
    for &(name, n) in SIZES {
        g.throughput(Throughput::Bytes(12 * n as u64));
        let q = moco::testing::uniform(n, 1);
        let mut k = moco::testing::uniform(n, 2);
        g.bench_with_input(BenchmarkId::new("cpu", name), &n, |b, _| {
            b.iter(|| moco::ops::momentum_update_cpu(&mut k, &q, 0.999).unwrap())
        });
    }
    if let Some(gpu) = common::gpu_or_skip("momentum_update") {
        for &(name, n) in SIZES {
            // The card's copy bandwidth on the same buffers (read n + write n floats), the
            // ceiling the update is measured against.
            g.throughput(Throughput::Bytes(8 * n as u64));
            let src = gpu.upload(&moco::testing::uniform(n, 3)).unwrap();
            let mut dst = gpu.zeros::<f32>(n).unwrap();
            g.bench_with_input(BenchmarkId::new("cuda_copy_dtod", name), &n, |b, _| {
                b.iter_custom(|iters| {
                    common::time_gpu(&gpu, iters, || {
                        gpu.stream().memcpy_dtod(&src, &mut dst).unwrap()
                    })
                })
            });
            g.throughput(Throughput::Bytes(12 * n as u64));
            let q = gpu.upload(&moco::testing::uniform(n, 1)).unwrap();
            let mut k = gpu.upload(&moco::testing::uniform(n, 2)).unwrap();
            g.bench_with_input(BenchmarkId::new("cuda", name), &n, |b, _| {
                b.iter_custom(|iters| {
                    common::time_gpu(&gpu, iters, || {
                        moco::ops::momentum_update(&gpu, &mut k, &q, 0.999).unwrap()
                    })
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::configure(Criterion::default());
    targets = bench
}
criterion_main!(benches);
