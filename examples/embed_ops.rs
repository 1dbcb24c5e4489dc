//! Using moco's CUDA operations from a program that already owns a cudarc context, stream
//! and buffers (as candle or any cudarc user does).
//!
//! ```sh
//! cargo run --release --example embed_ops
//! ```
//! Without a GPU (or a build without kernels) it prints why and exits cleanly.
use std::sync::Arc;

use cudarc::driver::CudaContext;
use moco::cuda::Gpu;
use moco::ops::{Contrast, ContrastShape, InfoNceImpl, Queue};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if !moco::device::cuda_driver_present() || moco::device::cuda_device_count() == 0 {
        println!("no CUDA GPU here; the CPU reference (moco::ops::*_cpu) is what runs");
        return Ok(());
    }
    // The host program's own context, stream and buffers.
    let ctx: Arc<CudaContext> = CudaContext::new(0)?;
    let stream = ctx.new_stream()?;
    let (n, c, k) = (256, 128, 4096);
    let q_feat = stream.clone_htod(&moco::testing::normal(n * c, 1))?;
    let k_feat = stream.clone_htod(&moco::testing::normal(n * c, 2))?;
    let mut key_params = stream.clone_htod(&vec![0.0f32; 1_000_000])?;
    let query_params = stream.clone_htod(&vec![1.0f32; 1_000_000])?;

    // moco on that stream: the kernels are loaded into the stream's context once.
    let gpu = Gpu::from_stream(stream.clone())?;
    moco::ops::momentum_update(&gpu, &mut key_params, &query_params, 0.999)?;

    // Views into a larger buffer work too.
    let mut view = key_params.slice_mut(10..1000);
    moco::ops::momentum_update(&gpu, &mut view, &query_params.slice(10..1000), 0.5)?;

    let shape = ContrastShape::new(n, c, k, 0.2)?;
    let mut queue = Queue::new(&moco::backend::Cuda::new(gpu.clone())?, k, c, 0)?;
    let mut grad_q = stream.alloc_zeros::<f32>(n * c)?;
    let mut contrast = Contrast::new(&gpu);
    let stats = contrast.infonce(
        &q_feat,
        &k_feat,
        queue.keys(),
        shape,
        &mut grad_q,
        InfoNceImpl::Fused,
    )?;
    let mut k_norm = stream.alloc_zeros::<f32>(n * c)?;
    contrast.normalize(&k_feat, &mut k_norm, n, c)?;
    queue.enqueue(&k_norm)?;

    let kp = stream.clone_dtoh(&key_params.slice(0..2))?;
    println!(
        "loss {:.4}, top-1 {:.3}, queue ptr {}, key params now {:?}",
        stats.loss,
        stats.accuracy,
        queue.ptr(),
        kp
    );
    Ok(())
}
