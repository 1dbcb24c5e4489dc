//! Evaluation of learned features.
//!
//! * [`knn`]: the weighted kNN monitor of InstDisc / the MoCo CIFAR-10 demo
//!   (k = 200, t = 0.1): features of the training split are the bank, top-1 on the test split.
//! * [`linear`]: a linear classifier on frozen features (MoCo's linear evaluation).
pub mod knn;
pub mod linear;

pub use knn::{knn_monitor, knn_predict, knn_top1, KNN_K, KNN_T};
