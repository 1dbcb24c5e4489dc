//! [`NcclComm`]: the collectives of a multi-GPU run over NCCL (cudarc's `nccl` module,
//! libnccl loaded at run time like the driver).
//!
//! NCCL ships as `libnccl.so.2` (PyTorch's wheels, NVIDIA's packages), a name cudarc 0.19's
//! loader does not try: it asks for `libnccl.so` (and `.so.13`, `.so.12`, ...).
//! [`nccl_status`] finds out which is there; `moco train --gpus N` makes a private
//! `libnccl.so` link to the `libnccl.so.2` it finds and hands it to the ranks it starts
//! ([`nccl_link_dir`]); a program launched otherwise needs such a link on its
//! `LD_LIBRARY_PATH` (`ln -s /path/to/libnccl.so.2 /some/dir/libnccl.so`).
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::CudaSlice;
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::rendezvous::{rendezvous, DistEnv};
use super::Communicator;
use crate::backend::{Backend, Cuda};
use crate::error::{CudaResultExt, Error, Result};

/// What this machine has of NCCL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NcclStatus {
    /// cudarc can load it.
    Loadable,
    /// Only `libnccl.so.2` was found, here: it needs a `libnccl.so` link.
    NeedsLink(PathBuf),
    /// No NCCL library at all.
    Missing,
}

/// Where NCCL's shared library is looked for beyond the loader's own path: the
/// `LD_LIBRARY_PATH` directories, the usual system ones and those of a PyTorch install.
fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/cuda/lib64",
        "/usr/local/lib",
    ] {
        dirs.push(d.into());
    }
    // pip's nvidia-nccl-cu* wheels: <site-packages>/nvidia/nccl/lib.
    for root in ["/usr/lib", "/usr/local/lib", "/opt/conda/lib"] {
        if let Ok(rd) = std::fs::read_dir(root) {
            for e in rd.flatten() {
                let name = e.file_name();
                if name.to_string_lossy().starts_with("python3") {
                    for sp in ["site-packages", "dist-packages"] {
                        dirs.push(e.path().join(sp).join("nvidia/nccl/lib"));
                    }
                }
            }
        }
    }
    dirs
}

/// Whether NCCL can be used, and if not, why.
pub fn nccl_status() -> NcclStatus {
    // SAFETY: is_culib_present only tries to dlopen libnccl under cudarc's names and drops
    // the handle; it calls nothing in it.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        return NcclStatus::Loadable;
    }
    for d in search_dirs() {
        let p = d.join("libnccl.so.2");
        if p.is_file() {
            return NcclStatus::NeedsLink(p);
        }
    }
    NcclStatus::Missing
}

/// NCCL's version `(major, minor, patch)` when cudarc can load it.
pub fn nccl_version() -> Option<(u32, u32, u32)> {
    if nccl_status() != NcclStatus::Loadable {
        return None;
    }
    let v = cudarc::nccl::result::get_nccl_version().ok()? as u32;
    // NCCL >= 2.9 encodes major * 10000 + minor * 100 + patch.
    Some((v / 10000, (v / 100) % 100, v % 100))
}

/// A directory holding a `libnccl.so` link to `lib` (made under `cache`, replaced if it
/// points elsewhere), for the `LD_LIBRARY_PATH` of the ranks a launcher starts.
pub fn nccl_link_dir(lib: &Path, cache: &Path) -> Result<PathBuf> {
    let dir = cache.join("nccl-link");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let link = dir.join("libnccl.so");
    if std::fs::read_link(&link).ok().as_deref() != Some(lib) {
        let _ = std::fs::remove_file(&link);
        #[cfg(unix)]
        std::os::unix::fs::symlink(lib, &link).map_err(|e| Error::io(&link, e))?;
        #[cfg(not(unix))]
        std::fs::copy(lib, &link).map_err(|e| Error::io(&link, e))?;
    }
    Ok(dir)
}

fn nccl_err(call: &str, e: cudarc::nccl::result::NcclError) -> Error {
    Error::Comm(format!("NCCL {call} failed: {e:?}"))
}

/// One rank of a multi-GPU group over NCCL, on its backend's stream: the collectives are
/// queued on that stream in order with the step's kernels, so no host synchronization
/// sits between them.
pub struct NcclComm {
    /// Dropped by hand ([`Drop for NcclComm`](NcclComm)): cudarc's `Comm` panics in drop
    /// when `ncclCommAbort` fails, and a panic in a drop during unwinding (a failed
    /// assertion in a test) aborts the whole process.
    comm: ManuallyDrop<Comm>,
    be: Cuda,
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Unwinding already: a second panic would abort the process. The communicator
            // is leaked (the process is failing anyway; NCCL's resources go with it).
            return;
        }
        // SAFETY: `comm` is dropped exactly once, here, and never used afterwards.
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
            ManuallyDrop::drop(&mut self.comm)
        }));
        if dropped.is_err() {
            eprintln!("moco: ncclCommAbort failed while dropping an NCCL communicator");
        }
    }
}

