//! Bring your own GPU model: a linear encoder `f(x) = W x` written with plain cudarc
//! (cuBLAS GEMMs on the program's own stream and buffers), trained with moco's
//! [`MocoHead`] on the same stream: momentum update of the key encoder, InfoNCE forward and
//! backward against the queue, enqueue. Nothing goes through the host but the loss.
//!
//! ```sh
//! cargo run --release --example cudarc_encoder
//! ```
//! Without a GPU (or a build without kernels) it prints why and exits cleanly. It shows the
//! calls; it is not a tuned run (`examples/byo_encoder.rs` is its host-only twin).
use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use moco::backend::Cuda;
use moco::cuda::Gpu;
use moco::ops::MocoHead;

/// `y = x W^T` (x N x D, W C x D, y N x C, all row-major), one cuBLAS GEMM.
fn forward(
    blas: &CudaBlas,
    stream: &Arc<CudaStream>,
    w: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    (n, d, c): (usize, usize, usize),
) -> Result<CudaSlice<f32>, Box<dyn std::error::Error>> {
    let mut y = stream.alloc_zeros::<f32>(n * c)?;
    // Column-major: y^T (C x N) = W (C x D, stored as D x C: transposed) . x^T (D x N).
    let cfg = GemmConfig {
        transa: CUBLAS_OP_T,
        transb: CUBLAS_OP_N,
        m: c as i32,
        n: n as i32,
        k: d as i32,
        alpha: 1.0f32,
        lda: d as i32,
        ldb: d as i32,
        beta: 0.0f32,
        ldc: c as i32,
    };
    // SAFETY: the sizes above match the buffers: W holds C x D, x N x D, y N x C values.
    unsafe { blas.gemm(cfg, w, x, &mut y)? };
    Ok(y)
}

/// Backward and plain SGD in one GEMM: `W -= lr dy^T x` (dy N x C, x N x D).
fn backward_sgd(
    blas: &CudaBlas,
    w: &mut CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    (n, d, c): (usize, usize, usize),
    lr: f32,
) -> Result<(), Box<dyn std::error::Error>> {
    // Column-major: W^T (D x C) = 1 . W^T - lr . x^T (D x N) . dy (N x C, stored as C x N).
    let cfg = GemmConfig {
        transa: CUBLAS_OP_N,
        transb: CUBLAS_OP_T,
        m: d as i32,
        n: c as i32,
        k: n as i32,
        alpha: -lr,
        lda: d as i32,
        ldb: c as i32,
        beta: 1.0f32,
        ldc: d as i32,
    };
    // SAFETY: x holds N x D, dy N x C and W C x D values, as the sizes above say.
    unsafe { blas.gemm(cfg, x, dy, w)? };
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if !moco::device::cuda_driver_present() || moco::device::cuda_device_count() == 0 {
        println!("no CUDA GPU here; examples/byo_encoder.rs runs the same loop on the host");
        return Ok(());
    }
    if !moco::cuda::kernels_available() {
        println!("this build has no CUDA kernels (nvcc was not found at build time)");
        return Ok(());
    }
    // The program's own context, stream, cuBLAS handle and parameters.
    let ctx = CudaContext::new(0)?;
    let stream = ctx.new_stream()?;
    let blas = CudaBlas::new(stream.clone())?;
    let (n, d, c, k) = (64, 32, 16, 1024);
    let dims = (n, d, c);
    let mut w_q = stream.clone_htod(&moco::rng::normal(c * d, 7))?;
    let mut w_k = stream.clone_htod(&moco::rng::normal(c * d, 7))?;

    // moco's head on that same stream.
    let be = Cuda::new(Gpu::from_stream(stream.clone())?)?;
    let mut head = MocoHead::new(be, k, c, 0.2, 0)?;
    for step in 0..200u64 {
        // Two noisy views of the same random images (generated on the host for brevity).
        let images = moco::rng::normal(n * d, 500_000 + step);
        let view = |seed: u64| -> Vec<f32> {
            let noise = moco::rng::normal(n * d, seed);
            images
                .iter()
                .zip(&noise)
                .map(|(a, b)| a + 0.5 * b)
                .collect()
        };
        let x_q = stream.clone_htod(&view(1000 + 2 * step))?;
        let x_k = stream.clone_htod(&view(1001 + 2 * step))?;

        head.momentum_update(&mut [(&mut w_k, &w_q)], 0.99)?; // one launch
        let q = forward(&blas, &stream, &w_q, &x_q, dims)?;
        let kk = forward(&blas, &stream, &w_k, &x_k, dims)?;
        let out = head.forward_backward(&q, &kk, n)?; // loss, dL/dq, normalized keys
        backward_sgd(&blas, &mut w_q, &out.grad_q, &x_q, dims, 0.1)?;
        head.enqueue(&out.keys)?;
        if step % 50 == 0 || step == 199 {
            println!(
                "step {step:3}: loss {:.4}, top-1 {:.3}, queue ptr {}",
                out.stats.loss,
                out.stats.accuracy,
                head.queue().ptr()
            );
        }
    }
    Ok(())
}
