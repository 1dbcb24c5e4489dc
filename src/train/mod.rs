//! Training: configuration and presets, the trainer, checkpoints, metrics and plots.
pub mod checkpoint;
pub mod config;
pub mod export;
pub mod memory;
pub mod metrics;
pub mod plot;
pub mod trainer;

pub use checkpoint::write_atomic;
pub use config::TrainConfig;
pub use trainer::{
    CheckpointMeta, EpochSums, MocoBackend, StepStats, Trainer, CHECKPOINT_FILE,
    PREV_CHECKPOINT_FILE,
};
