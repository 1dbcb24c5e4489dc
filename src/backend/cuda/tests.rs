//! Host transliterations of the CUDA backend's algorithms (the kernels' index arithmetic,
//! the row-major to column-major GEMM mapping), checked against the f64 reference without a
//! GPU.
// The transliterations keep the kernels' index loops as written.
#![allow(clippy::needless_range_loop)]
use super::gemm::row_major_as_col_major;
use crate::backend::ConvShape;

/// cuBLAS semantics on the host: column-major, `C = op(A) op(B)`.
#[allow(clippy::too_many_arguments)]
fn col_major_gemm(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    a: &[f64],
    lda: usize,
    b: &[f64],
    ldb: usize,
    c: &mut [f64],
    ldc: usize,
) {
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0;
            for l in 0..k {
                let av = if ta { a[l + i * lda] } else { a[i + l * lda] };
                let bv = if tb { b[j + l * ldb] } else { b[l + j * ldb] };
                acc += av * bv;
            }
            c[i + j * ldc] = acc;
        }
    }
}

#[test]
fn row_major_mapping_matches_a_plain_product() {
    let (m, n, k) = (3usize, 5usize, 4usize);
    for ta in [false, true] {
        for tb in [false, true] {
            // Row-major operands as stored.
            let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
            let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.91).cos()).collect();
            let aat = |i: usize, l: usize| if ta { a[l * m + i] } else { a[i * k + l] };
            let bat = |l: usize, j: usize| if tb { b[j * k + l] } else { b[l * n + j] };
            let mut want = vec![0.0; m * n];
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] = (0..k).map(|l| aat(i, l) * bat(l, j)).sum();
                }
            }
            let c = row_major_as_col_major(ta, tb, m, n, k);
            let mut got = vec![0.0; m * n];
            col_major_gemm(
                c.transa, c.transb, c.m, c.n, c.k, &b, c.lda, &a, c.ldb, &mut got, c.ldc,
            );
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() < 1e-12,
                    "ta={ta} tb={tb}: {got:?} vs {want:?}"
                );
            }
        }
    }
}

// Host transliterations of kernels/conv.cu (same index arithmetic), to check the GPU
// convolution algorithm (layouts, permutes, GEMM shapes) against the reference.
fn im2col_k(s: &ConvShape, x: &[f64], col: &mut [f64], nb: usize, n0: usize) {
    let xs = s.cin * s.h * s.w;
    let hwo = s.ho * s.wo;
    let total = s.cin * s.k * s.k * nb * hwo;
    for i in 0..total {
        let p = i % hwo;
        let t = i / hwo;
        let n = t % nb;
        let r = t / nb;
        let kx = r % s.k;
        let ky = (r / s.k) % s.k;
        let ci = r / (s.k * s.k);
        let (oy, ox) = ((p / s.wo) as i64, (p % s.wo) as i64);
        let iy = oy * s.stride as i64 - s.pad as i64 + ky as i64;
        let ix = ox * s.stride as i64 - s.pad as i64 + kx as i64;
        col[i] = if iy >= 0 && ix >= 0 && iy < s.h as i64 && ix < s.w as i64 {
            x[n0 * xs + ((n * s.cin + ci) * s.h + iy as usize) * s.w + ix as usize]
        } else {
            0.0
        };
    }
}

fn col2im_k(s: &ConvShape, dcol: &[f64], dx: &mut [f64], nb: usize, n0: usize) {
    let xs = s.cin * s.h * s.w;
    let hwo = s.ho * s.wo;
    for i in 0..nb * xs {
        let ix = (i % s.w) as i64;
        let iy = ((i / s.w) % s.h) as i64;
        let ci = (i / (s.h * s.w)) % s.cin;
        let n = i / xs;
        let mut acc = 0.0;
        for ky in 0..s.k {
            let ty = iy + s.pad as i64 - ky as i64;
            if ty < 0 || ty % s.stride as i64 != 0 {
                continue;
            }
            let oy = ty / s.stride as i64;
            if oy >= s.ho as i64 {
                continue;
            }
            for kx in 0..s.k {
                let tx = ix + s.pad as i64 - kx as i64;
                if tx < 0 || tx % s.stride as i64 != 0 {
                    continue;
                }
                let ox = tx / s.stride as i64;
                if ox >= s.wo as i64 {
                    continue;
                }
                let r = (ci * s.k + ky) * s.k + kx;
                acc += dcol[(r * nb + n) * hwo + oy as usize * s.wo + ox as usize];
            }
        }
        dx[n0 * xs + i] = acc;
    }
}

fn permute01_k(src: &[f64], dst: &mut [f64], a: usize, b: usize, p: usize) {
    for i in 0..a * b * p {
        let pp = i % p;
        let t = i / p;
        let ai = t % a;
        let bi = t / a;
        dst[i] = src[(ai * b + bi) * p + pp];
    }
}

/// `Cuda::gemm_rm` on the host (beta 0 or 1).
#[allow(clippy::too_many_arguments)]
fn gemm_rm_h(
    ta: bool,
    tb: bool,
    (m, n, k): (usize, usize, usize),
    a: &[f64],
    b: &[f64],
    beta: f64,
    c: &mut [f64],
) {
    let g = row_major_as_col_major(ta, tb, m, n, k);
    let mut t = vec![0.0; m * n];
    col_major_gemm(
        g.transa, g.transb, g.m, g.n, g.k, b, g.lda, a, g.ldb, &mut t, g.ldc,
    );
    for (c, t) in c[..m * n].iter_mut().zip(t) {
        *c = beta * *c + t;
    }
}

