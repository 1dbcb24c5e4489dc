//! Normalized logits against the queue and the InfoNCE loss, forward and backward.
//!
//! Shapes (row-major): `q`, `k`: N x C, the encoders' raw outputs; `queue`: K x C, one key
//! per row (L2-normalized keys, as MoCo keeps them). Both `q` and `k` are L2-normalized
//! inside each operation exactly as PyTorch's `F.normalize(x, dim=1)` (`x / max(||x||,
//! 1e-12)`), so passing an already normalized `k` is fine (normalizing twice is a no-op up
//! to rounding).
//!
//! * logits: `[q.k, q.queue^T] / T`, N x (1 + K), the positive in column 0.
//! * InfoNCE: cross-entropy of the logits with label 0, mean over N; the gradient with
//!   respect to the *unnormalized* `q`; and the contrastive top-1 accuracy (a row counts as
//!   correct when its positive logit is >= every negative).
//!
//! On the GPU, [`InfoNceImpl::Fused`] (the default) never materializes the N x K logits: it
//! streams the queue through shared memory once with an online softmax (split-K flash
//! attention with Q = q, K = V = queue) and merges the partials with the positive.
//! [`InfoNceImpl::Unfused`] computes the logits with a cuBLAS SGEMM, runs a row softmax
//! kernel in place, and a second SGEMM for the gradient. `benches/contrast.rs` compares them.
use rayon::prelude::*;

use crate::backend::cpu::gemm;
use crate::backend::Scalar;

use crate::cuda::abi::MocoContrastShape;
use crate::error::{Error, Result};

/// The epsilon of `F.normalize`: norms below it are clamped to it.
pub const NORMALIZE_EPS: f32 = 1e-12;

/// Sizes and temperature of a contrastive operation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContrastShape {
    /// Queries (and positive keys) in the batch.
    pub n: usize,
    /// Feature dimension.
    pub c: usize,
    /// Keys in the queue (negatives).
    pub k: usize,
    /// Temperature, > 0 (f64; the f32 kernels and the f32 CPU reference use it rounded to
    /// f32, as PyTorch does for an f32 tensor divided by a Python float).
    pub t: f64,
}

impl ContrastShape {
    /// A shape, validated: every size >= 1, `t` finite and > 0, and sizes within the kernels'
    /// index types (N, C < 2^31).
    ///
    /// ```
    /// use moco::ops::ContrastShape;
    /// assert!(ContrastShape::new(256, 128, 65536, 0.07).is_ok());
    /// assert!(ContrastShape::new(256, 128, 65536, 0.0).is_err());
    /// assert!(ContrastShape::new(0, 128, 16, 0.2).is_err());
    /// ```
    pub fn new(n: usize, c: usize, k: usize, t: f64) -> Result<Self> {
        let s = ContrastShape { n, c, k, t };
        s.validate()?;
        Ok(s)
    }

    /// The temperature rounded to f32, as the f32 paths use it.
    pub fn t32(&self) -> f32 {
        self.t as f32
    }

    /// This shape with T rounded to f32 (what the f32 CPU reference computes with).
    pub fn rounded_to_f32(&self) -> ContrastShape {
        ContrastShape {
            t: self.t32() as f64,
            ..*self
        }
    }

    /// Checks the shape (see [`ContrastShape::new`]).
    pub fn validate(&self) -> Result<()> {
        if self.n == 0 || self.c == 0 || self.k == 0 {
            return Err(Error::invalid(format!(
                "contrastive shape needs N, C, K >= 1, got N={} C={} K={}",
                self.n, self.c, self.k
            )));
        }
        if !(self.t.is_finite() && self.t > 0.0 && self.t32() > 0.0 && self.t32().is_finite()) {
            return Err(Error::invalid(format!(
                "temperature T must be > 0, got {}",
                self.t
            )));
        }
        if self.n > i32::MAX as usize || self.c > i32::MAX as usize || self.k > i32::MAX as usize {
            return Err(Error::invalid("N, C and K must each be < 2^31"));
        }
        Ok(())
    }

    fn abi(&self) -> MocoContrastShape {
        MocoContrastShape {
            n: self.n as u32,
            c: self.c as u32,
            k: self.k as u64,
            inv_t: (1.0 / self.t32() as f64) as f32,
            eps: NORMALIZE_EPS,
        }
    }

