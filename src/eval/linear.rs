//! Linear evaluation: a linear classifier on frozen backbone features.
//!
//! The protocol of MoCo's `main_lincls.py` (SGD, momentum 0.9, lr 30, weight decay 0,
//! cosine or step schedule, cross-entropy; top-1 and top-5 on the test split), with one
//! simplification: the frozen features are computed once, from un-augmented images, and
//! the classifier is trained on them (the reference re-augments every epoch, which only
//! matters for long ImageNet runs). The backbone's BatchNorm runs in inference mode.
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Settings of the linear probe.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearConfig {
    /// Epochs over the training features.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Base learning rate (MoCo: 30).
    pub lr: f64,
    /// Weight decay (MoCo: 0).
    pub weight_decay: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Cosine decay when true, else x0.1 at 60% and 80% of the epochs.
    pub cosine: bool,
    /// Seed of the shuffling.
    pub seed: u64,
}

impl Default for LinearConfig {
    fn default() -> Self {
        LinearConfig {
            epochs: 30,
            batch_size: 256,
            lr: 30.0,
            weight_decay: 0.0,
            momentum: 0.9,
            cosine: true,
            seed: 0,
        }
    }
}

/// Top-1 and top-5 accuracy of the probe on the test features, in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearResult {
    /// Top-1 accuracy.
    pub top1: f64,
    /// Top-5 accuracy (top-min(5, classes)).
    pub top5: f64,
    /// Mean training loss of the last epoch.
    pub final_loss: f64,
}

/// Logits of one row: `W x + b`, W is classes x dim.
fn logits(w: &[f32], b: &[f32], x: &[f32], classes: usize, dim: usize) -> Vec<f64> {
    (0..classes)
        .map(|c| {
            let wr = &w[c * dim..(c + 1) * dim];
            b[c] as f64
                + wr.iter()
                    .zip(x)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
        })
        .collect()
}