#[test]
fn gpu_convolution_algorithm_matches_reference_on_the_host() {
    use crate::model::reference;
    for &(n, cin, hw, cout, k, st, p, nb) in &[
        (
            3usize,
            2usize,
            (5usize, 6usize),
            4usize,
            3usize,
            1usize,
            1usize,
            2usize,
        ),
        (5, 3, (9, 7), 2, 3, 2, 1, 2),
        (4, 2, (6, 6), 3, 1, 2, 0, 3),
        (2, 2, (11, 11), 3, 7, 2, 3, 1),
    ] {
        let s = ConvShape::new(n, cin, hw, cout, k, st, p).unwrap();
        let x: Vec<f64> = (0..s.x_len()).map(|i| (i as f64 * 0.71).sin()).collect();
        let w: Vec<f64> = (0..s.w_len()).map(|i| (i as f64 * 0.53).cos()).collect();
        let dy: Vec<f64> = (0..s.y_len()).map(|i| (i as f64 * 0.29).sin()).collect();
        let (hwo, ckk, ys) = (s.ho * s.wo, s.cin * s.k * s.k, s.cout * s.ho * s.wo);
        let mut y = vec![f64::NAN; s.y_len()];
        let mut dx = vec![f64::NAN; s.x_len()];
        let mut dw = vec![0.0; s.w_len()];
        for n0 in (0..n).step_by(nb) {
            let m = nb.min(n - n0);
            let mut col = vec![0.0; ckk * m * hwo];
            let mut yt = vec![0.0; cout * m * hwo];
            im2col_k(&s, &x, &mut col, m, n0);
            gemm_rm_h(false, false, (cout, m * hwo, ckk), &w, &col, 0.0, &mut yt);
            permute01_k(&yt, &mut y[n0 * ys..], cout, m, hwo);
            let mut dyt = vec![0.0; cout * m * hwo];
            permute01_k(&dy[n0 * ys..], &mut dyt, m, cout, hwo);
            gemm_rm_h(false, true, (cout, ckk, m * hwo), &dyt, &col, 1.0, &mut dw);
            gemm_rm_h(true, false, (ckk, m * hwo, cout), &w, &dyt, 0.0, &mut col);
            col2im_k(&s, &col, &mut dx, m, n0);
        }
        let yr = reference::conv2d(&s, &x, &w);
        let (dxr, dwr) = reference::conv2d_backward(&s, &x, &w, &dy);
        for (what, got, want) in [("y", &y, &yr), ("dx", &dx, &dxr), ("dw", &dw, &dwr)] {
            for (g, w) in got.iter().zip(want.iter()) {
                assert!((g - w).abs() < 1e-9, "{what} {s:?}: {g} vs {w}");
            }
        }
    }
}

/// kernels/layers.cu's max-pool backward window arithmetic (C integer division truncates
/// toward zero, as Rust's does) against the CPU backend's scatter.
#[test]
fn gpu_maxpool_backward_windows_match_cpu_on_the_host() {
    use crate::backend::{Backend, Cpu, PoolShape};
    for &(planes, h, w, k, st, pad) in &[
        (2usize, 7usize, 6usize, 3usize, 2usize, 1usize),
        (1, 8, 8, 3, 2, 1),
        (2, 5, 5, 2, 2, 0),
        (1, 9, 4, 3, 1, 1),
        (1, 1, 1, 3, 2, 1),
    ] {
        let s = PoolShape::new(planes, (h, w), k, st, pad).unwrap();
        let x: Vec<f64> = (0..planes * h * w)
            .map(|i| (i as f64 * 1.37).sin())
            .collect();
        let no = planes * s.ho * s.wo;
        let (mut y, mut idx) = (vec![0.0; no], vec![0u32; no]);
        let cpu = Cpu::<f64>::new();
        cpu.maxpool_forward(&s, &x, &mut y, &mut idx).unwrap();
        let dy: Vec<f64> = (0..no).map(|i| 1.0 + i as f64).collect();
        let mut want = vec![0.0; x.len()];
        cpu.maxpool_backward(&s, &dy, &idx, &mut want).unwrap();
        let (k, st, pad) = (k as i64, st as i64, pad as i64);
        let (ho, wo) = (s.ho as i64, s.wo as i64);
        for i in 0..planes * h * w {
            let ix = (i % w) as i64;
            let iy = ((i / w) % h) as i64;
            let p = i / (h * w);
            let j = (iy * w as i64 + ix) as u32;
            let oy0 = 0.max((iy + pad - k + st) / st);
            let oy1 = (ho - 1).min((iy + pad) / st);
            let ox0 = 0.max((ix + pad - k + st) / st);
            let ox1 = (wo - 1).min((ix + pad) / st);
            let mut acc = 0.0;
            for oy in oy0..=oy1 {
                for ox in ox0..=ox1 {
                    let o = (p as i64 * ho + oy) * wo + ox;
                    if idx[o as usize] == j {
                        acc += dy[o as usize];
                    }
                }
            }
            assert_eq!(acc, want[i], "{s:?} element {i}");
        }
    }
}