    fn check_len(&self, what: &str, got: usize, rows: usize) -> Result<()> {
        let want = rows * self.c;
        if got != want {
            return Err(Error::invalid(format!(
                "{what} has {got} elements, expected {rows} x {} = {want}",
                self.c
            )));
        }
        Ok(())
    }

    fn check_inputs(&self, q: usize, k: usize, queue: usize) -> Result<()> {
        self.validate()?;
        self.check_len("q", q, self.n)?;
        self.check_len("k", k, self.n)?;
        self.check_len("queue", queue, self.k)
    }
}

/// Result of the InfoNCE loss on the CPU.
#[derive(Debug, Clone, PartialEq)]
pub struct InfoNceOutput {
    /// Mean cross-entropy over the batch.
    pub loss: f64,
    /// Fraction of rows whose positive logit is >= every negative.
    pub accuracy: f64,
    /// dloss/dq with respect to the unnormalized q, N x C.
    pub grad_q: Vec<f32>,
}

/// Loss and accuracy of a GPU InfoNCE call (the gradient is written to the caller's buffer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InfoNceStats {
    /// Mean cross-entropy over the batch.
    pub loss: f64,
    /// Fraction of rows whose positive logit is >= every negative.
    pub accuracy: f64,
}

// ---------------------------------------------------------------------------------------
// CPU reference (f64 accumulation).

/// Normalizes each row of `x` (N x C) as `F.normalize(x, dim=1)`; returns (normalized, norms).
///
/// ```
/// let (y, norms) = moco::ops::l2_normalize_cpu(&[3.0, 4.0, 0.0, 0.0], 2, 2).unwrap();
/// assert_eq!(y, vec![0.6, 0.8, 0.0, 0.0]);
/// assert_eq!(norms, vec![5.0, 0.0]);
/// ```
pub fn l2_normalize_cpu(x: &[f32], n: usize, c: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    if c == 0 || x.len() != n * c {
        return Err(Error::invalid(format!(
            "normalize: {} elements is not N x C = {n} x {c}",
            x.len()
        )));
    }
    let mut out = vec![0.0f32; n * c];
    let mut norms = vec![0.0f32; n];
    out.par_chunks_mut(c)
        .zip(norms.par_iter_mut())
        .zip(x.par_chunks(c))
        .for_each(|((o, nr), row)| {
            let norm = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            let denom = norm.max(NORMALIZE_EPS as f64);
            for (o, &v) in o.iter_mut().zip(row) {
                *o = (v as f64 / denom) as f32;
            }
            *nr = norm as f32;
        });
    Ok((out, norms))
}

/// Row-wise L2 normalization of `x` (N x C) in any [`Scalar`] precision: norms in f64, each
/// value divided in f64 and rounded (for f32 exactly [`l2_normalize_cpu`]'s output).
pub fn l2_normalize_host<S: Scalar>(x: &[S], n: usize, c: usize) -> Result<Vec<S>> {
    if c == 0 || x.len() != n * c {
        return Err(Error::invalid(format!(
            "normalize: {} elements is not N x C = {n} x {c}",
            x.len()
        )));
    }
    let mut out = vec![S::ZERO; n * c];
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .for_each(|(o, row)| {
            let norm = row
                .iter()
                .map(|&v| v.to_f64() * v.to_f64())
                .sum::<f64>()
                .sqrt();
            let denom = norm.max(NORMALIZE_EPS as f64);
            for (o, &v) in o.iter_mut().zip(row) {
                *o = S::from_f64(v.to_f64() / denom);
            }
        });
    Ok(out)
}

/// InfoNCE forward and backward in any [`Scalar`] precision: inputs widened to f64, T
/// rounded to the scalar type, the loss and gradient computed in f64 by the GEMM form of
/// [`infonce_f64`] (equal to it up to the order of the sums, so f32 inputs give
/// [`infonce_cpu`] to f64 rounding), the gradient rounded back. The f32 CPU backend runs
/// a faster f32 variant instead (within about 1e-6 relative).
pub fn infonce_host<S: Scalar>(
    q: &[S],
    k: &[S],
    queue: &[S],
    s: ContrastShape,
) -> Result<(InfoNceStats, Vec<S>)> {
    let to64 = |x: &[S]| x.iter().map(|v| v.to_f64()).collect::<Vec<_>>();
    let st = ContrastShape {
        t: S::from_f64(s.t).to_f64(),
        ..s
    };
    let (loss, grad, correct) = infonce_gemm_f64(&to64(q), &to64(k), &to64(queue), st)?;
    Ok((
        InfoNceStats {
            loss,
            accuracy: correct as f64 / s.n as f64,
        },
        grad.into_iter().map(S::from_f64).collect(),
    ))
}