/// Trains `Linear(dim, classes)` on `train` (rows of `dim` features) and evaluates on `test`.
///
/// ```
/// use moco::eval::linear::{linear_probe, LinearConfig};
/// // Two separable classes in 2-D.
/// let train = vec![1.0, 0.0, 0.9, 0.1, 0.0, 1.0, 0.1, 0.9];
/// let labels = vec![0, 0, 1, 1];
/// let cfg = LinearConfig { epochs: 20, batch_size: 2, lr: 1.0, ..Default::default() };
/// let r = linear_probe(&train, &labels, &train, &labels, 2, 2, &cfg).unwrap();
/// assert_eq!(r.top1, 1.0);
/// ```
pub fn linear_probe(
    train: &[f32],
    train_labels: &[u32],
    test: &[f32],
    test_labels: &[u32],
    dim: usize,
    classes: usize,
    cfg: &LinearConfig,
) -> Result<LinearResult> {
    if dim == 0
        || classes == 0
        || train.len() != train_labels.len() * dim
        || test.len() != test_labels.len() * dim
    {
        return Err(Error::invalid(format!(
            "linear probe: features ({} train, {} test floats) do not match {} + {} labels of dimension {dim}",
            train.len(),
            test.len(),
            train_labels.len(),
            test_labels.len()
        )));
    }
    if train_labels.is_empty() || test_labels.is_empty() {
        return Err(Error::invalid(
            "linear probe needs training and test samples",
        ));
    }
    if let Some(&l) = train_labels
        .iter()
        .chain(test_labels)
        .find(|&&l| l as usize >= classes)
    {
        return Err(Error::invalid(format!(
            "label {l} out of range for {classes} classes"
        )));
    }
    if cfg.epochs == 0 || cfg.batch_size == 0 || !(cfg.lr.is_finite() && cfg.lr >= 0.0) {
        return Err(Error::invalid(
            "linear probe needs epochs >= 1, batch >= 1, lr >= 0",
        ));
    }
    let n = train_labels.len();
    let mut w = vec![0.0f32; classes * dim];
    let mut b = vec![0.0f32; classes];
    // torch.nn.Linear init in the reference: weight N(0, 0.01), bias 0.
    {
        use rand_distr::{Distribution, Normal};
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x4c49_4e45);
        let nd = Normal::new(0.0f32, 0.01).expect("valid normal");
        w.iter_mut().for_each(|v| *v = nd.sample(&mut rng));
    }
    let mut vw = vec![0.0f32; w.len()];
    let mut vb = vec![0.0f32; b.len()];
    let mut final_loss = 0.0;
    let mut order: Vec<usize> = (0..n).collect();
    for epoch in 0..cfg.epochs {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(epoch as u64));
        order.shuffle(&mut rng);
        let mut loss_sum = 0.0;
        for idx in order.chunks(cfg.batch_size) {
            let lr = if cfg.cosine {
                cfg.lr
                    * 0.5
                    * (1.0 + (std::f64::consts::PI * epoch as f64 / cfg.epochs as f64).cos())
            } else {
                let f = epoch as f64 / cfg.epochs as f64;
                cfg.lr
                    * if f >= 0.8 {
                        0.01
                    } else if f >= 0.6 {
                        0.1
                    } else {
                        1.0
                    }
            };
            // Per-sample gradients of the mean cross-entropy, summed in a fixed order.
            let per: Vec<(Vec<f64>, f64)> = idx
                .par_iter()
                .map(|&i| {
                    let x = &train[i * dim..(i + 1) * dim];
                    let l = logits(&w, &b, x, classes, dim);
                    let mx = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = l.iter().map(|v| (v - mx).exp()).sum();
                    let y = train_labels[i] as usize;
                    let loss = mx + z.ln() - l[y];
                    let d: Vec<f64> = l
                        .iter()
                        .enumerate()
                        .map(|(c, v)| (v - mx).exp() / z - if c == y { 1.0 } else { 0.0 })
                        .collect();
                    (d, loss)
                })
                .collect();
            let m = idx.len() as f64;
            let mut gw = vec![0.0f64; w.len()];
            let mut gb = vec![0.0f64; b.len()];
            for (&i, (d, loss)) in idx.iter().zip(&per) {
                loss_sum += loss;
                let x = &train[i * dim..(i + 1) * dim];
                for c in 0..classes {
                    gb[c] += d[c] / m;
                    let g = &mut gw[c * dim..(c + 1) * dim];
                    for (gj, xj) in g.iter_mut().zip(x) {
                        *gj += d[c] * *xj as f64 / m;
                    }
                }
            }
            for (j, g) in gw.iter().enumerate() {
                let g = (*g + cfg.weight_decay * w[j] as f64) as f32;
                vw[j] = cfg.momentum as f32 * vw[j] + g;
                w[j] -= lr as f32 * vw[j];
            }
            for (c, g) in gb.iter().enumerate() {
                vb[c] = cfg.momentum as f32 * vb[c] + *g as f32;
                b[c] -= lr as f32 * vb[c];
            }
        }
        final_loss = loss_sum / n as f64;
        if !final_loss.is_finite() {
            return Err(Error::Diverged(format!(
                "linear probe loss is {final_loss} at epoch {epoch}; lower the probe's learning rate (--lr)"
            )));
        }
    }
    let k5 = classes.min(5);
    let hits: Vec<(bool, bool)> = test_labels
        .par_iter()
        .enumerate()
        .map(|(i, &y)| {
            let l = logits(&w, &b, &test[i * dim..(i + 1) * dim], classes, dim);
            let mut idx: Vec<usize> = (0..classes).collect();
            idx.sort_by(|&a, &c| {
                l[c].partial_cmp(&l[a])
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(a.cmp(&c))
            });
            (idx[0] == y as usize, idx[..k5].contains(&(y as usize)))
        })
        .collect();
    let m = test_labels.len() as f64;
    Ok(LinearResult {
        top1: hits.iter().filter(|h| h.0).count() as f64 / m,
        top5: hits.iter().filter(|h| h.1).count() as f64 / m,
        final_loss,
    })
}
