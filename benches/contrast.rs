//! Logits and InfoNCE forward+backward, fused vs unfused, and the enqueue.
//!
//! Throughput is reported as criterion "elements" = floating-point operations, so
//! `Melem/s` reads as MFLOP/s. FLOPs counted: logits 2 N K C; InfoNCE fwd+bwd 4 N K C (the
//! logits GEMM and the gradient GEMM; the fused kernel does exactly these two products).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moco::ops::{Contrast, ContrastShape, InfoNceImpl};

mod common;

const SHAPES: &[(usize, usize, usize, f32)] = &[(256, 128, 65536, 0.07), (512, 128, 4096, 0.2)];

fn unit_rows(rows: usize, c: usize, seed: u64) -> Vec<f32> {
    moco::ops::l2_normalize_cpu(&moco::testing::normal(rows * c, seed), rows, c)
        .unwrap()
        .0
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("infonce_fwd_bwd");
    g.sample_size(10);
    // CPU reference (f64 accumulation) at the small shape only: the big one takes seconds.
    {
        let (n, ch, k, t) = SHAPES[1];
        let s = ContrastShape::new(n, ch, k, t as f64).unwrap();
        let q = moco::testing::normal(n * ch, 1);
        let kk = unit_rows(n, ch, 2);
        let queue = unit_rows(k, ch, 3);
        g.throughput(Throughput::Elements((4 * n * k * ch) as u64));
        g.bench_function(BenchmarkId::new("cpu", format!("{n}x{ch}x{k}")), |b| {
            b.iter(|| moco::ops::infonce_cpu(&q, &kk, &queue, s).unwrap())
        });
    }
    let Some(gpu) = common::gpu_or_skip("infonce_fwd_bwd") else {
        g.finish();
        return;
    };
    let mut contrast = Contrast::new(&gpu);
    for &(n, ch, k, t) in SHAPES {
        let s = ContrastShape::new(n, ch, k, t as f64).unwrap();
        let q = gpu.upload(&moco::testing::normal(n * ch, 1)).unwrap();
        let kk = gpu.upload(&unit_rows(n, ch, 2)).unwrap();
        let queue = gpu.upload(&unit_rows(k, ch, 3)).unwrap();
        let mut grad = gpu.zeros::<f32>(n * ch).unwrap();
        for (name, imp) in [
            ("cuda_fused", InfoNceImpl::Fused),
            ("cuda_unfused", InfoNceImpl::Unfused),
        ] {
            g.throughput(Throughput::Elements((4 * n * k * ch) as u64));
            g.bench_function(BenchmarkId::new(name, format!("{n}x{ch}x{k}")), |b| {
                b.iter_custom(|iters| {
                    common::time_gpu(&gpu, iters, || {
                        contrast
                            .infonce_async(&q, &kk, &queue, s, &mut grad, imp)
                            .unwrap()
                    })
                })
            });
        }
        let mut logits = gpu.zeros::<f32>(n * (1 + k)).unwrap();
        g.throughput(Throughput::Elements((2 * n * k * ch) as u64));
        g.bench_function(
            BenchmarkId::new("cuda_logits", format!("{n}x{ch}x{k}")),
            |b| {
                b.iter_custom(|iters| {
                    common::time_gpu(&gpu, iters, || {
                        contrast.logits(&q, &kk, &queue, s, &mut logits).unwrap()
                    })
                })
            },
        );
    }
    g.finish();

    let mut g = c.benchmark_group("enqueue");
    for &(n, ch, k) in &[(256usize, 128usize, 65536usize), (512, 128, 4096)] {
        g.throughput(Throughput::Bytes((8 * n * ch) as u64));
        let keys = gpu.upload(&unit_rows(n, ch, 5)).unwrap();
        let be = moco::backend::Cuda::new(gpu.clone()).unwrap();
        let mut queue = moco::ops::Queue::new(&be, k, ch, 0).unwrap();
        g.bench_function(BenchmarkId::new("cuda", format!("{n}x{ch}->{k}")), |b| {
            b.iter_custom(|iters| common::time_gpu(&gpu, iters, || queue.enqueue(&keys).unwrap()))
        });
    }
    g.finish();
}

fn bench_cpu_enqueue(c: &mut Criterion) {
    let mut g = c.benchmark_group("enqueue");
    let (n, ch, k) = (256usize, 128usize, 65536usize);
    g.throughput(Throughput::Bytes((8 * n * ch) as u64));
    let keys = unit_rows(n, ch, 5);
    let mut queue = moco::ops::Queue::new(&moco::backend::Cpu::<f32>::new(), k, ch, 0).unwrap();
    g.bench_function(BenchmarkId::new("cpu", format!("{n}x{ch}->{k}")), |b| {
        b.iter(|| queue.enqueue(&keys).unwrap())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::configure(Criterion::default());
    targets = bench_cpu_enqueue, bench
}
criterion_main!(benches);
