//! The CPU backend: im2col + a tuned GEMM (`matrixmultiply`) for convolutions and linear
//! layers, rayon over independent outputs, f64 accumulation for statistics.
//!
//! Generic over the scalar ([`Scalar`]: f32 for training, f64 for finite-difference
//! gradient checks). Deterministic whatever the thread count: work is split into chunks
//! whose boundaries depend only on the shapes, every reduction runs over those chunks in a
//! fixed order, and each GEMM call is single-threaded.
use std::marker::PhantomData;
use std::ops::{Add, AddAssign, Mul, Neg, Sub};

use rayon::prelude::*;

use super::{check_len, Backend, BnOffsets, BnParams, BnShape, ConvShape, LinearShape, PoolShape};
use crate::error::{Error, Result};

/// Elements per work item of the elementwise operations.
const ELEM_CHUNK: usize = 1 << 15;
/// Rows (samples) per work item of the linear layer.
const LINEAR_ROWS: usize = 16;
/// Output features per work item of the linear layer's weight gradient.
const LINEAR_OUT_COLS: usize = 32;
/// Columns (samples x output pixels) one convolution GEMM aims for: small feature maps
/// put several samples side by side so the weight is packed once for all of them.
const CONV_TARGET_COLS: usize = 256;
/// Work items a convolution is split into at least, when the batch allows.
const CONV_MIN_ITEMS: usize = 8;
/// At most this many weight-gradient partials per convolution (summed in order).
const CONV_MAX_PARTIALS: usize = 16;
/// At least this many samples per weight-gradient partial.
const CONV_MIN_CHUNK: usize = 4;

