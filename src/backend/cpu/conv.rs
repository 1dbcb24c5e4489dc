//! Convolutions: the direct f32 kernels of [`super::direct`] where the CPU has AVX2 or
//! AVX-512, else (and for f64) im2col + GEMM per group of samples, col2im for the input
//! gradient.

use rayon::prelude::*;

use super::{
    direct, gemm, Cpu, Scalar, CONV_MAX_PARTIALS, CONV_MIN_CHUNK, CONV_MIN_ITEMS, CONV_TARGET_COLS,
    ELEM_CHUNK,
};
use crate::backend::ConvShape;
use crate::error::Result;

/// Output columns `lo..hi` whose input column `ox * stride + kx - pad` is inside the image.
fn valid_cols(s: &ConvShape, kx: usize) -> (usize, usize) {
    let lo = if s.pad > kx {
        (s.pad - kx).div_ceil(s.stride).min(s.wo)
    } else {
        0
    };
    let hi = if s.w + s.pad > kx {
        (s.w + s.pad - kx).div_ceil(s.stride).min(s.wo)
    } else {
        0
    };
    (lo, hi.max(lo))
}

/// Unfolds one sample: `x` Cin x H x W -> columns `c0..c0 + Ho Wo` of `col`, a
/// (Cin K K) x `ld` matrix (several samples side by side share one GEMM).
pub(crate) fn im2col<T: Scalar>(s: &ConvShape, x: &[T], col: &mut [T], ld: usize, c0: usize) {
    if s.stride == 1 && s.ho == s.h && s.wo == s.w {
        return im2col_same(s, x, col, ld, c0);
    }
    let (k, hwo) = (s.k, s.ho * s.wo);
    for ci in 0..s.cin {
        let xp = &x[ci * s.h * s.w..(ci + 1) * s.h * s.w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut col[((ci * k + ky) * k + kx) * ld + c0..][..hwo];
                let (lo, hi) = valid_cols(s, kx);
                for oy in 0..s.ho {
                    let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                    let out = &mut row[oy * s.wo..(oy + 1) * s.wo];
                    if iy < 0 || iy >= s.h as isize || lo == hi {
                        out.fill(T::ZERO);
                        continue;
                    }
                    let xr = &xp[iy as usize * s.w..(iy as usize + 1) * s.w];
                    out[..lo].fill(T::ZERO);
                    out[hi..].fill(T::ZERO);
                    let base = lo * s.stride + kx - s.pad;
                    if s.stride == 1 {
                        out[lo..hi].copy_from_slice(&xr[base..base + hi - lo]);
                    } else {
                        for (j, o) in out[lo..hi].iter_mut().enumerate() {
                            *o = xr[base + j * s.stride];
                        }
                    }
                }
            }
        }
    }
}

/// [`im2col`] of a stride-1 "same" convolution (`Ho = H`, `Wo = W`): each row of `col` is
/// the input plane shifted by `(ky - pad) W + (kx - pad)`, so it is one contiguous copy,
/// then the rows and columns that fall outside the image are zeroed (the copy wraps the
/// neighbouring rows' values into them).
fn im2col_same<T: Scalar>(s: &ConvShape, x: &[T], col: &mut [T], ld: usize, c0: usize) {
    let (k, h, w) = (s.k, s.h, s.w);
    let hw = h * w;
    for ci in 0..s.cin {
        let xp = &x[ci * hw..(ci + 1) * hw];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut col[((ci * k + ky) * k + kx) * ld + c0..][..hw];
                let dy = ky as isize - s.pad as isize;
                let dx = kx as isize - s.pad as isize;
                // Output rows whose input row oy + dy is inside the image.
                let oy_lo = (-dy).clamp(0, h as isize) as usize;
                let oy_hi = (h as isize - dy).clamp(oy_lo as isize, h as isize) as usize;
                row[..oy_lo * w].fill(T::ZERO);
                row[oy_hi * w..].fill(T::ZERO);
                // Output p reads input p + shift; keep p + shift inside the plane.
                let shift = dy * w as isize + dx;
                let (r_lo, r_hi) = ((oy_lo * w) as isize, (oy_hi * w) as isize);
                let p_lo = r_lo.max(-shift).min(r_hi) as usize;
                let p_hi = r_hi.min(hw as isize - shift).max(p_lo as isize) as usize;
                row[oy_lo * w..p_lo].fill(T::ZERO);
                row[p_hi..oy_hi * w].fill(T::ZERO);
                if p_hi > p_lo {
                    let src = (p_lo as isize + shift) as usize;
                    row[p_lo..p_hi].copy_from_slice(&xp[src..src + (p_hi - p_lo)]);
                }
                // Columns whose input column ox + dx is outside the image.
                if dx != 0 {
                    let (c_lo, c_hi) = if dx < 0 {
                        (0, (-dx) as usize)
                    } else {
                        (w.saturating_sub(dx as usize), w)
                    };
                    for oy in oy_lo..oy_hi {
                        row[oy * w + c_lo.min(w)..oy * w + c_hi.min(w)].fill(T::ZERO);
                    }
                }
            }
        }
    }
}