fn normalize_f64(row: &[f64]) -> (Vec<f64>, f64) {
    let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
    let denom = norm.max(NORMALIZE_EPS as f64);
    (row.iter().map(|v| v / denom).collect(), norm)
}

fn dot64(a: &[f64], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x * y as f64).sum()
}

/// CPU reference: the N x (1 + K) logits `[qn.kn, qn.queue^T] / T`.
///
/// ```
/// use moco::ops::{logits_cpu, ContrastShape};
/// let s = ContrastShape::new(1, 2, 2, 0.5).unwrap();
/// // q = k = (1, 0); queue rows (1, 0) and (0, 1).
/// let l = logits_cpu(&[2.0, 0.0], &[1.0, 0.0], &[1.0, 0.0, 0.0, 1.0], s).unwrap();
/// assert_eq!(l, vec![2.0, 2.0, 0.0]);
/// ```
pub fn logits_cpu(q: &[f32], k: &[f32], queue: &[f32], s: ContrastShape) -> Result<Vec<f32>> {
    s.check_inputs(q.len(), k.len(), queue.len())?;
    let (c, kk) = (s.c, s.k);
    let inv_t = 1.0 / s.t32() as f64;
    let mut out = vec![0.0f32; s.n * (1 + kk)];
    out.par_chunks_mut(1 + kk).enumerate().for_each(|(i, row)| {
        let qn = normalize_f64(
            &q[i * c..(i + 1) * c]
                .iter()
                .map(|&v| v as f64)
                .collect::<Vec<_>>(),
        )
        .0;
        let kn = normalize_f64(
            &k[i * c..(i + 1) * c]
                .iter()
                .map(|&v| v as f64)
                .collect::<Vec<_>>(),
        )
        .0;
        row[0] = (qn.iter().zip(&kn).map(|(a, b)| a * b).sum::<f64>() * inv_t) as f32;
        for j in 0..kk {
            row[1 + j] = (dot64(&qn, &queue[j * c..(j + 1) * c]) * inv_t) as f32;
        }
    });
    Ok(out)
}

/// The InfoNCE loss in f64 on f64 inputs: (mean loss, dloss/dq (N x C), rows correct).
///
/// The reference the f32 paths are checked against, and what the finite-difference test
/// differentiates. `q` is unnormalized; `k` is normalized inside; `queue` is used as given.
pub fn infonce_f64(
    q: &[f64],
    k: &[f64],
    queue: &[f64],
    s: ContrastShape,
) -> Result<(f64, Vec<f64>, usize)> {
    s.check_inputs(q.len(), k.len(), queue.len())?;
    let (n, c, kk) = (s.n, s.c, s.k);
    let inv_t = 1.0 / s.t;
    let eps = NORMALIZE_EPS as f64;
    let rows: Vec<(f64, Vec<f64>, bool)> = (0..n)
        .into_par_iter()
        .map(|i| {
            let (qn, qnorm) = normalize_f64(&q[i * c..(i + 1) * c]);
            let (kn, _) = normalize_f64(&k[i * c..(i + 1) * c]);
            // logits: l[0] positive, l[1..] negatives. Shapes: l is 1 + K.
            let mut l = Vec::with_capacity(1 + kk);
            l.push(qn.iter().zip(&kn).map(|(a, b)| a * b).sum::<f64>() * inv_t);
            for j in 0..kk {
                l.push(
                    qn.iter()
                        .zip(&queue[j * c..(j + 1) * c])
                        .map(|(a, b)| a * b)
                        .sum::<f64>()
                        * inv_t,
                );
            }
            let mx = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let max_neg = l[1..].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = l.iter().map(|v| (v - mx).exp()).sum();
            let lse = mx + sum.ln();
            let loss = lse - l[0];
            // dloss_i/dl_j = (p_j - [j == 0]) / N; dl_j/dqn = key_j / T.
            let mut g = vec![0.0f64; c];
            for (j, lj) in l.iter().enumerate() {
                let w = ((lj - lse).exp() - if j == 0 { 1.0 } else { 0.0 }) * inv_t / n as f64;
                let key = if j == 0 {
                    &kn[..]
                } else {
                    &queue[(j - 1) * c..j * c]
                };
                for (gc, &kc) in g.iter_mut().zip(key) {
                    *gc += w * kc;
                }
            }
            // Through qn = q / max(||q||, eps).
            let grad = if qnorm > eps {
                let qg: f64 = qn.iter().zip(&g).map(|(a, b)| a * b).sum();
                g.iter()
                    .zip(&qn)
                    .map(|(gc, qc)| (gc - qc * qg) / qnorm)
                    .collect()
            } else {
                g.iter().map(|gc| gc / eps).collect()
            };
            (loss, grad, l[0] >= max_neg)
        })
        .collect();
    let mut loss = 0.0;
    let mut grad = Vec::with_capacity(n * c);
    let mut correct = 0;
    for (l, g, ok) in rows {
        loss += l;
        grad.extend(g);
        correct += ok as usize;
    }
    Ok((loss / n as f64, grad, correct))
}

