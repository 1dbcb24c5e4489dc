//! [`ThreadComm`]: a group of ranks that are threads of one process.
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{check_rank, Communicator};
use crate::backend::Backend;
use crate::error::{Error, Result};

/// What a rank brings to a collective: which one it thinks this is, and its values.
struct Contribution {
    op: &'static str,
    values: Vec<f64>,
}

struct State {
    /// Collectives completed so far; the one being gathered is number `round`.
    round: u64,
    /// This round's contributions, by rank.
    slots: Vec<Option<Contribution>>,
    /// The last completed round's contributions, in rank order.
    done: Arc<Vec<Contribution>>,
    /// Set once the group is broken (a rank left or timed out): every later call fails.
    broken: Option<String>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        // A rank that panicked while holding the lock poisons it: the group is broken.
        self.state
            .lock()
            .map_err(|_| Error::Comm("a rank panicked inside a collective".into()))
    }
}

/// One rank of an in-process group: the ranks are threads, the collectives meet at a real
/// barrier and copy through shared memory. Works for any backend: buffers travel as f64
/// through the host, which is exact for f32 and f64.
///
/// A rank that is dropped (its thread ended or panicked) or that does not arrive within the
/// group's timeout breaks the group: every rank waiting, and every later call, gets
/// [`Error::Comm`] naming what happened.
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadComm {
    /// A group of `world` ranks, one [`ThreadComm`] per rank in rank order; a collective
    /// waits at most `timeout` for the other ranks.
    pub fn group(world: usize, timeout: Duration) -> Result<Vec<ThreadComm>> {
        check_rank(0, world)?;
        if world > 4096 {
            return Err(Error::invalid(format!(
                "a thread group of {world} ranks is more than 4096"
            )));
        }
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(State {
                round: 0,
                slots: (0..world).map(|_| None).collect(),
                done: Arc::new(Vec::new()),
                broken: None,
            }),
            cv: Condvar::new(),
        });
        Ok((0..world)
            .map(|rank| ThreadComm {
                rank,
                shared: shared.clone(),
            })
            .collect())
    }

    /// This rank, in `0..world` (also [`Communicator::rank`]; this one needs no backend type).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks of the group.
    pub fn world(&self) -> usize {
        self.shared.world
    }

    /// Brings `values` to collective `op` and returns every rank's contribution in rank
    /// order, once all have arrived.
    fn exchange(&self, op: &'static str, values: Vec<f64>) -> Result<Arc<Vec<Contribution>>> {
        let sh = &*self.shared;
        let mut st = sh.lock()?;
        if let Some(why) = &st.broken {
            return Err(Error::Comm(why.clone()));
        }
        let round = st.round;
        st.slots[self.rank] = Some(Contribution { op, values });
        if st.slots.iter().all(Option::is_some) {
            let all: Vec<Contribution> = st.slots.iter_mut().filter_map(Option::take).collect();
            st.done = Arc::new(all);
            st.round += 1;
            sh.cv.notify_all();
            return Ok(st.done.clone());
        }
        let deadline = Instant::now() + sh.timeout;
        while st.round == round && st.broken.is_none() {
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<String> = st
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.is_none())
                    .map(|(r, _)| r.to_string())
                    .collect();
                let why = format!(
                    "rank(s) {} did not reach collective {} ({op}) within {:.1} s",
                    missing.join(", "),
                    round + 1,
                    sh.timeout.as_secs_f64()
                );
                st.broken = Some(why.clone());
                sh.cv.notify_all();
                return Err(Error::Comm(why));
            }
            st = sh
                .cv
                .wait_timeout(st, deadline - now)
                .map_err(|_| Error::Comm("a rank panicked inside a collective".into()))?
                .0;
        }
        if st.round == round {
            return Err(Error::Comm(st.broken.clone().unwrap_or_default()));
        }
        Ok(st.done.clone())
    }

    /// Every contribution is to `op` and, when `same_len`, as long as rank 0's.
    fn check(&self, all: &[Contribution], op: &'static str, same_len: bool) -> Result<()> {
        for (r, c) in all.iter().enumerate() {
            if c.op != op {
                return Err(self.fail(format!(
                    "rank {r} called {} while rank {} called {op}: the ranks are out of step",
                    c.op, self.rank
                )));
            }
            if same_len && c.values.len() != all[0].values.len() {
                return Err(self.fail(format!(
                    "{op}: rank {r} brought {} values, rank 0 brought {}",
                    c.values.len(),
                    all[0].values.len()
                )));
            }
        }
        Ok(())
    }

    /// Marks the group broken (so no rank goes on alone) and returns the error.
    fn fail(&self, why: String) -> Error {
        if let Ok(mut st) = self.shared.lock() {
            st.broken.get_or_insert_with(|| why.clone());
            self.shared.cv.notify_all();
        }
        Error::Comm(why)
    }

    fn mean(&self, op: &'static str, values: Vec<f64>) -> Result<Vec<f64>> {
        let n = values.len();
        let all = self.exchange(op, values)?;
        self.check(&all, op, true)?;
        let inv = 1.0 / self.shared.world as f64;
        let mut out = vec![0.0f64; n];
        for c in all.iter() {
            for (o, v) in out.iter_mut().zip(&c.values) {
                *o += v;
            }
        }
        out.iter_mut().for_each(|o| *o *= inv);
        Ok(out)
    }

    fn bcast(&self, op: &'static str, values: Vec<f64>, root: usize) -> Result<Vec<f64>> {
        check_rank(root, self.shared.world)?;
        let all = self.exchange(op, values)?;
        self.check(&all, op, true)?; // every length equals rank 0's, so root's fits
        Ok(all[root].values.clone())
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        let rank = self.rank;
        if let Ok(mut st) = self.shared.state.lock() {
            st.broken
                .get_or_insert_with(|| format!("rank {rank} left the group"));
            self.shared.cv.notify_all();
        }
    }
}

impl<B: Backend> Communicator<B> for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn all_gather(&self, be: &B, send: &B::Buf) -> Result<B::Buf> {
        let all = self.exchange("all_gather", be.download_f64(send)?)?;
        self.check(&all, "all_gather", true)?;
        let cat: Vec<f64> = all.iter().flat_map(|c| c.values.iter().copied()).collect();
        be.upload_f64(&cat)
    }
    fn broadcast(&self, be: &B, buf: &mut B::Buf, root: usize) -> Result<()> {
        let v = self.bcast("broadcast", be.download_f64(buf)?, root)?;
        *buf = be.upload_f64(&v)?;
        Ok(())
    }
    fn all_reduce_mean(&self, be: &B, buf: &mut B::Buf) -> Result<()> {
        let v = self.mean("all_reduce", be.download_f64(buf)?)?;
        *buf = be.upload_f64(&v)?;
        Ok(())
    }
    fn broadcast_host(&self, values: &mut [f64], root: usize) -> Result<()> {
        let v = self.bcast("broadcast_host", values.to_vec(), root)?;
        values.copy_from_slice(&v);
        Ok(())
    }
    fn all_reduce_mean_host(&self, values: &mut [f64]) -> Result<()> {
        let v = self.mean("all_reduce_host", values.to_vec())?;
        values.copy_from_slice(&v);
        Ok(())
    }
}
