//! Forward + backward throughput (images/s) of whole encoders, CPU and CUDA.
//!
//! CPU: resnet8 and resnet20 at batch 256 on 28x28x1 and 32x32x3, resnet18-cifar at
//! batch 64 on 32x32x3. CUDA (when a GPU is present): the same, and resnet18-cifar at
//! batch 256 and 512. One step = forward in training mode (BatchNorm batch statistics),
//! backward with a random output gradient, gradients zeroed before each step.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moco::backend::{Backend, Cpu};
use moco::model::{Arch, Encoder, EncoderConfig, InputShape};

mod common;

/// (arch, batch, channels, size)
const CPU_CASES: &[(Arch, usize, usize, usize)] = &[
    (Arch::Resnet8, 256, 1, 28),
    (Arch::Resnet8, 256, 3, 32),
    (Arch::Resnet20, 256, 1, 28),
    (Arch::Resnet20, 256, 3, 32),
    (Arch::Resnet18Cifar, 64, 3, 32),
];

const GPU_CASES: &[(Arch, usize, usize, usize)] = &[
    (Arch::Resnet8, 256, 1, 28),
    (Arch::Resnet8, 256, 3, 32),
    (Arch::Resnet20, 256, 1, 28),
    (Arch::Resnet20, 256, 3, 32),
    (Arch::Resnet18Cifar, 64, 3, 32),
    (Arch::Resnet18Cifar, 256, 3, 32),
    (Arch::Resnet18Cifar, 512, 3, 32),
];

fn step<B: Backend>(enc: &mut Encoder<B>, x: &B::Buf, shape: InputShape, dy: &B::Buf) {
    enc.zero_grad().expect("zero_grad");
    enc.forward(x, shape, true, 1).expect("forward");
    enc.backward(dy).expect("backward");
}

fn case_name(arch: Arch, n: usize, c: usize, s: usize) -> String {
    format!("{arch}_b{n}_{s}x{s}x{c}")
}

fn bench(cr: &mut Criterion) {
    let mut g = cr.benchmark_group("resnet_fwd_bwd");
    g.sample_size(10);
    for &(arch, n, c, s) in CPU_CASES {
        let cfg = EncoderConfig {
            arch,
            in_channels: c,
            dim: 128,
            mlp: false,
        };
        let be = Cpu::<f32>::new();
        let mut enc = Encoder::new(be, cfg, 0).expect("encoder");
        let shape = InputShape::new(n, c, s, s);
        let x = moco::testing::normal(shape.len(), 1);
        let dy = moco::testing::normal(n * 128, 2);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(
            BenchmarkId::new("cpu", case_name(arch, n, c, s)),
            &n,
            |b, _| b.iter(|| step(&mut enc, &x, shape, &dy)),
        );
    }
    if let Some(gpu) = common::gpu_or_skip("resnet_fwd_bwd") {
        let be = match moco::backend::Cuda::new(gpu.clone()) {
            Ok(b) => b,
            Err(e) => {
                println!("resnet_fwd_bwd: CUDA benches skipped ({e})");
                g.finish();
                return;
            }
        };
        for &(arch, n, c, s) in GPU_CASES {
            let cfg = EncoderConfig {
                arch,
                in_channels: c,
                dim: 128,
                mlp: false,
            };
            let mut enc = Encoder::new(be.clone(), cfg, 0).expect("encoder");
            let shape = InputShape::new(n, c, s, s);
            let x = be
                .upload_f32(&moco::testing::normal(shape.len(), 1))
                .expect("upload");
            let dy = be
                .upload_f32(&moco::testing::normal(n * 128, 2))
                .expect("upload");
            g.throughput(Throughput::Elements(n as u64));
            g.bench_with_input(
                BenchmarkId::new("cuda", case_name(arch, n, c, s)),
                &n,
                |b, _| {
                    b.iter_custom(|iters| {
                        common::time_gpu(&gpu, iters, || step(&mut enc, &x, shape, &dy))
                    })
                },
            );
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
