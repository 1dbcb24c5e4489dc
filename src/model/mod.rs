//! The ResNet encoders (backbone + MoCo head), written once against
//! [`Backend`](crate::backend::Backend), with all parameters in one flat buffer.
//!
//! * [`Arch`]: `resnet8`, `resnet20` (CIFAR ResNets), `resnet18-cifar` (3x3 stem, no
//!   max-pool), `resnet18`, `resnet50` (torchvision ImageNet layouts).
//! * [`ParamTable`]: every tensor's torchvision `state_dict` name, shape and offset, in
//!   torchvision order. Parameters live in one flat buffer (backbone first, then the head),
//!   gradients in another of the same layout, BatchNorm running statistics in a third.
//! * [`Encoder`]: forward (training or inference mode, split BatchNorm), backward
//!   (accumulating into the gradient buffer), backbone features, state-dict export/import.
//! * [`reference`](mod@reference): plain-loop f64 reference of every layer, for tests.
//!
//! One training step of a MoCo query encoder on the CPU (the CUDA backend,
//! [`Cuda`](crate::backend::Cuda), takes the same calls with `CudaSlice<f32>` buffers):
//!
//! ```
//! use moco::backend::{Backend, Cpu};
//! use moco::model::{Arch, Encoder, EncoderConfig, InputShape};
//! use moco::optim::Sgd;
//!
//! let be = Cpu::<f32>::new();
//! let cfg = EncoderConfig { arch: Arch::Resnet8, in_channels: 1, dim: 16, mlp: true };
//! let mut enc = Encoder::new(be, cfg, 42)?;
//! let mut opt = Sgd::new(be, enc.table().num_params(), 0.9, 5e-4)?;
//! let shape = InputShape::new(8, 1, 12, 12);
//! let x = moco::testing::normal(shape.len(), 1);
//! enc.zero_grad()?;
//! let q = enc.forward(&x, shape, true, 2)?; // 8 x 16 features, BatchNorm in 2 splits
//! assert_eq!(q.len(), 8 * 16);
//! let dq = vec![0.01f32; q.len()]; // from the loss
//! enc.backward(&dq)?; // accumulates into enc.grads()
//! let (params, grads) = enc.params_and_grads();
//! opt.step(params, grads, 0.06)?;
//! let feats = enc.features(&x, shape)?; // backbone features for kNN / linear eval
//! assert_eq!(feats.len(), 8 * 64);
//! # Ok::<(), moco::Error>(())
//! ```
//!
//! CIFAR ResNets (`resnet8`, `resnet20`) follow He et al. 2016 (3 stages of n BasicBlocks,
//! widths 16/32/64) with torchvision-style projection shortcuts (1x1 conv + BatchNorm, named
//! `layerX.0.downsample.{0,1}`) where the shape changes, so all variants share one naming
//! scheme.
//!
//! Files: this one holds the architecture, config and [`ParamTable`]; `network.rs` the
//! network description ([`InputShape`], the layer records) and its construction;
//! `encoder.rs` the [`Encoder`] with its forward and backward passes, activation caches and
//! buffer pool; `state_dict.rs` [`StateEntry`] and the encoder's state-dict export/import.
use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

mod encoder;
mod network;
pub mod reference;
mod state_dict;

pub use encoder::Encoder;
pub use network::InputShape;
pub use state_dict::StateEntry;

/// A ResNet variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// CIFAR ResNet-8: 3 stages of 1 BasicBlock, widths 16/32/64.
    Resnet8,
    /// CIFAR ResNet-20: 3 stages of 3 BasicBlocks, widths 16/32/64.
    Resnet20,
    /// torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool (MoCo CIFAR recipe).
    Resnet18Cifar,
    /// torchvision ResNet-18 (7x7/2 stem, 3x3/2 max-pool).
    Resnet18,
    /// torchvision ResNet-50 (Bottleneck, stride on the 3x3 conv).
    Resnet50,
}

impl Arch {
    /// Every architecture, in order of size.
    pub const ALL: [Arch; 5] = [
        Arch::Resnet8,
        Arch::Resnet20,
        Arch::Resnet18Cifar,
        Arch::Resnet18,
        Arch::Resnet50,
    ];

