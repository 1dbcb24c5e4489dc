//! Weighted kNN classification on L2-normalized features (the kNN monitor).
//!
//! For each query: cosine similarity to every bank row, the `k` most similar rows, each
//! voting for its label with weight `exp(sim / t)`, prediction = the class with the largest
//! summed weight. This is the InstDisc weighting used by the MoCo CIFAR-10 demo's
//! `knn_predict` (k = 200, t = 0.1).
//!
//! Both bank and queries are L2-normalized here (a row of zeros stays zero and has
//! similarity 0 to everything), so raw features may be passed. Ties are broken
//! deterministically: among equal similarities the lower bank index is the nearer
//! neighbour; among equal class scores the lower class index wins. Similarities are `f32`
//! dot products with a fixed summation order, class scores are summed in `f64` in neighbour
//! order, and queries run in parallel (rayon) without any cross-query reduction, so the
//! result does not depend on the thread count.
//!
//! ```
//! use moco::eval::knn::{knn_predict, knn_top1};
//! // Bank: two points of class 0 near +x, one of class 1 at +y (D = 2).
//! let bank = [1.0, 0.0, 0.9, 0.1, 0.0, 1.0];
//! let labels = [0, 0, 1];
//! let queries = [1.0, 0.2, 0.1, 1.0];
//! let pred = knn_predict(&bank, &labels, &queries, 2, 2, 0.1, 2).unwrap();
//! assert_eq!(pred, vec![0, 1]);
//! let acc = knn_top1(&bank, &labels, &queries, &[0, 1], 2, 2, 0.1, 2).unwrap();
//! assert_eq!(acc, 1.0);
//! ```
use rayon::prelude::*;

use crate::{Error, Result};

/// Neighbours of the kNN monitor (MoCo CIFAR-10 demo).
pub const KNN_K: usize = 200;
/// Temperature of the kNN monitor (MoCo CIFAR-10 demo).
pub const KNN_T: f32 = 0.1;

/// (similarity, bank row).
type Neighbour = (f32, u32);

/// Queries scored together per pass over the bank.
const QUERY_BLOCK: usize = 8;

