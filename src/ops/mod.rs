//! The MoCo operations, each with a plain CPU reference and a CUDA implementation.
//!
//! CUDA functions take a [`Gpu`](crate::cuda::Gpu) handle and cudarc buffers, so programs
//! that already use cudarc can call them on their own `CudaSlice<f32>` and stream
//! (see `examples/embed_ops.rs`). Every wrapper checks lengths, ranges and devices before
//! launching and returns [`Error::InvalidArgument`](crate::Error::InvalidArgument) or
//! [`Error::DeviceMismatch`](crate::Error::DeviceMismatch) instead of launching on bad input.
pub mod momentum;

pub use momentum::{momentum_update, momentum_update_cpu};
