//! Subcommands of the `moco` binary.
pub mod info;