/// Folds one sample back: `dx += col2im(dcol)`, the adjoint of [`im2col`] (same `ld`, `c0`).
pub(crate) fn col2im<T: Scalar>(s: &ConvShape, dcol: &[T], ld: usize, c0: usize, dx: &mut [T]) {
    let (k, hwo) = (s.k, s.ho * s.wo);
    for ci in 0..s.cin {
        let xp = &mut dx[ci * s.h * s.w..(ci + 1) * s.h * s.w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &dcol[((ci * k + ky) * k + kx) * ld + c0..][..hwo];
                let (lo, hi) = valid_cols(s, kx);
                if lo == hi {
                    continue;
                }
                for oy in 0..s.ho {
                    let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                    if iy < 0 || iy >= s.h as isize {
                        continue;
                    }
                    let xr = &mut xp[iy as usize * s.w..(iy as usize + 1) * s.w];
                    let src = &row[oy * s.wo + lo..oy * s.wo + hi];
                    let base = lo * s.stride + kx - s.pad;
                    if s.stride == 1 {
                        for (d, &v) in xr[base..base + hi - lo].iter_mut().zip(src) {
                            *d += v;
                        }
                    } else {
                        for (j, &v) in src.iter().enumerate() {
                            xr[base + j * s.stride] += v;
                        }
                    }
                }
            }
        }
    }
}

/// Samples per convolution work item: enough that one GEMM has about
/// [`CONV_TARGET_COLS`] columns (so the weight is packed once for several samples), but at
/// least [`CONV_MIN_ITEMS`] items when the batch allows. Depends on the shape only.
fn conv_group(s: &ConvShape) -> usize {
    let hwo = (s.ho * s.wo).max(1);
    CONV_TARGET_COLS
        .div_ceil(hwo)
        .min((s.n / CONV_MIN_ITEMS).max(1))
        .max(1)
}

/// Samples per weight-gradient partial: depends on the batch size only.
pub(super) fn conv_chunk(n: usize) -> usize {
    n.div_ceil(CONV_MAX_PARTIALS).max(CONV_MIN_CHUNK)
}

