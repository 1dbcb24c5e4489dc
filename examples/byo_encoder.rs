//! Bring your own encoder: a linear encoder `f(x) = W x` written by hand on host vectors,
//! stepped with moco's [`MocoHead`] (queue, temperature, InfoNCE forward and backward,
//! enqueue, momentum update). It shows the calls; it is not a tuned training run. The same
//! calls take `Cuda` buffers on the GPU.
//!
//! ```sh
//! cargo run --release --example byo_encoder
//! ```
use moco::backend::Cpu;
use moco::ops::MocoHead;

/// `y = x W^T`: x N x D, W C x D, y N x C.
fn forward(w: &[f32], x: &[f32], n: usize, d: usize, c: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; n * c];
    for i in 0..n {
        for j in 0..c {
            y[i * c + j] = (0..d).map(|t| x[i * d + t] * w[j * d + t]).sum();
        }
    }
    y
}

/// `dW = dy^T x`.
fn grad_w(dy: &[f32], x: &[f32], n: usize, d: usize, c: usize) -> Vec<f32> {
    let mut g = vec![0.0f32; c * d];
    for i in 0..n {
        for j in 0..c {
            for t in 0..d {
                g[j * d + t] += dy[i * c + j] * x[i * d + t];
            }
        }
    }
    g
}

fn main() -> moco::Result<()> {
    let (n, d, c, k) = (32, 24, 8, 256);
    let mut w_q = moco::rng::normal(c * d, 7);
    let mut w_k = w_q.clone();
    let mut head = MocoHead::new(Cpu::<f32>::new(), k, c, 0.2, 0)?;
    // Data: every image is a fresh random vector; its two views add independent noise.
    for step in 0..200u64 {
        let images = moco::rng::normal(n * d, 500_000 + step);
        let noise_q = moco::rng::normal(n * d, 1000 + 2 * step);
        let noise_k = moco::rng::normal(n * d, 1001 + 2 * step);
        let view = |noise: &[f32]| -> Vec<f32> {
            (0..n * d).map(|i| images[i] + 0.5 * noise[i]).collect()
        };
        let (x_q, x_k) = (view(&noise_q), view(&noise_k));
        head.momentum_update(&mut [(&mut w_k, &w_q)], 0.99)?;
        let q = forward(&w_q, &x_q, n, d, c);
        let kk = forward(&w_k, &x_k, n, d, c);
        let out = head.forward_backward(&q, &kk, n)?;
        let g = grad_w(&out.grad_q, &x_q, n, d, c);
        for (w, g) in w_q.iter_mut().zip(&g) {
            *w -= 0.1 * g;
        }
        head.enqueue(&out.keys)?;
        if step % 50 == 0 || step == 199 {
            println!(
                "step {step:3}: loss {:.4}, top-1 {:.3}",
                out.stats.loss, out.stats.accuracy
            );
        }
    }
    Ok(())
}
