//! Data-parallel training: the collectives a distributed MoCo step needs, behind one trait.
//!
//! The seed's MoCo is a multi-GPU program: DistributedDataParallel over NCCL, the key images
//! and the keys gathered across GPUs for shuffle-BN and the enqueue, the gradients averaged.
//! A [`Communicator`] is one rank's handle on such a group. Two implementations:
//!
//! - [`ThreadComm`]: the ranks are threads of one process, exchanging through shared memory
//!   with real barriers. Any backend (the buffers travel through the host, exactly, as f64).
//!   The tests use it to prove the distributed step equal to the single-device one, and it
//!   runs multi-core CPU training with one rank per thread.
//! - [`NcclComm`]: NCCL for GPUs (the `Cuda` backend), one process per GPU, set up through
//!   [`rendezvous`]. The collectives run on the backend's stream. NCCL itself does not
//!   check that the ranks' lengths agree, and a rank that dies mid-collective is noticed
//!   only by the rendezvous and the launcher, not inside a collective.
//!
//! [`Moco::step_distributed`](crate::train::Moco::step_distributed) is the seed's step on
//! top of it. A rank that leaves or never arrives makes the others fail with
//! [`Error::Comm`] within the group's timeout, never hang.
//!
//! ```
//! use moco::backend::Cpu;
//! use moco::dist::{Communicator, ThreadComm};
//! use std::time::Duration;
//! let group = ThreadComm::group(2, Duration::from_secs(10)).unwrap();
//! let be = Cpu::<f32>::new();
//! let handles: Vec<_> = group
//!     .into_iter()
//!     .map(|comm| {
//!         let be = be.clone();
//!         std::thread::spawn(move || {
//!             let mine = vec![comm.rank() as f32; 3];
//!             let all = comm.all_gather(&be, &mine).unwrap();
//!             let mut g = vec![comm.rank() as f32 * 2.0];
//!             comm.all_reduce_mean(&be, &mut g).unwrap();
//!             (all, g)
//!         })
//!     })
//!     .collect();
//! for h in handles {
//!     let (all, g) = h.join().unwrap();
//!     assert_eq!(all, vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
//!     assert_eq!(g, vec![1.0]);
//! }
//! ```
pub mod nccl;
pub mod rendezvous;
mod thread;

pub use nccl::NcclComm;
pub use thread::ThreadComm;

use crate::backend::Backend;
use crate::error::{Error, Result};

/// One rank's handle on a group of `world` ranks running the same program in lock step.
///
/// Every rank calls the same collectives in the same order with buffers of the same
/// length; a rank whose length differs from rank 0's gets [`Error::Comm`], as do the others.
/// Results come back in rank order and are the same on every rank, bit for bit.
pub trait Communicator<B: Backend>: Send {
    /// This rank, in `0..world`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world(&self) -> usize;

    /// Every rank's `send` (each of the same length), concatenated in rank order.
    fn all_gather(&self, be: &B, send: &B::Buf) -> Result<B::Buf>;
    /// Replaces `buf` on every rank by `root`'s.
    fn broadcast(&self, be: &B, buf: &mut B::Buf, root: usize) -> Result<()>;
    /// Replaces `buf` on every rank by the element-wise mean over the ranks (summed in rank
    /// order, so every rank gets the same bits).
    fn all_reduce_mean(&self, be: &B, buf: &mut B::Buf) -> Result<()>;

    /// [`Communicator::broadcast`] for host values (permutations, counters, statistics).
    fn broadcast_host(&self, values: &mut [f64], root: usize) -> Result<()>;
    /// [`Communicator::all_reduce_mean`] for host values.
    fn all_reduce_mean_host(&self, values: &mut [f64]) -> Result<()>;
    /// Waits until every rank has arrived.
    fn barrier(&self) -> Result<()> {
        self.all_reduce_mean_host(&mut [])
    }
}

/// Broadcasts a permutation (or any index list) from `root`, checking that every rank then
/// holds indices, not fractions.
pub fn broadcast_indices<B: Backend>(
    comm: &dyn Communicator<B>,
    idx: &mut [usize],
    root: usize,
) -> Result<()> {
    let mut v: Vec<f64> = idx.iter().map(|&i| i as f64).collect();
    comm.broadcast_host(&mut v, root)?;
    for (dst, x) in idx.iter_mut().zip(&v) {
        if !(x.is_finite() && *x >= 0.0 && x.fract() == 0.0 && *x < 9.0e15) {
            return Err(Error::Comm(format!("broadcast index {x} is not an index")));
        }
        *dst = *x as usize;
    }
    Ok(())
}

/// Checks a (rank, world) pair.
pub fn check_rank(rank: usize, world: usize) -> Result<()> {
    if world == 0 || rank >= world {
        return Err(Error::invalid(format!(
            "rank {rank} is not in a world of {world} ranks (need world >= 1 and 0 <= rank < world)"
        )));
    }
    Ok(())
}