/// Rows of `q` per work item of [`infonce_gemm_f64`] (fixed, so the result does not depend
/// on the thread count).
const INFONCE_ROWS: usize = 16;

/// Rows per work item of [`infonce_gemm_f32`]: larger, since each block's two GEMMs pack
/// the whole queue (2 MiB at K 4096, C 128) and f32 packing is then the larger cost.
const INFONCE_ROWS_F32: usize = 64;

/// [`infonce_f64`] with the two products over the queue as f64 GEMMs (the logits
/// `qn queue^T`, N x K, and the gradient `P queue`, N x C), over fixed blocks of
/// [`INFONCE_ROWS`] rows in parallel. Equal to [`infonce_f64`] up to the order of the f64
/// sums (about 1e-15 relative). The f64 CPU backend's InfoNCE (f32 takes
/// [`infonce_gemm_f32`]).
pub(crate) fn infonce_gemm_f64(
    q: &[f64],
    k: &[f64],
    queue: &[f64],
    s: ContrastShape,
) -> Result<(f64, Vec<f64>, usize)> {
    infonce_gemm(q, k, queue, s, INFONCE_ROWS)
}

/// [`infonce_gemm_f64`] in f32 for the f32 CPU backend: the normalized rows are rounded to
/// f32, both products over the queue are f32 GEMMs, `exp` is [`exp_nonpos_f32`], while the
/// norms, the positive logit, the softmax sums, the loss and the gradient through the
/// normalization stay in f64. Within about 1e-6 relative of [`infonce_f64`] (tested).
pub(crate) fn infonce_gemm_f32(
    q: &[f32],
    k: &[f32],
    queue: &[f32],
    s: ContrastShape,
) -> Result<(f64, Vec<f32>, usize)> {
    infonce_gemm(q, k, queue, s, INFONCE_ROWS_F32)
}

/// The element type of the InfoNCE GEMMs and logits.
trait LogitElem: Scalar {
    /// `exp(x)` for `x <= 0`.
    fn exp_nonpos(self) -> Self;
}

impl LogitElem for f64 {
    fn exp_nonpos(self) -> f64 {
        self.exp()
    }
}

impl LogitElem for f32 {
    fn exp_nonpos(self) -> f32 {
        exp_nonpos_f32(self)
    }
}