/// Runs `work(ci, partial, dx_chunk)` for the `nchunks` sample chunks of a backward pass in
/// parallel (`dx_chunk` the chunk's `chunk_len` elements of `dx`, when given) and returns
/// the chunks' weight-gradient partials in chunk order.
pub(super) fn per_chunk<T: Send + Sync + Clone>(
    nchunks: usize,
    dx: Option<&mut [T]>,
    chunk_len: usize,
    work: impl Fn(usize, &mut Vec<T>, Option<&mut [T]>) + Sync,
) -> Vec<Vec<T>> {
    let mut partials: Vec<Vec<T>> = vec![Vec::new(); nchunks];
    match dx {
        Some(dx) => partials
            .par_iter_mut()
            .zip(dx.par_chunks_mut(chunk_len))
            .enumerate()
            .for_each(|(ci, (p, dxc))| work(ci, p, Some(dxc))),
        None => partials
            .par_iter_mut()
            .enumerate()
            .for_each(|(ci, p)| work(ci, p, None)),
    }
    partials
}
impl<T: Scalar> Cpu<T> {
    // x: N x Cin x H x W, w: Cout x (Cin K K), y: N x Cout x (Ho Wo).
    // Per group of m samples: col = im2col (CinKK x m HoWo), Yt = w col (Cout x m HoWo),
    // then Yt is scattered to NCHW.
    pub(super) fn conv2d_forward_impl(
        &self,
        s: &ConvShape,
        x: &[T],
        w: &[T],
        w_off: usize,
        y: &mut [T],
    ) -> Result<()> {
        s.check_forward(x.len(), (w.len(), w_off), y.len())?;
        let wm = &w[w_off..w_off + s.w_len()];
        let isa = direct::isa().filter(|_| direct::pays(s, false));
        if let (Some(isa), Some(x), Some(wm)) = (isa, T::as_f32(x), T::as_f32(wm)) {
            if let Some(y) = T::as_f32_mut(y) {
                direct::forward(isa, s, x, wm, y);
                return Ok(());
            }
        }
        self.forward_im2col(s, x, wm, y);
        Ok(())
    }

    /// The im2col + GEMM forward pass (`wm`: the layer's weight; shapes checked).
    pub(super) fn forward_im2col(&self, s: &ConvShape, x: &[T], wm: &[T], y: &mut [T]) {
        let (xs, ys, hwo, ckk) = (
            s.cin * s.h * s.w,
            s.cout * s.ho * s.wo,
            s.ho * s.wo,
            s.cin * s.k * s.k,
        );
        let nb = conv_group(s);
        let pointwise = s.k == 1 && s.stride == 1 && s.pad == 0;
        y[..s.y_len()]
            .par_chunks_mut(nb * ys)
            .zip(x[..s.x_len()].par_chunks(nb * xs))
            .for_each(|(yc, xc)| {
                let m = xc.len() / xs;
                let cols = m * hwo;
                let mut col = Vec::new();
                let b: &[T] = if m == 1 && pointwise {
                    xc
                } else {
                    col.resize(ckk * cols, T::ZERO);
                    for i in 0..m {
                        im2col(s, &xc[i * xs..(i + 1) * xs], &mut col, cols, i * hwo);
                    }
                    &col
                };
                if m == 1 {
                    gemm(
                        s.cout,
                        ckk,
                        cols,
                        T::from_f64(1.0),
                        wm,
                        (ckk, 1),
                        b,
                        (cols, 1),
                        T::ZERO,
                        yc,
                        (cols, 1),
                    );
                    return;
                }
                let mut yt = vec![T::ZERO; s.cout * cols];
                gemm(
                    s.cout,
                    ckk,
                    cols,
                    T::from_f64(1.0),
                    wm,
                    (ckk, 1),
                    b,
                    (cols, 1),
                    T::ZERO,
                    &mut yt,
                    (cols, 1),
                );
                for i in 0..m {
                    for co in 0..s.cout {
                        yc[(i * s.cout + co) * hwo..][..hwo]
                            .copy_from_slice(&yt[co * cols + i * hwo..][..hwo]);
                    }
                }
            });
    }