/// Copies `x` (`rows x dim`) with every row scaled to unit L2 norm (zero rows stay zero).
pub fn l2_normalize_rows(x: &[f32], dim: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    if dim == 0 {
        return out;
    }
    for row in out.chunks_exact_mut(dim) {
        let n = row
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum::<f64>()
            .sqrt();
        if n > 0.0 {
            let inv = (1.0 / n) as f32;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
    out
}

/// Dot product with eight fixed lanes (vectorizes; same order every time).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

fn check(
    bank: &[f32],
    bank_labels: &[u32],
    queries: &[f32],
    dim: usize,
    k: usize,
    t: f32,
    num_classes: usize,
) -> Result<usize> {
    if dim == 0 {
        return Err(Error::invalid("kNN: feature dimension must be at least 1"));
    }
    let m = bank_labels.len();
    if m == 0 {
        return Err(Error::invalid("kNN: the feature bank is empty"));
    }
    if m > u32::MAX as usize {
        return Err(Error::invalid(format!(
            "kNN: bank of {m} rows is too large"
        )));
    }
    if bank.len() != m * dim {
        return Err(Error::invalid(format!(
            "kNN: bank has {} floats, expected {m} rows x {dim} = {}",
            bank.len(),
            m * dim
        )));
    }
    if !queries.len().is_multiple_of(dim) {
        return Err(Error::invalid(format!(
            "kNN: {} query floats is not a multiple of the dimension {dim}",
            queries.len()
        )));
    }
    if k == 0 {
        return Err(Error::invalid("kNN: k must be at least 1"));
    }
    if !(t.is_finite() && t > 0.0) {
        return Err(Error::invalid(format!("kNN: temperature {t} must be > 0")));
    }
    if num_classes == 0 {
        return Err(Error::invalid("kNN: num_classes must be at least 1"));
    }
    if let Some(l) = bank_labels.iter().find(|&&l| l as usize >= num_classes) {
        return Err(Error::invalid(format!(
            "kNN: bank label {l} is out of range for {num_classes} classes"
        )));
    }
    if bank.iter().chain(queries).any(|v| !v.is_finite()) {
        return Err(Error::invalid("kNN: features contain NaN or infinity"));
    }
    Ok(m)
}

/// Predicts a class for each query row (`queries`: `Q x dim`) from the bank (`bank`:
/// `M x dim`, labels `bank_labels`), with `k` neighbours (clamped to `M`) and temperature `t`.
#[allow(clippy::too_many_arguments)]
pub fn knn_predict(
    bank: &[f32],
    bank_labels: &[u32],
    queries: &[f32],
    dim: usize,
    k: usize,
    t: f32,
    num_classes: usize,
) -> Result<Vec<u32>> {
    let m = check(bank, bank_labels, queries, dim, k, t, num_classes)?;
    let k = k.min(m);
    let bank = l2_normalize_rows(bank, dim);
    let queries = l2_normalize_rows(queries, dim);
    let inv_t = 1.0 / t as f64;
    // Queries go in blocks of QUERY_BLOCK so each bank row is loaded once per block
    // (the bank is streamed from memory QUERY_BLOCK times less often); every similarity
    // is still the same `dot(q, b)`, so blocking does not change any result.
    let blocks: Vec<Vec<u32>> = queries
        .par_chunks(QUERY_BLOCK * dim)
        .map_init(
            || {
                (
                    (0..QUERY_BLOCK)
                        .map(|_| Vec::with_capacity(m))
                        .collect::<Vec<_>>(),
                    vec![0.0f64; num_classes],
                )
            },
            |(sims, scores): &mut (Vec<Vec<Neighbour>>, Vec<f64>), qblock| {
                let nq = qblock.len() / dim;
                for s in sims.iter_mut() {
                    s.clear();
                }
                for (i, b) in bank.chunks_exact(dim).enumerate() {
                    for (s, q) in sims.iter_mut().zip(qblock.chunks_exact(dim)) {
                        s.push((dot(q, b), i as u32));
                    }
                }
                // Nearer = larger similarity, then lower index.
                let nearer =
                    |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
                sims[..nq]
                    .iter_mut()
                    .map(|sims| {
                        if k < m {
                            sims.select_nth_unstable_by(k - 1, nearer);
                        }
                        let top = &mut sims[..k];
                        top.sort_unstable_by(nearer);
                        scores.iter_mut().for_each(|s| *s = 0.0);
                        for &(s, i) in top.iter() {
                            scores[bank_labels[i as usize] as usize] += (s as f64 * inv_t).exp();
                        }
                        let mut best = 0usize;
                        for (c, &s) in scores.iter().enumerate() {
                            if s > scores[best] {
                                best = c;
                            }
                        }
                        best as u32
                    })
                    .collect()
            },
        )
        .collect();
    Ok(blocks.concat())
}

/// Top-1 accuracy in [0, 1] of [`knn_predict`] against `query_labels`.
#[allow(clippy::too_many_arguments)]
pub fn knn_top1(
    bank: &[f32],
    bank_labels: &[u32],
    queries: &[f32],
    query_labels: &[u32],
    dim: usize,
    k: usize,
    t: f32,
    num_classes: usize,
) -> Result<f64> {
    if dim == 0 || queries.len() != query_labels.len() * dim {
        return Err(Error::invalid(format!(
            "kNN: {} query floats for {} labels of dimension {dim}",
            queries.len(),
            query_labels.len()
        )));
    }
    if query_labels.is_empty() {
        return Err(Error::invalid("kNN: no queries to score"));
    }
    let pred = knn_predict(bank, bank_labels, queries, dim, k, t, num_classes)?;
    let hits = pred
        .iter()
        .zip(query_labels)
        .filter(|(p, l)| p == l)
        .count();
    Ok(hits as f64 / query_labels.len() as f64)
}

/// The kNN monitor of the MoCo CIFAR-10 demo: top-1 accuracy of the test features against
/// the training features as the bank, with [`KNN_K`] = 200 neighbours and [`KNN_T`] = 0.1.
///
/// ```
/// let bank = [1.0, 0.0, 0.0, 1.0];
/// let acc = moco::eval::knn::knn_monitor(&bank, &[0, 1], &[0.9, 0.2], &[0], 2, 2).unwrap();
/// assert_eq!(acc, 1.0);
/// ```
pub fn knn_monitor(
    train_features: &[f32],
    train_labels: &[u32],
    test_features: &[f32],
    test_labels: &[u32],
    dim: usize,
    num_classes: usize,
) -> Result<f64> {
    knn_top1(
        train_features,
        train_labels,
        test_features,
        test_labels,
        dim,
        KNN_K,
        KNN_T,
        num_classes,
    )
}