/// InfoNCE over fixed blocks of `rows` query rows in parallel (so the result does not depend
/// on the thread count): the logits and the gradient's product over the queue as GEMMs in
/// `S`, everything else in f64.
fn infonce_gemm<S: LogitElem>(
    q: &[S],
    k: &[S],
    queue: &[S],
    s: ContrastShape,
    rows: usize,
) -> Result<(f64, Vec<S>, usize)> {
    s.check_inputs(q.len(), k.len(), queue.len())?;
    let (n, c, kk) = (s.n, s.c, s.k);
    let inv_t = 1.0 / s.t;
    let eps = NORMALIZE_EPS as f64;
    let queue = &queue[..kk * c];
    let mut grad = vec![S::ZERO; n * c];
    let parts: Vec<(f64, usize)> = grad
        .par_chunks_mut(rows * c)
        .enumerate()
        .map(|(bi, gblk)| {
            let r0 = bi * rows;
            let m = gblk.len() / c;
            // qn, kn: m x C in f64; norms of q; qn rounded to S for the GEMM.
            let mut qn = vec![0.0f64; m * c];
            let mut kn = vec![0.0f64; m * c];
            let mut qnorm = vec![0.0f64; m];
            for i in 0..m {
                let row = |x: &[S]| -> Vec<f64> {
                    x[(r0 + i) * c..(r0 + i + 1) * c]
                        .iter()
                        .map(|v| v.to_f64())
                        .collect()
                };
                let (a, na) = normalize_f64(&row(q));
                qn[i * c..(i + 1) * c].copy_from_slice(&a);
                qnorm[i] = na;
                let (b, _) = normalize_f64(&row(k));
                kn[i * c..(i + 1) * c].copy_from_slice(&b);
            }
            let qs: Vec<S> = qn.iter().map(|&v| S::from_f64(v)).collect();
            // l (m x K) = qn (m x C) . queue^T (C x K) / T
            let mut l = vec![S::ZERO; m * kk];
            gemm(
                m,
                c,
                kk,
                S::from_f64(inv_t),
                &qs,
                (c, 1),
                queue,
                (1, c),
                S::ZERO,
                &mut l,
                (kk, 1),
            );
            let (mut loss, mut correct) = (0.0, 0);
            let mut wpos = vec![0.0f64; m];
            let scale = inv_t / n as f64;
            for i in 0..m {
                let lpos = qn[i * c..(i + 1) * c]
                    .iter()
                    .zip(&kn[i * c..(i + 1) * c])
                    .map(|(a, b)| a * b)
                    .sum::<f64>()
                    * inv_t;
                let li = &mut l[i * kk..(i + 1) * kk];
                let max_neg = li.iter().fold(f64::NEG_INFINITY, |a, b| a.max(b.to_f64()));
                let mx = lpos.max(max_neg);
                let mx_s = S::from_f64(mx);
                // One exp per logit: e_j = exp(l_j - max) is kept, p_j = e_j / sum; the
                // sum in 8 f64 lanes (fixed order).
                let epos = (lpos - mx).exp();
                let mut acc = [0.0f64; 8];
                let mut chunks = li.chunks_exact_mut(8);
                for ch in &mut chunks {
                    for (a, v) in acc.iter_mut().zip(ch.iter_mut()) {
                        *v = (*v - mx_s).exp_nonpos();
                        *a += v.to_f64();
                    }
                }
                let mut sum = epos;
                for v in chunks.into_remainder() {
                    *v = (*v - mx_s).exp_nonpos();
                    sum += v.to_f64();
                }
                sum += ((acc[0] + acc[1]) + (acc[2] + acc[3]))
                    + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
                loss += mx + sum.ln() - lpos;
                correct += (lpos >= max_neg) as usize;
                // dloss_i/dl_j = (p_j - [j == 0]) / N, times 1/T for dl_j/dqn.
                wpos[i] = (epos / sum - 1.0) * scale;
                let ps = S::from_f64(scale / sum);
                for v in li.iter_mut() {
                    *v = *v * ps;
                }
            }
            // g (m x C) = w (m x K) . queue (K x C), plus wpos kn, then through the
            // normalization qn = q / max(||q||, eps), in f64.
            let mut gs = vec![S::ZERO; m * c];
            gemm(
                m,
                kk,
                c,
                S::from_f64(1.0),
                &l,
                (kk, 1),
                queue,
                (c, 1),
                S::ZERO,
                &mut gs,
                (c, 1),
            );
            for i in 0..m {
                let qi = &qn[i * c..(i + 1) * c];
                let g: Vec<f64> = gs[i * c..(i + 1) * c]
                    .iter()
                    .zip(&kn[i * c..(i + 1) * c])
                    .map(|(gv, &kv)| gv.to_f64() + wpos[i] * kv)
                    .collect();
                let out = &mut gblk[i * c..(i + 1) * c];
                if qnorm[i] > eps {
                    let qg: f64 = qi.iter().zip(&g).map(|(a, b)| a * b).sum();
                    for ((o, gc), qc) in out.iter_mut().zip(&g).zip(qi) {
                        *o = S::from_f64((gc - qc * qg) / qnorm[i]);
                    }
                } else {
                    for (o, gc) in out.iter_mut().zip(&g) {
                        *o = S::from_f64(gc / eps);
                    }
                }
            }
            (loss, correct)
        })
        .collect();
    let mut loss = 0.0;
    let mut correct = 0;
    for (l, ok) in parts {
        loss += l;
        correct += ok;
    }
    Ok((loss / n as f64, grad, correct))
}

