//! The scalar type of the CPU backend and its strided GEMM (the `gemm` crate: AVX-512,
//! AVX2 or SSE kernels chosen at run time, called single-threaded).
use std::ops::{Add, AddAssign, Mul, Neg, Sub};

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
    /// The slice as f32, when `Self` is f32 (the direct convolutions' fast path).
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
    /// The slice as mutable f32, when `Self` is f32.
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]>;
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
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        Some(s)
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
        unsafe { gemm_crate(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc) }
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
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
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
        unsafe { gemm_crate(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc) }
    }
}

/// `C = alpha A B + beta C` through the `gemm` crate, single-threaded (its `dst` is
/// `alpha dst + beta lhs rhs`: the coefficients swap). With `beta == 0`, `C` is not read
/// (a NaN in it does not survive), as BLAS does.
///
/// # Safety
/// As [`Scalar::gemm_raw`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_crate<T: 'static + Copy + PartialEq + Default>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: *const T,
    rsa: isize,
    csa: isize,
    b: *const T,
    rsb: isize,
    csb: isize,
    beta: T,
    c: *mut T,
    rsc: isize,
    csc: isize,
) {
    let read_c = beta != T::default();
    // SAFETY: forwarded contract of gemm_raw (every strided matrix inside its allocation,
    // `c` aliasing neither operand); `gemm` takes (column stride, row stride) pairs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            csc,
            rsc,
            read_c,
            a,
            csa,
            rsa,
            b,
            csb,
            rsb,
            beta,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
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
