//! CPU convolutions layer by layer (FLOP/s as criterion's elements/s): the resnet8 layers
//! of `moco bench --device cpu --arch resnet8 --image-size 28` at batch 256, forward and
//! backward (input and weight gradients), f32, on rayon's default pool (set
//! `RAYON_NUM_THREADS` to compare with a thread count).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moco::backend::{Backend, ConvShape, Cpu};

mod common;

/// (input channels, input side, output channels, kernel, stride): every distinct
/// convolution of resnet8 on 28x28x3 inputs.
const LAYERS: &[(usize, usize, usize, usize, usize)] = &[
    (3, 28, 16, 3, 1),
    (16, 28, 16, 3, 1),
    (16, 28, 32, 3, 2),
    (16, 28, 32, 1, 2),
    (32, 14, 32, 3, 1),
    (32, 14, 64, 3, 2),
    (32, 14, 64, 1, 2),
    (64, 7, 64, 3, 1),
];

fn bench(cr: &mut Criterion) {
    let be = Cpu::<f32>::new();
    let mut g = cr.benchmark_group("cpu_conv");
    g.sample_size(10);
    for &(cin, hw, cout, k, stride) in LAYERS {
        let s = ConvShape::new(256, cin, (hw, hw), cout, k, stride, k / 2).expect("shape");
        let x = moco::testing::normal(s.x_len(), 1);
        let w = moco::testing::normal(s.w_len(), 2);
        let dy = moco::testing::normal(s.y_len(), 3);
        let mut y = vec![0.0f32; s.y_len()];
        let mut dx = vec![0.0f32; s.x_len()];
        let mut dw = vec![0.0f32; s.w_len()];
        let flops = 2 * (s.n * s.ho * s.wo * cout * cin * k * k) as u64;
        let name = format!("{cin}to{cout}_{hw}x{hw}_k{k}s{stride}");
        g.throughput(Throughput::Elements(flops));
        g.bench_function(BenchmarkId::new("forward", &name), |b| {
            b.iter(|| be.conv2d_forward(&s, &x, &w, 0, &mut y).expect("forward"))
        });
        g.throughput(Throughput::Elements(2 * flops));
        g.bench_function(BenchmarkId::new("backward", &name), |b| {
            b.iter(|| {
                be.conv2d_backward(&s, &x, &w, 0, &dy, Some(&mut dx), &mut dw, 0)
                    .expect("backward")
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::configure(Criterion::default());
    targets = bench
}
criterion_main!(benches);