/// `exp(x)` in f32 for `x <= 0` (InfoNCE's `l - max`), branch-free so that loops over it
/// vectorize: `x = n ln 2 + r`, `|r| <= ln 2 / 2`, `exp(r)` by its degree-7 Taylor
/// polynomial (truncation error under 1e-8 relative), times `2^n` built in the exponent
/// bits. Below `-87` (where `exp` leaves f32's normal range) it returns 0; NaN stays NaN
/// (a NaN logit must make the loss NaN, as in the f64 path). Within 2 ulp of `f64::exp`
/// rounded to f32 (tested).
#[inline(always)]
pub(crate) fn exp_nonpos_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for |n| < 2^8.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    // Not `x.max(-87.0)`, which would turn NaN into -87.
    let xc = if x < -87.0 { -87.0 } else { x };
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f32::from_bits((((n as i32) + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// CPU reference: InfoNCE loss, gradient with respect to the unnormalized `q`, and accuracy.
///
/// ```
/// use moco::ops::{infonce_cpu, ContrastShape};
/// let s = ContrastShape::new(2, 4, 8, 0.2).unwrap();
/// let q = moco::testing::uniform(8, 1);
/// let k = moco::testing::uniform(8, 2);
/// let queue = moco::testing::uniform(32, 3);
/// let out = infonce_cpu(&q, &k, &queue, s).unwrap();
/// assert!(out.loss > 0.0 && out.grad_q.len() == 8);
/// ```
pub fn infonce_cpu(q: &[f32], k: &[f32], queue: &[f32], s: ContrastShape) -> Result<InfoNceOutput> {
    let to64 = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
    let (loss, grad, correct) = infonce_f64(&to64(q), &to64(k), &to64(queue), s.rounded_to_f32())?;
    Ok(InfoNceOutput {
        loss,
        accuracy: correct as f64 / s.n as f64,
        grad_q: grad.into_iter().map(|v| v as f32).collect(),
    })
}

/// CPU reference of the symmetric loss `loss(q1, k2) + loss(q2, k1)` (the CIFAR recipe):
/// returns (the sum, mean accuracy of the two halves, dloss/dq1, dloss/dq2).
pub fn infonce_symmetric_cpu(
    q1: &[f32],
    k1: &[f32],
    q2: &[f32],
    k2: &[f32],
    queue: &[f32],
    s: ContrastShape,
) -> Result<(f64, f64, Vec<f32>, Vec<f32>)> {
    let a = infonce_cpu(q1, k2, queue, s)?;
    let b = infonce_cpu(q2, k1, queue, s)?;
    Ok((
        a.loss + b.loss,
        0.5 * (a.accuracy + b.accuracy),
        a.grad_q,
        b.grad_q,
    ))
}

// ---------------------------------------------------------------------------------------
// CUDA.

/// Which GPU implementation of InfoNCE to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InfoNceImpl {
    /// One streaming pass over the queue with an online softmax; never materializes the
    /// N x K logits. Needs C <= 256 (falls back to `Unfused` above that).
    #[default]
    Fused,
    /// cuBLAS SGEMM for the logits, a softmax/cross-entropy kernel, cuBLAS SGEMM for the
    /// gradient. Materializes N x K floats of workspace.
    Unfused,
}

impl std::fmt::Display for InfoNceImpl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InfoNceImpl::Fused => "fused",
            InfoNceImpl::Unfused => "unfused",
        })
    }
}

serde_via_str!(InfoNceImpl);

impl std::str::FromStr for InfoNceImpl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fused" => Ok(InfoNceImpl::Fused),
            "unfused" => Ok(InfoNceImpl::Unfused),
            _ => Err(Error::invalid(format!(
                "unknown InfoNCE implementation {s:?}: fused or unfused"
            ))),
        }
    }
}

mod cuda;
pub use cuda::{Contrast, FUSED_MAX_C};

#[cfg(test)]
mod tests {
    use super::*;

    fn f64s(n: usize, seed: u64) -> Vec<f64> {
        crate::rng::uniform(n, seed)
            .into_iter()
            .map(|v| v as f64)
            .collect()
    }