// SAFETY: an NCCL communicator is not tied to the thread that created it (NCCL's docs
// allow any thread to issue its operations, one at a time); `NcclComm` is `Send` but not
// `Sync`, so only one thread at a time can reach the `Comm` inside.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Joins the group of `env` (see [`rendezvous`]) and sets up NCCL on `be`'s GPU.
    /// Rank 0 draws the NCCL unique id and hands it to the others.
    pub fn new(be: &Cuda, env: &DistEnv, timeout: Duration) -> Result<NcclComm> {
        match nccl_status() {
            NcclStatus::Loadable => {}
            NcclStatus::NeedsLink(p) => {
                return Err(Error::Comm(format!(
                    "NCCL is at {} but cudarc loads it as libnccl.so: add a link to a directory on LD_LIBRARY_PATH (ln -s {} DIR/libnccl.so), or launch with moco train --gpus N, which does",
                    p.display(),
                    p.display()
                )))
            }
            NcclStatus::Missing => {
                return Err(Error::Comm(
                    "no NCCL library (libnccl.so) found: install NCCL 2 (e.g. pip's nvidia-nccl-cu13) and put it on LD_LIBRARY_PATH".into(),
                ))
            }
        }
        let id_bytes = rendezvous(
            env,
            || {
                let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
                Ok(id.internal().iter().map(|&c| c as u8).collect())
            },
            timeout,
        )?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if id_bytes.len() != internal.len() {
            return Err(Error::Comm(format!(
                "rank 0 sent an NCCL id of {} bytes, not 128",
                id_bytes.len()
            )));
        }
        for (d, s) in internal.iter_mut().zip(&id_bytes) {
            *d = *s as std::ffi::c_char;
        }
        // Every kernel module loaded before the communicator exists (see
        // `Gpu::load_all_kernels`): no lazy load while another rank's NCCL kernel spins.
        be.gpu().load_all_kernels()?;
        let stream: Arc<cudarc::driver::CudaStream> = be.gpu().stream().clone();
        let comm = Comm::from_rank(stream, env.rank, env.world, Id::uninit(internal))
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok(NcclComm {
            comm: ManuallyDrop::new(comm),
            be: be.clone(),
        })
    }

    fn host_op(
        &self,
        values: &mut [f64],
        op: impl FnOnce(&mut CudaSlice<f64>) -> Result<()>,
    ) -> Result<()> {
        if values.is_empty() {
            // NCCL has no zero-length barrier; one value stands in.
            let mut one = [0.0];
            return self.host_op(&mut one, op);
        }
        let stream = self.be.gpu().stream();
        let mut d = stream.clone_htod(values).call("cuMemcpyHtoDAsync")?;
        op(&mut d)?;
        stream.memcpy_dtoh(&d, values).call("cuMemcpyDtoHAsync")?;
        stream.synchronize().call("cuStreamSynchronize")
    }
}

impl Communicator<Cuda> for NcclComm {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world(&self) -> usize {
        self.comm.world_size()
    }
    fn all_gather(&self, be: &Cuda, send: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let mut recv = be.zeros(send.len() * self.world())?;
        self.comm
            .all_gather(send, &mut recv)
            .map_err(|e| nccl_err("ncclAllGather", e))?;
        Ok(recv)
    }
    fn broadcast(&self, _be: &Cuda, buf: &mut CudaSlice<f32>, root: usize) -> Result<()> {
        super::check_rank(root, self.world())?;
        self.comm
            .broadcast_in_place(buf, root as i32)
            .map_err(|e| nccl_err("ncclBroadcast", e))?;
        Ok(())
    }
    fn all_reduce_mean(&self, _be: &Cuda, buf: &mut CudaSlice<f32>) -> Result<()> {
        self.comm
            .all_reduce_in_place(buf, &ReduceOp::Avg)
            .map_err(|e| nccl_err("ncclAllReduce", e))?;
        Ok(())
    }
    fn broadcast_host(&self, values: &mut [f64], root: usize) -> Result<()> {
        super::check_rank(root, self.world())?;
        self.host_op(values, |d| {
            self.comm
                .broadcast_in_place(d, root as i32)
                .map(|_| ())
                .map_err(|e| nccl_err("ncclBroadcast", e))
        })
    }
    fn all_reduce_mean_host(&self, values: &mut [f64]) -> Result<()> {
        self.host_op(values, |d| {
            self.comm
                .all_reduce_in_place(d, &ReduceOp::Avg)
                .map(|_| ())
                .map_err(|e| nccl_err("ncclAllReduce", e))
        })
    }
}
