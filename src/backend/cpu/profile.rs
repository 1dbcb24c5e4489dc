//! An op-level profiler for the CPU backend: when [`enable`]d, every [`Backend`] and
//! MoCo operation of [`Cpu`] adds its wall time to a table keyed by the operation and its
//! shape (`conv3x3s1 fwd 16->16 28x28`, ...), which [`take`] returns. Off by default; when
//! off a scope costs one relaxed atomic load. `moco bench --device cpu --profile` prints it.
//!
//! [`Backend`]: crate::backend::Backend
//! [`Cpu`]: super::Cpu
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<Option<HashMap<String, (u64, f64)>>> = Mutex::new(None);

/// Total time and call count of one operation.
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    /// Operation and shape.
    pub name: String,
    /// Calls.
    pub calls: u64,
    /// Wall time in seconds, summed over the calls.
    pub secs: f64,
}

/// Turns the profiler on or off (the table is kept; [`take`] empties it).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the profiler is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The table so far, most expensive first, and empties it.
pub fn take() -> Vec<OpTime> {
    let map = TABLE
        .lock()
        .map(|mut t| t.take().unwrap_or_default())
        .unwrap_or_default();
    let mut v: Vec<OpTime> = map
        .into_iter()
        .map(|(name, (calls, secs))| OpTime { name, calls, secs })
        .collect();
    v.sort_by(|a, b| b.secs.total_cmp(&a.secs).then_with(|| a.name.cmp(&b.name)));
    v
}

/// A running measurement; adds its time to the table when dropped.
pub(crate) struct Scope {
    what: Option<(String, Instant)>,
}

/// Starts measuring the operation `name()` (only called when the profiler is on).
pub(crate) fn scope(name: impl FnOnce() -> String) -> Scope {
    Scope {
        what: enabled().then(|| (name(), Instant::now())),
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some((name, t0)) = self.what.take() {
            let dt = t0.elapsed().as_secs_f64();
            if let Ok(mut t) = TABLE.lock() {
                let e = t.get_or_insert_with(HashMap::new).entry(name).or_default();
                e.0 += 1;
                e.1 += dt;
            }
        }
    }
}