    #[test]
    fn exp_nonpos_f32_is_within_two_ulp() {
        for i in 0..=200_000 {
            let x = -90.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp() as f32;
            let got = exp_nonpos_f32(x);
            if x < -87.0 {
                assert!(
                    got == 0.0 && want < 1.7e-38,
                    "exp({x}) = {got}, not flushed"
                );
                continue;
            }
            let ulp = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}) = {got}, want {want} ({ulp} ulp)");
        }
        assert_eq!(exp_nonpos_f32(0.0), 1.0);
        assert_eq!(exp_nonpos_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpos_f32(f32::NAN).is_nan());
    }

    /// The f32 GEMM form is within f32 rounding of the f64 reference.
    #[test]
    fn infonce_gemm_f32_matches_reference() {
        for &(n, c, kk, t) in &[
            (1, 3, 5, 0.07),
            (16, 8, 32, 0.2),
            (37, 16, 100, 0.07),
            (64, 128, 4096, 0.1),
        ] {
            let s = ContrastShape::new(n, c, kk, t).unwrap();
            let mut q = f64s(n * c, 1 + n as u64);
            q[..c].fill(0.0);
            let k = f64s(n * c, 2);
            let queue: Vec<f64> = {
                // Unit rows, as the queue holds normalized keys.
                let raw = f64s(kk * c, 3);
                raw.chunks(c).flat_map(|r| normalize_f64(r).0).collect()
            };
            let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            let (q32, k32, queue32) = (f32s(&q), f32s(&k), f32s(&queue));
            let back = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
            let s64 = s.rounded_to_f32();
            let (l0, g0, c0) = infonce_f64(&back(&q32), &back(&k32), &back(&queue32), s64).unwrap();
            let (l1, g1, c1) = infonce_gemm_f32(&q32, &k32, &queue32, s64).unwrap();
            assert_eq!(c0, c1, "{n} {c} {kk}: accuracy");
            assert!((l0 - l1).abs() <= 2e-6 * l0.abs(), "loss {l0} vs {l1}");
            let num: f64 = g0
                .iter()
                .zip(&g1)
                .map(|(a, &b)| (a - b as f64) * (a - b as f64))
                .sum();
            let den: f64 = g0.iter().map(|a| a * a).sum();
            assert!(
                num.sqrt() <= 1e-5 * den.sqrt(),
                "{n} {c} {kk}: grad rel {}",
                (num / den).sqrt()
            );
        }
        // A NaN key in the queue makes the loss NaN (the trainer's divergence check).
        let s = ContrastShape::new(16, 8, 32, 0.1).unwrap();
        let (q, k) = (vec![0.5f32; 16 * 8], vec![0.25f32; 16 * 8]);
        let mut queue = vec![0.1f32; 32 * 8];
        queue[5 * 8 + 3] = f32::NAN;
        let (loss, ..) = infonce_gemm_f32(&q, &k, &queue, s).unwrap();
        assert!(loss.is_nan(), "loss {loss} with a NaN key");
    }

    /// The GEMM form equals the per-row reference to f64 rounding, on shapes that are and
    /// are not multiples of the row block, with a zero query row (the eps branch).
    #[test]
    fn infonce_gemm_matches_reference() {
        for &(n, c, kk) in &[(1, 3, 5), (16, 8, 32), (37, 16, 100), (64, 128, 256)] {
            let s = ContrastShape::new(n, c, kk, 0.07).unwrap();
            let mut q = f64s(n * c, 1 + n as u64);
            q[..c].fill(0.0);
            let k = f64s(n * c, 2);
            let queue = f64s(kk * c, 3);
            let (l0, g0, c0) = infonce_f64(&q, &k, &queue, s).unwrap();
            let (l1, g1, c1) = infonce_gemm_f64(&q, &k, &queue, s).unwrap();
            assert_eq!(c0, c1);
            assert!((l0 - l1).abs() <= 1e-12 * l0.abs(), "loss {l0} vs {l1}");
            let num: f64 = g0.iter().zip(&g1).map(|(a, b)| (a - b) * (a - b)).sum();
            let den: f64 = g0.iter().map(|a| a * a).sum();
            assert!(
                num.sqrt() <= 1e-12 * den.sqrt(),
                "grad rel {}",
                (num / den).sqrt()
            );
        }
    }
}
