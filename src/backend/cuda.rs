//! The CUDA backend (placeholder while the CPU path lands).
#![allow(missing_docs)]
/// The CUDA backend.
#[derive(Debug, Clone)]
pub struct Cuda;
