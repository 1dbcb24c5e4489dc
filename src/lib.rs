//! # moco
//!
//! MoCo (Momentum Contrast, He et al. 2019) with hand-written CUDA kernels and a CPU
//! reference for every operation.
//!
//! * [`ops`]: the MoCo operations (momentum update, ...), CPU and CUDA.
//! * [`cuda`]: the CUDA runtime ([`cuda::Gpu`]) that loads the embedded kernels.
//! * [`Device`]: CPU or CUDA, with auto-selection.
//! * [`data`]: data sets (synthetic, IDX, CIFAR, image folders), augmentation, loader.
//! * [`eval`]: the kNN monitor.
//! * [`train`]: the MoCo state and step ([`train::Moco`]), the trainer, checkpoints
//!   (safetensors), per-epoch metrics (JSON lines) and plots; [`export`] writes
//!   torchvision-named encoder files.
//! * [`ops::MocoHead`]: MoCo's contrastive half for an encoder you bring.
//!
//! Using the crate as a library, level by level: `docs/library.md`.
//!
//! ```
//! // The CPU reference works everywhere.
//! let mut key = vec![0.0f32; 4];
//! moco::ops::momentum_update_cpu(&mut key, &[1.0; 4], 0.9).unwrap();
//! assert!((key[0] - 0.1).abs() < 1e-7);
//! ```
#![warn(missing_docs)]

/// Serde for the named choices of a config (architecture, data set, augmentation, ...): as
/// the strings their `Display` writes and `FromStr` reads, so config files and the
/// `config.json` of a checkpoint hold the names a user types, and a wrong one is the
/// `FromStr` error.
macro_rules! serde_via_str {
    ($($t:ty),* $(,)?) => {$(
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

pub mod backend;
pub mod cuda;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod eval;
pub(crate) mod fsio;
pub mod model;
pub mod ops;
pub mod optim;
pub mod rng;
pub mod testing;
pub mod train;

pub use device::{Device, DeviceSpec};
pub use error::{Error, Result};
pub use train::export;

/// The examples of `docs/library.md`, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/library.md")]
pub struct LibraryDocs;

/// Crate version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
