//! The MoCo operations, each with a plain CPU reference and a CUDA implementation.
//!
//! CUDA functions take a [`Gpu`](crate::cuda::Gpu) handle and cudarc buffers (`CudaSlice<f32>`
//! or views into one), so programs that already use cudarc can call them on their own
//! buffers and stream (see `examples/embed_ops.rs`). Every wrapper checks lengths, ranges and
//! devices before launching and returns [`Error::InvalidArgument`](crate::Error::InvalidArgument)
//! or [`Error::DeviceMismatch`](crate::Error::DeviceMismatch) instead of launching on bad input.
//!
//! | operation | CPU reference | CUDA |
//! |---|---|---|
//! | momentum update | [`momentum_update_cpu`] | [`momentum_update`], [`momentum_update_multi`] |
//! | L2 normalize | [`l2_normalize_cpu`] | [`Contrast::normalize`] |
//! | logits | [`logits_cpu`] | [`Contrast::logits`] |
//! | InfoNCE fwd + bwd | [`infonce_cpu`], [`infonce_f64`] | [`Contrast::infonce`] |
//! | symmetric InfoNCE | [`infonce_symmetric_cpu`] | [`Contrast::infonce_symmetric`] |
//! | circular enqueue | [`enqueue_cpu`] | [`enqueue`] |
//!
//! Written once for every backend over [`Backend`](crate::backend::Backend) (which carries
//! these operations on a backend's own buffers, [`Cpu<f32>`](crate::backend::Cpu), `Cpu<f64>`
//! and [`Cuda`](crate::backend::Cuda)):
//! the [`Queue`] and the [`MocoHead`], which runs MoCo's contrastive half on the embeddings
//! of an encoder the caller brings.
pub mod contrast;
pub mod head;
pub mod momentum;
pub mod queue;

pub use head::{HeadOutput, MocoHead};

pub use contrast::{
    infonce_cpu, infonce_f64, infonce_host, infonce_symmetric_cpu, l2_normalize_cpu,
    l2_normalize_host, logits_cpu, Contrast, ContrastShape, InfoNceImpl, InfoNceOutput,
    InfoNceStats, NORMALIZE_EPS,
};
pub use momentum::{
    momentum_update, momentum_update_bf16_copy, momentum_update_bf16_copy_cpu, momentum_update_cpu,
    momentum_update_host, momentum_update_multi, momentum_update_multi_cpu,
};
pub use queue::{enqueue, enqueue_bf16, enqueue_bf16_cpu, enqueue_cpu, initial_keys, Queue};