    // Fixed chunks of samples (by batch size) each own a dW partial; inside a chunk, per
    // group of m samples: dYt = dy gathered to Cout x m HoWo, partial += dYt col^T
    // (Cout x CinKK), dcol = w^T dYt, dx = col2im(dcol). Partials are summed in order.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv2d_backward_impl(
        &self,
        s: &ConvShape,
        x: &[T],
        w: &[T],
        w_off: usize,
        dy: &[T],
        dx: Option<&mut [T]>,
        dw: &mut [T],
        dw_off: usize,
    ) -> Result<()> {
        s.check_backward(
            x.len(),
            (w.len(), w_off),
            dy.len(),
            dx.as_ref().map(|d| d.len()),
            (dw.len(), dw_off),
        )?;
        let wm = &w[w_off..w_off + s.w_len()];
        let dwm = &mut dw[dw_off..dw_off + s.w_len()];
        if let (Some(isa), Some(x32), Some(w32), Some(dy32)) = (
            direct::isa().filter(|_| direct::pays(s, true)),
            T::as_f32(x),
            T::as_f32(wm),
            T::as_f32(dy),
        ) {
            let dx32 = dx.map(|d| T::as_f32_mut(d).expect("T is f32"));
            let dw32 = T::as_f32_mut(dwm).expect("T is f32");
            direct::backward(isa, s, x32, w32, dy32, dx32, dw32);
            return Ok(());
        }
        self.backward_im2col(s, x, wm, dy, dx, dwm);
        Ok(())
    }

    /// The im2col + GEMM backward pass (`wm`, `dwm`: the layer's weight and gradient).
    pub(super) fn backward_im2col(
        &self,
        s: &ConvShape,
        x: &[T],
        wm: &[T],
        dy: &[T],
        dx: Option<&mut [T]>,
        dwm: &mut [T],
    ) {
        let (xs, ys, hwo, ckk) = (
            s.cin * s.h * s.w,
            s.cout * s.ho * s.wo,
            s.ho * s.wo,
            s.cin * s.k * s.k,
        );
        let chunk = conv_chunk(s.n);
        let nchunks = s.n.div_ceil(chunk);
        let nb = conv_group(s).min(chunk);
        let one = T::from_f64(1.0);
        // One partial per chunk of samples; inside a chunk, GEMMs over groups of nb samples
        // accumulate into it in order.
        let work = |ci: usize, part: &mut Vec<T>, mut dxc: Option<&mut [T]>| {
            *part = vec![T::ZERO; s.w_len()];
            let c0 = ci * chunk;
            let c1 = (c0 + chunk).min(s.n);
            let mut col = Vec::new();
            let mut dyt_buf = Vec::new();
            for n0 in (c0..c1).step_by(nb) {
                let m = nb.min(c1 - n0);
                let cols = m * hwo;
                col.resize(ckk * cols, T::ZERO);
                for i in 0..m {
                    let xn = &x[(n0 + i) * xs..(n0 + i + 1) * xs];
                    im2col(s, xn, &mut col, cols, i * hwo);
                }
                let dyc = &dy[n0 * ys..(n0 + m) * ys];
                let dyt: &[T] = if m == 1 {
                    dyc
                } else {
                    dyt_buf.resize(s.cout * cols, T::ZERO);
                    for i in 0..m {
                        for co in 0..s.cout {
                            dyt_buf[co * cols + i * hwo..][..hwo]
                                .copy_from_slice(&dyc[(i * s.cout + co) * hwo..][..hwo]);
                        }
                    }
                    &dyt_buf
                };
                // part (Cout x CinKK) += dYt (Cout x cols) . col^T (cols x CinKK)
                gemm(
                    s.cout,
                    cols,
                    ckk,
                    one,
                    dyt,
                    (cols, 1),
                    &col,
                    (1, cols),
                    one,
                    part,
                    (ckk, 1),
                );
                if let Some(dxc) = dxc.as_deref_mut() {
                    // dcol (CinKK x cols) = w^T (CinKK x Cout) . dYt (Cout x cols), into col.
                    gemm(
                        ckk,
                        s.cout,
                        cols,
                        one,
                        wm,
                        (1, ckk),
                        dyt,
                        (cols, 1),
                        T::ZERO,
                        &mut col,
                        (cols, 1),
                    );
                    for i in 0..m {
                        let off = (n0 - c0 + i) * xs;
                        let dxn = &mut dxc[off..off + xs];
                        dxn.fill(T::ZERO);
                        col2im(s, &col, cols, i * hwo, dxn);
                    }
                }
            }
        };
        let partials = per_chunk(nchunks, dx.map(|d| &mut d[..s.x_len()]), chunk * xs, work);
        dwm.par_chunks_mut(ELEM_CHUNK)
            .enumerate()
            .for_each(|(c, d)| {
                let base = c * ELEM_CHUNK;
                for (i, d) in d.iter_mut().enumerate() {
                    let mut acc = *d;
                    for p in &partials {
                        acc += p[base + i];
                    }
                    *d = acc;
                }
            });
    }
}