/// A floating-point type the CPU backend computes in (f32 or f64).
pub trait Scalar:
    Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + std::fmt::Debug
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + 'static
{
    /// Zero.
    const ZERO: Self;
    /// Negative infinity.
    const NEG_INF: Self;
    /// Conversion from f64 (rounding).
    fn from_f64(v: f64) -> Self;
    /// Conversion to f64 (exact).
    fn to_f64(self) -> f64;
    /// NaN test.
    fn is_nan(self) -> bool;
    /// Name for messages ("f32"/"f64").
    const NAME: &'static str;
    /// `C = alpha A B + beta C` on raw strided matrices (A: m x k, B: k x n, C: m x n).
    ///
    /// # Safety
    /// Every pointer must address the whole strided matrix it describes, `c` must not
    /// alias `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

impl Scalar for f32 {
    const ZERO: Self = 0.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    const NAME: &'static str = "f32";
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded contract of gemm_raw.
        unsafe {
            matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

impl Scalar for f64 {
    const ZERO: Self = 0.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
    const NAME: &'static str = "f64";
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded contract of gemm_raw.
        unsafe {
            matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

/// Index one past the last element of a strided `rows x cols` matrix.
fn extent(rows: usize, cols: usize, (rs, cs): (usize, usize)) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// Safe strided GEMM: `C = alpha A B + beta C`, A m x k, B k x n, C m x n, each given with
/// its (row stride, column stride). Panics (an internal bug, never user input: shapes are
/// validated before) if a matrix does not fit its slice.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: Scalar>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: &[T],
    sa: (usize, usize),
    b: &[T],
    sb: (usize, usize),
    beta: T,
    c: &mut [T],
    sc: (usize, usize),
) {
    assert!(extent(m, k, sa) <= a.len(), "gemm: A out of bounds");
    assert!(extent(k, n, sb) <= b.len(), "gemm: B out of bounds");
    assert!(extent(m, n, sc) <= c.len(), "gemm: C out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the three asserts prove every addressed element lies inside its slice; `c` is
    // a unique borrow so it aliases neither `a` nor `b`; strides fit isize (slice lengths do).
    unsafe {
        T::gemm_raw(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            sa.0 as isize,
            sa.1 as isize,
            b.as_ptr(),
            sb.0 as isize,
            sb.1 as isize,
            beta,
            c.as_mut_ptr(),
            sc.0 as isize,
            sc.1 as isize,
        )
    }
}

/// The CPU backend over scalar `T` (use `Cpu::<f32>::new()` for training).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu<T: Scalar = f32> {
    _t: PhantomData<T>,
}

impl<T: Scalar> Cpu<T> {
    /// The backend (stateless; runs on rayon's current thread pool).
    pub fn new() -> Self {
        Cpu { _t: PhantomData }
    }
}

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
fn conv_chunk(n: usize) -> usize {
    n.div_ceil(CONV_MAX_PARTIALS).max(CONV_MIN_CHUNK)
}

fn f64_sum<T: Scalar>(v: impl Iterator<Item = T>) -> f64 {
    v.fold(0.0f64, |a, b| a + b.to_f64())
}

impl<T: Scalar> Backend for Cpu<T> {
    type Buf = Vec<T>;
    type Idx = Vec<u32>;

    fn name(&self) -> String {
        format!("cpu-{}", T::NAME)
    }
    fn zeros(&self, n: usize) -> Result<Vec<T>> {
        Ok(vec![T::ZERO; n])
    }
    fn zeros_idx(&self, n: usize) -> Result<Vec<u32>> {
        Ok(vec![0; n])
    }
    fn upload_f32(&self, host: &[f32]) -> Result<Vec<T>> {
        Ok(host.iter().map(|&v| T::from_f64(v as f64)).collect())
    }
    fn download_f32(&self, buf: &Vec<T>) -> Result<Vec<f32>> {
        Ok(buf.iter().map(|v| v.to_f64() as f32).collect())
    }
    fn write_f32(&self, buf: &mut Vec<T>, off: usize, src: &[f32]) -> Result<()> {
        check_len("write_f32", buf.len(), off, src.len())?;
        for (d, &s) in buf[off..off + src.len()].iter_mut().zip(src) {
            *d = T::from_f64(s as f64);
        }
        Ok(())
    }
    fn upload_f64(&self, host: &[f64]) -> Result<Vec<T>> {
        Ok(host.iter().map(|&v| T::from_f64(v)).collect())
    }
    fn download_f64(&self, buf: &Vec<T>) -> Result<Vec<f64>> {
        Ok(buf.iter().map(|v| v.to_f64()).collect())
    }
    fn len(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn fill_zero(&self, buf: &mut Vec<T>) -> Result<()> {
        buf.par_chunks_mut(ELEM_CHUNK).for_each(|c| c.fill(T::ZERO));
        Ok(())
    }
    fn copy(&self, buf: &Vec<T>) -> Result<Vec<T>> {
        Ok(buf.clone())
    }

    // x: N x Cin x H x W, w: Cout x (Cin K K), y: N x Cout x (Ho Wo).
    // Per group of m samples: col = im2col (CinKK x m HoWo), Yt = w col (Cout x m HoWo),
    // then Yt is scattered to NCHW.
    fn conv2d_forward(
        &self,
        s: &ConvShape,
        x: &Vec<T>,
        w: &Vec<T>,
        w_off: usize,
        y: &mut Vec<T>,
    ) -> Result<()> {
        check_len("conv2d x", x.len(), 0, s.x_len())?;
        check_len("conv2d weight", w.len(), w_off, s.w_len())?;
        check_len("conv2d y", y.len(), 0, s.y_len())?;
        let (xs, ys, hwo, ckk) = (
            s.cin * s.h * s.w,
            s.cout * s.ho * s.wo,
            s.ho * s.wo,
            s.cin * s.k * s.k,
        );
        let wm = &w[w_off..w_off + s.w_len()];
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
        Ok(())
    }

    // Fixed chunks of samples (by batch size) each own a dW partial; inside a chunk, per
    // group of m samples: dYt = dy gathered to Cout x m HoWo, partial += dYt col^T
    // (Cout x CinKK), dcol = w^T dYt, dx = col2im(dcol). Partials are summed in order.
    fn conv2d_backward(
        &self,
        s: &ConvShape,
        x: &Vec<T>,
        w: &Vec<T>,
        w_off: usize,
        dy: &Vec<T>,
        dx: Option<&mut Vec<T>>,
        dw: &mut Vec<T>,
        dw_off: usize,
    ) -> Result<()> {
        check_len("conv2d x", x.len(), 0, s.x_len())?;
        check_len("conv2d weight", w.len(), w_off, s.w_len())?;
        check_len("conv2d dy", dy.len(), 0, s.y_len())?;
        check_len("conv2d dw", dw.len(), dw_off, s.w_len())?;
        if let Some(dx) = &dx {
            check_len("conv2d dx", dx.len(), 0, s.x_len())?;
        }
        let (xs, ys, hwo, ckk) = (
            s.cin * s.h * s.w,
            s.cout * s.ho * s.wo,
            s.ho * s.wo,
            s.cin * s.k * s.k,
        );
        let wm = &w[w_off..w_off + s.w_len()];
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
        let mut partials: Vec<Vec<T>> = vec![Vec::new(); nchunks];
        match dx {
            Some(dx) => partials
                .par_iter_mut()
                .zip(dx[..s.x_len()].par_chunks_mut(chunk * xs))
                .enumerate()
                .for_each(|(ci, (p, dxc))| work(ci, p, Some(dxc))),
            None => partials
                .par_iter_mut()
                .enumerate()
                .for_each(|(ci, p)| work(ci, p, None)),
        }
        dw[dw_off..dw_off + s.w_len()]
            .par_chunks_mut(ELEM_CHUNK)
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
        Ok(())
    }

    // x: N x C x HW. Group b = samples n with n % G == b; per (b, c) mean and biased var
    // over the (N/G) HW values, in f64.
    fn bn_forward_train(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &Vec<T>,
        params: &Vec<T>,
        off: BnOffsets,
        running: &mut Vec<T>,
        y: &mut Vec<T>,
        mean: &mut Vec<T>,
        invstd: &mut Vec<T>,
    ) -> Result<()> {
        bn_checks(s, x.len(), params.len(), off, running.len(), y.len())?;
        let (c, g, hw) = (s.c, s.groups, s.hw);
        check_len("batchnorm mean", mean.len(), 0, g * c)?;
        check_len("batchnorm invstd", invstd.len(), 0, g * c)?;
        let eps = hp.eps;
        let mom = hp.momentum;
        let m = s.count() as f64;
        // stats[ch][b] = (mean, biased var)
        let stats: Vec<Vec<(f64, f64)>> = (0..c)
            .into_par_iter()
            .map(|ch| {
                (0..g)
                    .map(|b| {
                        let planes = (b..s.n)
                            .step_by(g)
                            .map(|n| &x[(n * c + ch) * hw..(n * c + ch + 1) * hw]);
                        let mut sum = 0.0f64;
                        for p in planes.clone() {
                            sum += f64_sum(p.iter().copied());
                        }
                        let mu = sum / m;
                        let mut sq = 0.0f64;
                        for p in planes {
                            for &v in p {
                                let d = v.to_f64() - mu;
                                sq += d * d;
                            }
                        }
                        let var = sq / m;
                        (mu, var)
                    })
                    .collect()
            })
            .collect();
        for (ch, st) in stats.iter().enumerate() {
            let (mut am, mut av) = (0.0, 0.0);
            for (b, &(mu, var)) in st.iter().enumerate() {
                mean[b * c + ch] = T::from_f64(mu);
                invstd[b * c + ch] = T::from_f64(1.0 / (var + eps).sqrt());
                am += mu;
                av += var * m / (m - 1.0);
            }
            let rm = &mut running[off.mean + ch];
            *rm = T::from_f64((1.0 - mom) * rm.to_f64() + mom * am / g as f64);
            let rv = &mut running[off.var + ch];
            *rv = T::from_f64((1.0 - mom) * rv.to_f64() + mom * av / g as f64);
        }
        let mean = &*mean;
        let invstd = &*invstd;
        y[..s.len()]
            .par_chunks_mut(hw)
            .zip(x[..s.len()].par_chunks(hw))
            .enumerate()
            .for_each(|(p, (yp, xp))| {
                let (n, ch) = (p / c, p % c);
                let b = n % g;
                // y = (x - mean) scale + beta: centering first keeps the precision of values
                // near the mean (x scale + shift would cancel there).
                let scale =
                    T::from_f64(params[off.gamma + ch].to_f64() * invstd[b * c + ch].to_f64());
                let (mu, beta) = (mean[b * c + ch], params[off.beta + ch]);
                for (yv, &xv) in yp.iter_mut().zip(xp) {
                    *yv = (xv - mu) * scale + beta;
                }
            });
        Ok(())
    }

    fn bn_forward_eval(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &Vec<T>,
        params: &Vec<T>,
        off: BnOffsets,
        running: &Vec<T>,
        y: &mut Vec<T>,
    ) -> Result<()> {
        bn_checks(s, x.len(), params.len(), off, running.len(), y.len())?;
        let c = s.c;
        y[..s.len()]
            .par_chunks_mut(s.hw)
            .zip(x[..s.len()].par_chunks(s.hw))
            .enumerate()
            .for_each(|(p, (yp, xp))| {
                let ch = p % c;
                let inv = 1.0 / (running[off.var + ch].to_f64() + hp.eps).sqrt();
                let scale = T::from_f64(params[off.gamma + ch].to_f64() * inv);
                let (mu, beta) = (running[off.mean + ch], params[off.beta + ch]);
                for (yv, &xv) in yp.iter_mut().zip(xp) {
                    *yv = (xv - mu) * scale + beta;
                }
            });
        Ok(())
    }

    // Per (b, c): sdy = sum dy, sdx = sum dy xhat over the group's M values;
    // dx = gamma invstd (dy - sdy / M - xhat sdx / M).
    fn bn_backward_train(
        &self,
        s: &BnShape,
        x: &Vec<T>,
        params: &Vec<T>,
        off: BnOffsets,
        mean: &Vec<T>,
        invstd: &Vec<T>,
        dy: &Vec<T>,
        dx: &mut Vec<T>,
        grads: &mut Vec<T>,
    ) -> Result<()> {
        let (c, g, hw) = (s.c, s.groups, s.hw);
        check_len("batchnorm x", x.len(), 0, s.len())?;
        check_len("batchnorm dy", dy.len(), 0, s.len())?;
        check_len("batchnorm dx", dx.len(), 0, s.len())?;
        check_len("batchnorm mean", mean.len(), 0, g * c)?;
        check_len("batchnorm invstd", invstd.len(), 0, g * c)?;
        for (what, o) in [("gamma", off.gamma), ("beta", off.beta)] {
            check_len(what, params.len(), o, c)?;
            check_len(what, grads.len(), o, c)?;
        }
        let m = s.count() as f64;
        let sums: Vec<Vec<(f64, f64)>> = (0..c)
            .into_par_iter()
            .map(|ch| {
                (0..g)
                    .map(|b| {
                        let mu = mean[b * c + ch].to_f64();
                        let is = invstd[b * c + ch].to_f64();
                        let (mut sdy, mut sdx) = (0.0f64, 0.0f64);
                        for n in (b..s.n).step_by(g) {
                            let r = (n * c + ch) * hw..(n * c + ch + 1) * hw;
                            for (&xv, &d) in x[r.clone()].iter().zip(&dy[r]) {
                                let d = d.to_f64();
                                sdy += d;
                                sdx += d * (xv.to_f64() - mu) * is;
                            }
                        }
                        (sdy, sdx)
                    })
                    .collect()
            })
            .collect();
        for (ch, st) in sums.iter().enumerate() {
            let sdx: f64 = st.iter().map(|v| v.1).sum();
            let sdy: f64 = st.iter().map(|v| v.0).sum();
            let gg = &mut grads[off.gamma + ch];
            *gg = T::from_f64(gg.to_f64() + sdx);
            let gb = &mut grads[off.beta + ch];
            *gb = T::from_f64(gb.to_f64() + sdy);
        }
        dx[..s.len()]
            .par_chunks_mut(hw)
            .enumerate()
            .for_each(|(p, dxp)| {
                let (n, ch) = (p / c, p % c);
                let b = n % g;
                let (sdy, sdx) = sums[ch][b];
                let is = invstd[b * c + ch].to_f64();
                let a = params[off.gamma + ch].to_f64() * is;
                // dx = a (dy - sdy / M) + k (x - mean), with x - mean formed first.
                let k = T::from_f64(-a * is * sdx / m);
                let c0 = T::from_f64(-a * sdy / m);
                let (a, mu) = (T::from_f64(a), mean[b * c + ch]);
                let r = p * hw..(p + 1) * hw;
                for ((d, &xv), &dv) in dxp.iter_mut().zip(&x[r.clone()]).zip(&dy[r]) {
                    *d = a * dv + c0 + k * (xv - mu);
                }
            });
        Ok(())
    }

    fn bn_backward_eval(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &Vec<T>,
        params: &Vec<T>,
        off: BnOffsets,
        running: &Vec<T>,
        dy: &Vec<T>,
        dx: &mut Vec<T>,
        grads: &mut Vec<T>,
    ) -> Result<()> {
        bn_checks(s, x.len(), params.len(), off, running.len(), dx.len())?;
        check_len("batchnorm dy", dy.len(), 0, s.len())?;
        check_len("batchnorm grads", grads.len(), off.gamma.max(off.beta), s.c)?;
        let (c, hw) = (s.c, s.hw);
        let inv = |ch: usize| 1.0 / (running[off.var + ch].to_f64() + hp.eps).sqrt();
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (mu, is) = (running[off.mean + ch].to_f64(), inv(ch));
                let (mut sdy, mut sdx) = (0.0, 0.0);
                for n in 0..s.n {
                    let r = (n * c + ch) * hw..(n * c + ch + 1) * hw;
                    for (&xv, &d) in x[r.clone()].iter().zip(&dy[r]) {
                        sdy += d.to_f64();
                        sdx += d.to_f64() * (xv.to_f64() - mu) * is;
                    }
                }
                (sdy, sdx)
            })
            .collect();
        for (ch, &(sdy, sdx)) in sums.iter().enumerate() {
            let gg = &mut grads[off.gamma + ch];
            *gg = T::from_f64(gg.to_f64() + sdx);
            let gb = &mut grads[off.beta + ch];
            *gb = T::from_f64(gb.to_f64() + sdy);
        }
        dx[..s.len()]
            .par_chunks_mut(hw)
            .zip(dy[..s.len()].par_chunks(hw))
            .enumerate()
            .for_each(|(p, (dxp, dyp))| {
                let ch = p % c;
                let a = T::from_f64(params[off.gamma + ch].to_f64() * inv(ch));
                for (d, &v) in dxp.iter_mut().zip(dyp) {
                    *d = a * v;
                }
            });
        Ok(())
    }

    fn relu_forward(&self, x: &mut Vec<T>) -> Result<()> {
        x.par_chunks_mut(ELEM_CHUNK).for_each(|c| {
            for v in c {
                // NaN propagates, as in PyTorch.
                if (*v).partial_cmp(&T::ZERO) == Some(std::cmp::Ordering::Less) || *v == T::ZERO {
                    *v = T::ZERO;
                }
            }
        });
        Ok(())
    }
    fn relu_backward(&self, y: &Vec<T>, dy: &mut Vec<T>) -> Result<()> {
        check_len("relu y", y.len(), 0, dy.len())?;
        dy.par_chunks_mut(ELEM_CHUNK)
            .zip(y.par_chunks(ELEM_CHUNK))
            .for_each(|(d, y)| {
                for (d, &y) in d.iter_mut().zip(y) {
                    if y.partial_cmp(&T::ZERO) != Some(std::cmp::Ordering::Greater) {
                        *d = T::ZERO;
                    }
                }
            });
        Ok(())
    }
    fn add_assign(&self, a: &mut Vec<T>, b: &Vec<T>) -> Result<()> {
        if a.len() != b.len() {
            return Err(Error::invalid(format!(
                "add: lengths differ ({} and {})",
                a.len(),
                b.len()
            )));
        }
        a.par_chunks_mut(ELEM_CHUNK)
            .zip(b.par_chunks(ELEM_CHUNK))
            .for_each(|(a, b)| {
                for (a, &b) in a.iter_mut().zip(b) {
                    *a += b;
                }
            });
        Ok(())
    }

    // x: planes x H x W -> y: planes x Ho x Wo; first maximum in scan order wins (PyTorch).
    fn maxpool_forward(
        &self,
        s: &PoolShape,
        x: &Vec<T>,
        y: &mut Vec<T>,
        idx: &mut Vec<u32>,
    ) -> Result<()> {
        let (hw, hwo) = (s.h * s.w, s.ho * s.wo);
        check_len("maxpool x", x.len(), 0, s.planes * hw)?;
        check_len("maxpool y", y.len(), 0, s.planes * hwo)?;
        check_len("maxpool idx", idx.len(), 0, s.planes * hwo)?;
        y[..s.planes * hwo]
            .par_chunks_mut(hwo)
            .zip(idx[..s.planes * hwo].par_chunks_mut(hwo))
            .zip(x[..s.planes * hw].par_chunks(hw))
            .for_each(|((yp, ip), xp)| {
                for oy in 0..s.ho {
                    for ox in 0..s.wo {
                        let y0 = (oy * s.stride) as isize - s.pad as isize;
                        let x0 = (ox * s.stride) as isize - s.pad as isize;
                        let (mut best, mut bi) = (T::NEG_INF, usize::MAX);
                        for iy in y0.max(0)..(y0 + s.k as isize).min(s.h as isize) {
                            for ix in x0.max(0)..(x0 + s.k as isize).min(s.w as isize) {
                                let i = iy as usize * s.w + ix as usize;
                                if bi == usize::MAX {
                                    bi = i;
                                }
                                let v = xp[i];
                                if v > best || v.is_nan() {
                                    best = v;
                                    bi = i;
                                    if v.is_nan() {
                                        break;
                                    }
                                }
                            }
                        }
                        yp[oy * s.wo + ox] = xp[bi];
                        ip[oy * s.wo + ox] = bi as u32;
                    }
                }
            });
        Ok(())
    }
    fn maxpool_backward(
        &self,
        s: &PoolShape,
        dy: &Vec<T>,
        idx: &Vec<u32>,
        dx: &mut Vec<T>,
    ) -> Result<()> {
        let (hw, hwo) = (s.h * s.w, s.ho * s.wo);
        check_len("maxpool dy", dy.len(), 0, s.planes * hwo)?;
        check_len("maxpool idx", idx.len(), 0, s.planes * hwo)?;
        check_len("maxpool dx", dx.len(), 0, s.planes * hw)?;
        dx[..s.planes * hw]
            .par_chunks_mut(hw)
            .zip(dy[..s.planes * hwo].par_chunks(hwo))
            .zip(idx[..s.planes * hwo].par_chunks(hwo))
            .for_each(|((dxp, dyp), ip)| {
                dxp.fill(T::ZERO);
                for (&d, &i) in dyp.iter().zip(ip) {
                    if let Some(t) = dxp.get_mut(i as usize) {
                        *t += d;
                    }
                }
            });
        Ok(())
    }
    fn avgpool_forward(&self, planes: usize, hw: usize, x: &Vec<T>, y: &mut Vec<T>) -> Result<()> {
        check_len("avgpool x", x.len(), 0, planes * hw)?;
        check_len("avgpool y", y.len(), 0, planes)?;
        if hw == 0 {
            return Err(Error::invalid("avgpool: empty spatial size"));
        }
        y[..planes]
            .par_iter_mut()
            .zip(x[..planes * hw].par_chunks(hw))
            .for_each(|(y, xp)| *y = T::from_f64(f64_sum(xp.iter().copied()) / hw as f64));
        Ok(())
    }
    fn avgpool_backward(
        &self,
        planes: usize,
        hw: usize,
        dy: &Vec<T>,
        dx: &mut Vec<T>,
    ) -> Result<()> {
        check_len("avgpool dy", dy.len(), 0, planes)?;
        check_len("avgpool dx", dx.len(), 0, planes * hw)?;
        if hw == 0 {
            return Err(Error::invalid("avgpool: empty spatial size"));
        }
        let inv = 1.0 / hw as f64;
        dx[..planes * hw]
            .par_chunks_mut(hw)
            .zip(dy[..planes].par_iter())
            .for_each(|(dxp, &d)| dxp.fill(T::from_f64(d.to_f64() * inv)));
        Ok(())
    }

    // x: N x IN, W: OUT x IN, b: OUT, y: N x OUT.
    fn linear_forward(
        &self,
        s: &LinearShape,
        x: &Vec<T>,
        params: &Vec<T>,
        w_off: usize,
        b_off: usize,
        y: &mut Vec<T>,
    ) -> Result<()> {
        check_len("linear x", x.len(), 0, s.n * s.fin)?;
        check_len("linear weight", params.len(), w_off, s.fout * s.fin)?;
        check_len("linear bias", params.len(), b_off, s.fout)?;
        check_len("linear y", y.len(), 0, s.n * s.fout)?;
        let wm = &params[w_off..w_off + s.fout * s.fin];
        let bias = &params[b_off..b_off + s.fout];
        y[..s.n * s.fout]
            .par_chunks_mut(LINEAR_ROWS * s.fout)
            .zip(x[..s.n * s.fin].par_chunks(LINEAR_ROWS * s.fin))
            .for_each(|(yr, xr)| {
                let rows = xr.len() / s.fin;
                for r in 0..rows {
                    yr[r * s.fout..(r + 1) * s.fout].copy_from_slice(bias);
                }
                // y (rows x OUT) += x (rows x IN) . W^T (IN x OUT)
                gemm(
                    rows,
                    s.fin,
                    s.fout,
                    T::from_f64(1.0),
                    xr,
                    (s.fin, 1),
                    wm,
                    (1, s.fin),
                    T::from_f64(1.0),
                    yr,
                    (s.fout, 1),
                );
            });
        Ok(())
    }

    fn linear_backward(
        &self,
        s: &LinearShape,
        x: &Vec<T>,
        params: &Vec<T>,
        w_off: usize,
        b_off: usize,
        dy: &Vec<T>,
        dx: Option<&mut Vec<T>>,
        grads: &mut Vec<T>,
    ) -> Result<()> {
        check_len("linear x", x.len(), 0, s.n * s.fin)?;
        check_len("linear weight", params.len(), w_off, s.fout * s.fin)?;
        check_len("linear weight grad", grads.len(), w_off, s.fout * s.fin)?;
        check_len("linear bias grad", grads.len(), b_off, s.fout)?;
        check_len("linear dy", dy.len(), 0, s.n * s.fout)?;
        let one = T::from_f64(1.0);
        let wm = &params[w_off..w_off + s.fout * s.fin];
        if let Some(dx) = dx {
            check_len("linear dx", dx.len(), 0, s.n * s.fin)?;
            // dx (rows x IN) = dy (rows x OUT) . W (OUT x IN)
            dx[..s.n * s.fin]
                .par_chunks_mut(LINEAR_ROWS * s.fin)
                .zip(dy[..s.n * s.fout].par_chunks(LINEAR_ROWS * s.fout))
                .for_each(|(dxr, dyr)| {
                    let rows = dyr.len() / s.fout;
                    gemm(
                        rows,
                        s.fout,
                        s.fin,
                        one,
                        dyr,
                        (s.fout, 1),
                        wm,
                        (s.fin, 1),
                        T::ZERO,
                        dxr,
                        (s.fin, 1),
                    );
                });
        }
        // dW[o0..o1] (cols x IN) += dy[:, o0..o1]^T (cols x N) . x (N x IN)
        let (gw, rest) = grads.split_at_mut(w_off + s.fout * s.fin);
        let gw = &mut gw[w_off..];
        gw.par_chunks_mut(LINEAR_OUT_COLS * s.fin)
            .enumerate()
            .for_each(|(ci, gwc)| {
                let o0 = ci * LINEAR_OUT_COLS;
                let cols = gwc.len() / s.fin;
                gemm(
                    cols,
                    s.n,
                    s.fin,
                    one,
                    &dy[o0..],
                    (1, s.fout),
                    x,
                    (s.fin, 1),
                    one,
                    gwc,
                    (s.fin, 1),
                );
            });
        let gb: &mut [T] = if b_off >= w_off + s.fout * s.fin {
            &mut rest[b_off - (w_off + s.fout * s.fin)..][..s.fout]
        } else {
            &mut grads[b_off..b_off + s.fout]
        };
        for (o, g) in gb.iter_mut().enumerate() {
            let sum: f64 = (0..s.n).map(|n| dy[n * s.fout + o].to_f64()).sum();
            *g = T::from_f64(g.to_f64() + sum);
        }
        Ok(())
    }

    fn sgd_step(
        &self,
        params: &mut Vec<T>,
        grads: &Vec<T>,
        momentum_buf: &mut Vec<T>,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    ) -> Result<()> {
        check_sgd(
            params.len(),
            grads.len(),
            momentum_buf.len(),
            lr,
            momentum,
            weight_decay,
        )?;
        let (lr, mom, wd) = (
            T::from_f64(lr),
            T::from_f64(momentum),
            T::from_f64(weight_decay),
        );
        params
            .par_chunks_mut(ELEM_CHUNK)
            .zip(grads.par_chunks(ELEM_CHUNK))
            .zip(momentum_buf.par_chunks_mut(ELEM_CHUNK))
            .for_each(|((p, g), b)| {
                for ((p, &g), b) in p.iter_mut().zip(g).zip(b) {
                    let d = g + wd * *p;
                    *b = mom * *b + d;
                    *p = *p - lr * *b;
                }
            });
        Ok(())
    }
}

pub(crate) fn check_sgd(
    p: usize,
    g: usize,
    b: usize,
    lr: f64,
    momentum: f64,
    wd: f64,
) -> Result<()> {
    if p != g || p != b {
        return Err(Error::invalid(format!(
            "sgd: params ({p}), grads ({g}) and momentum buffer ({b}) must have the same length"
        )));
    }
    // The f32 backends compute with the values rounded to f32: they must be finite there.
    if !(lr as f32).is_finite() || lr < 0.0 {
        return Err(Error::invalid(format!(
            "sgd: learning rate must be finite and >= 0, got {lr}"
        )));
    }
    if !(0.0..=1.0).contains(&momentum) {
        return Err(Error::invalid(format!(
            "sgd: momentum must be in [0, 1], got {momentum}"
        )));
    }
    if !(wd as f32).is_finite() || wd < 0.0 {
        return Err(Error::invalid(format!(
            "sgd: weight decay must be finite and >= 0, got {wd}"
        )));
    }
    Ok(())
}

pub(crate) fn bn_checks(
    s: &BnShape,
    x: usize,
    params: usize,
    off: BnOffsets,
    running: usize,
    y: usize,
) -> Result<()> {
    check_len("batchnorm x", x, 0, s.len())?;
    check_len("batchnorm y", y, 0, s.len())?;
    check_len("batchnorm gamma", params, off.gamma, s.c)?;
    check_len("batchnorm beta", params, off.beta, s.c)?;
    check_len("batchnorm running_mean", running, off.mean, s.c)?;
    check_len("batchnorm running_var", running, off.var, s.c)?;
    Ok(())
}
