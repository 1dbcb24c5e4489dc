//! Training: configuration and presets, the MoCo state and step ([`Moco`]), the trainer
//! around it, checkpoints, export, metrics and plots.
pub mod checkpoint;
pub mod config;
pub mod export;
pub mod memory;
pub mod metrics;
pub mod moco;
pub mod plot;
pub mod trainer;

pub use checkpoint::write_atomic;
pub use config::{RunPreset, Schedule, TrainConfig};
pub use moco::{Moco, StateCounters, StepStats, STATE_TENSORS};
pub use trainer::{CheckpointMeta, EpochSums, Trainer, CHECKPOINT_FILE, PREV_CHECKPOINT_FILE};
