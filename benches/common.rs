//! Shared helpers for the criterion benches.
#![allow(dead_code)]
use std::time::{Duration, Instant};

/// The GPU when one is usable, else `None` after printing one line saying CUDA benches skip.
pub fn gpu_or_skip(bench: &str) -> Option<moco::cuda::Gpu> {
    match moco::cuda::Gpu::new(0) {
        Ok(g) => Some(g),
        Err(e) => {
            println!("{bench}: CUDA benches skipped ({e})");
            None
        }
    }
}

/// Times `iters` back-to-back launches of `f` on the GPU stream, synchronizing once before
/// starting and once before stopping the clock (launch overhead amortized as in a real step).
pub fn time_gpu(gpu: &moco::cuda::Gpu, iters: u64, mut f: impl FnMut()) -> Duration {
    gpu.synchronize().expect("sync");
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    gpu.synchronize().expect("sync");
    t.elapsed()
}

/// Quick mode (`MOCO_BENCH_QUICK=1`): short measurement for the GPU-check runner.
pub fn configure(c: criterion::Criterion) -> criterion::Criterion {
    if std::env::var("MOCO_BENCH_QUICK").is_ok_and(|v| v == "1") {
        c.warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .sample_size(10)
    } else {
        c
    }
}