    /// The name used on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Arch::Resnet8 => "resnet8",
            Arch::Resnet20 => "resnet20",
            Arch::Resnet18Cifar => "resnet18-cifar",
            Arch::Resnet18 => "resnet18",
            Arch::Resnet50 => "resnet50",
        }
    }

    /// Width of the backbone features (input of the head).
    pub fn feature_dim(&self) -> usize {
        match self {
            Arch::Resnet8 | Arch::Resnet20 => 64,
            Arch::Resnet18Cifar | Arch::Resnet18 => 512,
            Arch::Resnet50 => 2048,
        }
    }
}

serde_via_str!(Arch);

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase().replace('_', "-");
        Arch::ALL
            .into_iter()
            .find(|a| a.name() == t)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown architecture {s:?}: expected one of resnet8, resnet20, resnet18-cifar, resnet18, resnet50"
                ))
            })
    }
}

/// What to build: backbone, head and input channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderConfig {
    /// The backbone.
    pub arch: Arch,
    /// Input channels (1 or 3).
    pub in_channels: usize,
    /// Output feature dimension of the head (MoCo: 128).
    pub dim: usize,
    /// MoCo v2 head `Linear(d, d) -> ReLU -> Linear(d, dim)` instead of `Linear(d, dim)`.
    pub mlp: bool,
}

impl EncoderConfig {
    /// A config with the MoCo defaults (3 input channels, dim 128, linear head).
    pub fn new(arch: Arch) -> Self {
        EncoderConfig {
            arch,
            in_channels: 3,
            dim: 128,
            mlp: false,
        }
    }
    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if self.in_channels == 0 || self.in_channels > 64 {
            return Err(Error::invalid(format!(
                "in_channels must be between 1 and 64, got {}",
                self.in_channels
            )));
        }
        if self.dim == 0 {
            return Err(Error::invalid("feature dim must be positive"));
        }
        Ok(())
    }
}

/// What a [`ParamTable`] entry holds and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// A trainable parameter at `offset` in the parameter (and gradient) buffer.
    Param,
    /// A BatchNorm running mean at `offset` in the running-statistics buffer.
    RunningMean,
    /// A BatchNorm running variance at `offset` in the running-statistics buffer.
    RunningVar,
    /// A BatchNorm `num_batches_tracked` counter (scalar int64 in PyTorch; the encoder
    /// keeps one counter for all of them).
    NumBatchesTracked,
}

/// One tensor of the state dict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// torchvision `state_dict` key, e.g. `layer1.0.bn2.running_var`.
    pub name: String,
    /// Shape (PyTorch order; empty for a scalar).
    pub shape: Vec<usize>,
    /// Which buffer holds it.
    pub storage: Storage,
    /// Element offset in that buffer (0 for counters).
    pub offset: usize,
    /// Number of elements (1 for counters).
    pub len: usize,
}

/// The name/shape/offset table of an encoder, in torchvision `state_dict` order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParamTable {
    entries: Vec<Entry>,
    params: usize,
    buffers: usize,
    backbone_params: usize,
}

impl ParamTable {
    /// All entries in `state_dict` order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
    /// Trainable parameters only, in `named_parameters()` order.
    pub fn params(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| e.storage == Storage::Param)
    }
    /// Length of the parameter buffer (= gradient buffer).
    pub fn num_params(&self) -> usize {
        self.params
    }
    /// Length of the running-statistics buffer.
    pub fn num_buffers(&self) -> usize {
        self.buffers
    }
    /// Parameters of the backbone: `params[..backbone_params()]`.
    pub fn backbone_params(&self) -> usize {
        self.backbone_params
    }
    /// Parameters of the head: `params[backbone_params()..]`.
    pub fn head_params(&self) -> usize {
        self.params - self.backbone_params
    }
    /// The entry named `name`.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    fn push(&mut self, name: String, shape: Vec<usize>, storage: Storage) -> usize {
        let len = shape.iter().product::<usize>().max(1);
        let offset = match storage {
            Storage::Param => {
                self.params += len;
                self.params - len
            }
            Storage::RunningMean | Storage::RunningVar => {
                self.buffers += len;
                self.buffers - len
            }
            Storage::NumBatchesTracked => 0,
        };
        self.entries.push(Entry {
            name,
            shape,
            storage,
            offset,
            len,
        });
        offset
    }
}
