//! Training support: checkpoints ([`checkpoint`]), per-epoch metrics ([`metrics`]) and
//! plots of those metrics ([`plot`]).
pub mod checkpoint;
pub mod metrics;
pub mod plot;
