//! The one SGEMM wrapper of the crate: cuBLAS on the [`Gpu`]'s handle, on views, with every
//! operand's extent checked against its view before the call. The ResNet's dense row-major
//! products ([`Cuda::gemm_rm`]) and the contrastive logits (strided, into a column of a
//! wider matrix) both go through [`sgemm`].
use cudarc::cublas::sys::cublasOperation_t as Op;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{CudaView, CudaViewMut};

use super::Cuda;
use crate::cuda::Gpu;
use crate::error::{Error, Result};

/// A column-major (cuBLAS) GEMM call: `C = op(A) op(B)`, `C` m x n, `k` the inner size,
/// each operand with its leading dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ColMajorGemm {
    pub transa: bool,
    pub transb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

/// The column-major call that computes the row-major `C (m x n) = op(A) op(B)` with `A`
/// stored m x k (k x m when `ta`) and `B` k x n (n x k when `tb`), densely: a row-major
/// matrix is its transpose in column-major, so the call computes `C^T = op(B)^T op(A)^T`
/// with the operands swapped (the first operand of the call is `B`).
pub(crate) fn row_major_as_col_major(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
) -> ColMajorGemm {
    ColMajorGemm {
        transa: tb,
        transb: ta,
        m: n,
        n: m,
        k,
        lda: if tb { k.max(1) } else { n.max(1) },
        ldb: if ta { m.max(1) } else { k.max(1) },
        ldc: n.max(1),
    }
}

fn to_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::invalid(format!(
            "GEMM {what} = {v} exceeds the 2^31 limit of one cuBLAS call"
        ))
    })
}

/// Checks that a column-major `rows x cols` operand with leading dimension `ld` fits in
/// `len` elements (and that `ld` covers a column), naming the operand.
fn check_operand(what: &str, len: usize, rows: usize, cols: usize, ld: usize) -> Result<()> {
    if ld < rows.max(1) {
        return Err(Error::invalid(format!(
            "GEMM {what}: leading dimension {ld} is shorter than its {rows} rows"
        )));
    }
    let need = if rows == 0 || cols == 0 {
        0
    } else {
        ld.checked_mul(cols - 1)
            .and_then(|v| v.checked_add(rows))
            .ok_or_else(|| Error::invalid(format!("GEMM {what}: extent overflows")))?
    };
    if len < need {
        return Err(Error::invalid(format!(
            "GEMM {what}: view of {len} elements is too small for {rows} x {cols} with leading dimension {ld} ({need} elements)"
        )));
    }
    Ok(())
}

/// `C = alpha op(A) op(B) + beta C`, column-major, on `gpu`'s cuBLAS handle and stream
/// (full fp32 unless the GPU is in TF32 mode, [`Gpu::set_tf32`]). Nothing is launched when
/// C is empty.
pub(crate) fn sgemm(
    gpu: &Gpu,
    g: ColMajorGemm,
    alpha: f32,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    beta: f32,
    c: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    let (ar, ac) = if g.transa { (g.k, g.m) } else { (g.m, g.k) };
    let (br, bc) = if g.transb { (g.n, g.k) } else { (g.k, g.n) };
    check_operand("A", a.len(), ar, ac, g.lda)?;
    check_operand("B", b.len(), br, bc, g.ldb)?;
    check_operand("C", c.len(), g.m, g.n, g.ldc)?;
    let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
    let cfg = GemmConfig {
        transa: op(g.transa),
        transb: op(g.transb),
        m: to_i32(g.m, "m")?,
        n: to_i32(g.n, "n")?,
        k: to_i32(g.k, "k")?,
        alpha,
        lda: to_i32(g.lda, "lda")?,
        ldb: to_i32(g.ldb, "ldb")?,
        beta,
        ldc: to_i32(g.ldc, "ldc")?,
    };
    let blas = gpu.blas()?;
    // SAFETY: the checks above prove that A, B and C hold every element the column-major
    // call with these sizes and leading dimensions reads or writes; C is a unique borrow,
    // so it does not alias A or B; the handle is bound to this GPU's stream, and alpha and
    // beta are host scalars (the default pointer mode).
    unsafe { blas.gemm(cfg, a, b, c) }.map_err(|e| Error::Cublas {
        call: "cublasSgemm",
        message: format!("{e:?}"),
    })
}

impl Cuda {
    /// Row-major `C (m x n) = alpha op(A) op(B) + beta C`; `A` is stored m x k (k x m when
    /// `ta`), `B` k x n (n x k when `tb`), all densely. cuBLAS is column-major, so this
    /// computes `C^T = op(B)^T op(A)^T`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_rm(
        &self,
        (ta, tb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        a: &CudaView<'_, f32>,
        b: &CudaView<'_, f32>,
        beta: f32,
        c: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let g = row_major_as_col_major(ta, tb, m, n, k);
        sgemm(&self.gpu, g, alpha, b, a, beta, c)
    }
}
