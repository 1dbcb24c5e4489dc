//! Convolutions through cuDNN 9, loaded at run time like the driver: a build and a binary
//! without cuDNN still work, and [`ConvBackend::Auto`] falls back to im2col + SGEMM when
//! libcudnn cannot be loaded.
//!
//! One [`Plan`] per convolution shape holds the descriptors and the three algorithms
//! (forward, backward data, backward filter), chosen once by timing them
//! (`cudnnFind*`, as PyTorch's `cudnn.benchmark = True`) among the deterministic ones
//! ([`choose`]): in real fp32 only results that report `CUDNN_FMA_MATH` (no TF32, as
//! PyTorch with TF32 off; a timed `CUDNN_DEFAULT_MATH` result may be a tensor-core variant);
//! with `--tf32` any math type. Each direction has its own convolution descriptor, with the
//! picked result's math type set on it after the search, as PyTorch does
//! ([`plan_direction`]); when timing fails or nothing qualifies, a fixed algorithm runs
//! with the mode's math type. All plans share one workspace, grown to the largest need.
//! Everything runs on the GPU's stream; the handle is used under a mutex.
use std::collections::HashMap;
use std::ffi::c_void;
use std::str::FromStr;

use cudarc::cudnn::{result as dnn, sys};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

use crate::backend::ConvShape;
use crate::cuda::Gpu;
use crate::error::{CudaResultExt, Error, Result};

/// How the CUDA backend computes convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ConvBackend {
    /// cuDNN when libcudnn loads, else im2col ([`Cuda::conv_fallback`](super::Cuda::conv_fallback)
    /// says why).
    Auto,
    /// cuDNN; an error when libcudnn cannot be loaded.
    Cudnn,
    /// im2col + cuBLAS SGEMM: the default until the cuDNN path has passed the GPU suite,
    /// then the fallback and a second reference.
    #[default]
    Im2col,
}

impl std::fmt::Display for ConvBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConvBackend::Auto => "auto",
            ConvBackend::Cudnn => "cudnn",
            ConvBackend::Im2col => "im2col",
        })
    }
}

impl FromStr for ConvBackend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(ConvBackend::Auto),
            "cudnn" => Ok(ConvBackend::Cudnn),
            "im2col" => Ok(ConvBackend::Im2col),
            _ => Err(Error::invalid(format!(
                "unknown convolution backend {s:?}: auto, cudnn or im2col"
            ))),
        }
    }
}

serde_via_str!(ConvBackend);

fn dnn_err(call: &'static str) -> impl Fn(dnn::CudnnError) -> Error {
    move |e| Error::Cudnn {
        call,
        message: format!("{:?}", e.0),
    }
}

fn c_int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::invalid(format!("{what} = {v} exceeds cuDNN's 32-bit dimensions")))
}

/// True when libcudnn can be loaded (never panics, unlike a first cudarc cuDNN call
/// without the library).
pub fn cudnn_present() -> bool {
    // SAFETY: only tries to dlopen libcudnn and drops the handle.
    unsafe { sys::is_culib_present() }
}

/// The loadable cuDNN's version as `major.minor.patch` (cuDNN 9 encodes it as
/// `major * 10000 + minor * 100 + patch`), or `None` when libcudnn cannot be loaded.
pub fn cudnn_version() -> Option<String> {
    cudnn_present().then(|| version_string(dnn::get_version()))
}

fn version_string(v: usize) -> String {
    format!("{}.{}.{}", v / 10000, v % 10000 / 100, v % 100)
}

struct Handle(sys::cudnnHandle_t);
struct TensorDesc(sys::cudnnTensorDescriptor_t);
struct FilterDesc(sys::cudnnFilterDescriptor_t);
struct ConvDesc(sys::cudnnConvolutionDescriptor_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreate and destroyed once; an error here cannot be acted
        // on, so it is ignored rather than panicking in drop.
        let _ = unsafe { dnn::destroy_handle(self.0) };
    }
}
impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateTensorDescriptor, destroyed once.
        let _ = unsafe { dnn::destroy_tensor_descriptor(self.0) };
    }
}
impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateFilterDescriptor, destroyed once.
        let _ = unsafe { dnn::destroy_filter_descriptor(self.0) };
    }
}
impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateConvolutionDescriptor, destroyed once.
        let _ = unsafe { dnn::destroy_convolution_descriptor(self.0) };
    }
}

fn nchw(n: usize, c: usize, h: usize, w: usize) -> Result<TensorDesc> {
    let d = TensorDesc(
        dnn::create_tensor_descriptor().map_err(dnn_err("cudnnCreateTensorDescriptor"))?,
    );
    // SAFETY: a freshly created descriptor, set to a dense NCHW f32 layout.
    unsafe {
        dnn::set_tensor4d_descriptor(
            d.0,
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            [
                c_int(n, "n")?,
                c_int(c, "c")?,
                c_int(h, "h")?,
                c_int(w, "w")?,
            ],
        )
    }
    .map_err(dnn_err("cudnnSetTensor4dDescriptor"))?;
    Ok(d)
}

/// The alignment, in bytes, that every cuDNN operand gets: some cuDNN 9 engines need
/// 16-byte aligned tensors and reject others with `CUDNN_STATUS_BAD_PARAM` (or are not
/// offered). Allocations are 256-byte aligned; a parameter at an f32 offset that is not a
/// multiple of 4 is not.
pub(crate) const CUDNN_ALIGN: u64 = 16;

/// True when a device address meets [`CUDNN_ALIGN`].
pub(crate) fn cudnn_aligned(addr: u64) -> bool {
    addr.is_multiple_of(CUDNN_ALIGN)
}

/// True when f32 element `off` of an aligned allocation meets [`CUDNN_ALIGN`].
#[cfg(test)]
pub(crate) fn f32_offset_aligned(off: usize) -> bool {
    cudnn_aligned(off as u64 * std::mem::size_of::<f32>() as u64)
}

/// The math the convolutions may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MathMode {
    /// Real fp32: only `CUDNN_FMA_MATH` results (PyTorch with TF32 off).
    Fp32,
    /// `--tf32`: tensor cores allowed; the descriptor searches with `CUDNN_DEFAULT_MATH`
    /// and runs with the picked result's math type.
    Tf32,
}

impl MathMode {
    /// The mode of a backend with TF32 on (`tf32`) or off.
    pub(crate) fn new(tf32: bool) -> MathMode {
        if tf32 {
            MathMode::Tf32
        } else {
            MathMode::Fp32
        }
    }

    /// The math type a descriptor searches with, and runs with when no timed result is
    /// taken (the fallback algorithm).
    pub(crate) fn search_math(self) -> sys::cudnnMathType_t {
        match self {
            MathMode::Fp32 => sys::cudnnMathType_t::CUDNN_FMA_MATH,
            MathMode::Tf32 => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
        }
    }
}

/// One timed result of a `cudnnFind*` search, whichever the direction (`A`, its algorithm
/// enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate<A> {
    pub algo: A,
    pub ok: bool,
    pub deterministic: bool,
    pub math: sys::cudnnMathType_t,
    /// Workspace bytes.
    pub memory: usize,
}

/// The timed results of one direction as [`Candidate`]s: the first `count` of `perf`
/// (clamped to `0..=perf.len()`).
macro_rules! candidates {
    ($perf:expr, $count:expr) => {
        $perf[..($count.max(0) as usize).min($perf.len())]
            .iter()
            .map(|p| Candidate {
                algo: p.algo,
                ok: p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS,
                deterministic: p.determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC,
                math: p.mathType,
                memory: p.memory,
            })
            .collect::<Vec<_>>()
    };
}

/// The result to run: the first (cuDNN sorts them fastest first) that succeeded and is
/// deterministic; in [`MathMode::Fp32`] also one that reports `CUDNN_FMA_MATH` (a
/// `CUDNN_DEFAULT_MATH` or tensor-op result may use tensor cores).
pub(crate) fn choose<A: Copy>(results: &[Candidate<A>], mode: MathMode) -> Option<Candidate<A>> {
    results
        .iter()
        .find(|c| {
            c.ok && c.deterministic
                && (mode == MathMode::Tf32 || c.math == sys::cudnnMathType_t::CUDNN_FMA_MATH)
        })
        .copied()
}

/// What one direction runs: an algorithm, the math type its descriptor carries, and the
/// workspace the timed result reported (0 for the fallback: queried afterwards).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DirectionPlan<A> {
    pub algo: A,
    pub math: sys::cudnnMathType_t,
    pub memory: usize,
}

/// The plan of one direction from its search: the [`choose`]n result with its own math
/// type, or, when the search failed (`searched` false) or nothing qualifies, `fallback`
/// with the mode's [`MathMode::search_math`].
pub(crate) fn plan_direction<A: Copy>(
    searched: bool,
    results: &[Candidate<A>],
    mode: MathMode,
    fallback: A,
) -> DirectionPlan<A> {
    match choose(results, mode).filter(|_| searched) {
        Some(c) => DirectionPlan {
            algo: c.algo,
            math: c.math,
            memory: c.memory,
        },
        None => DirectionPlan {
            algo: fallback,
            math: mode.search_math(),
            memory: 0,
        },
    }
}

/// A convolution descriptor for `s` (a cross-correlation, PyTorch's, in f32) with `math`.
fn conv_desc(s: &ConvShape, math: sys::cudnnMathType_t) -> Result<ConvDesc> {
    let (pad, stride) = (c_int(s.pad, "pad")?, c_int(s.stride, "stride")?);
    let conv = ConvDesc(
        dnn::create_convolution_descriptor()
            .map_err(dnn_err("cudnnCreateConvolutionDescriptor"))?,
    );
    // SAFETY: a fresh descriptor, set to the shape's padding and stride.
    unsafe {
        dnn::set_convolution2d_descriptor(
            conv.0,
            pad,
            pad,
            stride,
            stride,
            1,
            1,
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        )
    }
    .map_err(dnn_err("cudnnSetConvolution2dDescriptor"))?;
    set_math(&conv, math)?;
    Ok(conv)
}

fn set_math(conv: &ConvDesc, math: sys::cudnnMathType_t) -> Result<()> {
    // SAFETY: a valid convolution descriptor; the math type is a valid enum value.
    unsafe { dnn::set_convolution_math_type(conv.0, math) }
        .map_err(dnn_err("cudnnSetConvolutionMathType"))
}

/// The descriptors and algorithms of one convolution shape: one convolution descriptor
/// per direction, each with the math type of its own pick.
struct Plan {
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    conv_fwd: ConvDesc,
    conv_bwd_data: ConvDesc,
    conv_bwd_filter: ConvDesc,
    fwd: sys::cudnnConvolutionFwdAlgo_t,
    bwd_data: sys::cudnnConvolutionBwdDataAlgo_t,
    bwd_filter: sys::cudnnConvolutionBwdFilterAlgo_t,
    /// The largest workspace of the three, in bytes.
    workspace: usize,
}

impl Plan {
    fn new(h: &Handle, s: &ConvShape, mode: MathMode) -> Result<Plan> {
        let x = nchw(s.n, s.cin, s.h, s.w)?;
        let y = nchw(s.n, s.cout, s.ho, s.wo)?;
        let w = FilterDesc(
            dnn::create_filter_descriptor().map_err(dnn_err("cudnnCreateFilterDescriptor"))?,
        );
        let k = c_int(s.k, "k")?;
        // SAFETY: a fresh descriptor, set to the filter's dense layout.
        unsafe {
            dnn::set_filter4d_descriptor(
                w.0,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                [c_int(s.cout, "cout")?, c_int(s.cin, "cin")?, k, k],
            )
        }
        .map_err(dnn_err("cudnnSetFilter4dDescriptor"))?;
        // One descriptor per direction, searched with the mode's math type, then set to
        // the math type of the result that direction runs.
        let conv_fwd = conv_desc(s, mode.search_math())?;
        let conv_bwd_data = conv_desc(s, mode.search_math())?;
        let conv_bwd_filter = conv_desc(s, mode.search_math())?;

        const N: usize = 16;
        let mut count = 0i32;
        // SAFETY: a perf struct is plain C data (enums, numbers); all-zero is a valid value.
        let mut fp: [sys::cudnnConvolutionFwdAlgoPerf_t; N] = unsafe { std::mem::zeroed() };
        // SAFETY: the handle and descriptors are valid; the perf array holds N entries and
        // cuDNN writes at most `requested = N` of them, and one int to `count`.
        let found = unsafe {
            sys::cudnnFindConvolutionForwardAlgorithm(
                h.0,
                x.0,
                w.0,
                conv_fwd.0,
                y.0,
                N as i32,
                &mut count,
                fp.as_mut_ptr(),
            )
        };
        let fwd = plan_direction(
            found.result().is_ok(),
            &candidates!(fp, count),
            mode,
            sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        );
        set_math(&conv_fwd, fwd.math)?;
        count = 0;
        // SAFETY: as above.
        let mut bp: [sys::cudnnConvolutionBwdDataAlgoPerf_t; N] = unsafe { std::mem::zeroed() };
        // SAFETY: as for the forward search.
        let found = unsafe {
            sys::cudnnFindConvolutionBackwardDataAlgorithm(
                h.0,
                w.0,
                y.0,
                conv_bwd_data.0,
                x.0,
                N as i32,
                &mut count,
                bp.as_mut_ptr(),
            )
        };
        let bwd_data = plan_direction(
            found.result().is_ok(),
            &candidates!(bp, count),
            mode,
            sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
        );
        set_math(&conv_bwd_data, bwd_data.math)?;
        count = 0;
        // SAFETY: as above.
        let mut wp: [sys::cudnnConvolutionBwdFilterAlgoPerf_t; N] = unsafe { std::mem::zeroed() };
        // SAFETY: as for the forward search.
        let found = unsafe {
            sys::cudnnFindConvolutionBackwardFilterAlgorithm(
                h.0,
                x.0,
                y.0,
                conv_bwd_filter.0,
                w.0,
                N as i32,
                &mut count,
                wp.as_mut_ptr(),
            )
        };
        let bwd_filter = plan_direction(
            found.result().is_ok(),
            &candidates!(wp, count),
            mode,
            sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
        );
        set_math(&conv_bwd_filter, bwd_filter.math)?;
        // The fallbacks' workspace sizes (a timed pick reports its own), each with its
        // direction's descriptor and final math type.
        let mut ws = [fwd.memory, bwd_data.memory, bwd_filter.memory];
        // SAFETY: valid handle and descriptors; each call writes one usize.
        unsafe {
            ws[0] = ws[0].max(
                dnn::get_convolution_forward_workspace_size(
                    h.0, x.0, w.0, conv_fwd.0, y.0, fwd.algo,
                )
                .map_err(dnn_err("cudnnGetConvolutionForwardWorkspaceSize"))?,
            );
            ws[1] = ws[1].max(
                dnn::get_convolution_backward_data_workspace_size(
                    h.0,
                    w.0,
                    y.0,
                    conv_bwd_data.0,
                    x.0,
                    bwd_data.algo,
                )
                .map_err(dnn_err("cudnnGetConvolutionBackwardDataWorkspaceSize"))?,
            );
            ws[2] = ws[2].max(
                dnn::get_convolution_backward_filter_workspace_size(
                    h.0,
                    x.0,
                    y.0,
                    conv_bwd_filter.0,
                    w.0,
                    bwd_filter.algo,
                )
                .map_err(dnn_err("cudnnGetConvolutionBackwardFilterWorkspaceSize"))?,
            );
        }
        Ok(Plan {
            x,
            w,
            y,
            conv_fwd,
            conv_bwd_data,
            conv_bwd_filter,
            fwd: fwd.algo,
            bwd_data: bwd_data.algo,
            bwd_filter: bwd_filter.algo,
            workspace: ws.into_iter().max().unwrap_or(0),
        })
    }
}

/// cuDNN on one GPU: the handle (bound to the GPU's stream), the plans by shape, and the
/// shared workspace.
pub(crate) struct Cudnn {
    /// TF32 tensor cores allowed (`--tf32`), else real fp32.
    mode: MathMode,
    handle: Handle,
    plans: HashMap<ConvShape, Plan>,
    workspace: Option<CudaSlice<u8>>,
    /// Last, so that the handle, the descriptors and the workspace go before the GPU's
    /// stream and context can (fields drop in order).
    gpu: Gpu,
}

// SAFETY: the raw handle and descriptors are only used by the thread holding the mutex
// around `Cudnn` (the Cuda backend's), with the GPU's context bound to that thread first;
// cuDNN handles may be used from any thread one at a time.
unsafe impl Send for Cudnn {}

impl Cudnn {
    /// Loads cuDNN and creates a handle on `gpu`'s stream.
    pub fn new(gpu: &Gpu, tf32: bool) -> Result<Cudnn> {
        if !cudnn_present() {
            return Err(Error::Cudnn {
                call: "dlopen(libcudnn)",
                message: "cuDNN 9 not found; add its lib directory (e.g. site-packages/nvidia/cudnn/lib) to LD_LIBRARY_PATH, or use --conv im2col".into(),
            });
        }
        gpu.context().bind_to_thread().call("cuCtxSetCurrent")?;
        let handle = Handle(dnn::create_handle().map_err(dnn_err("cudnnCreate"))?);
        // SAFETY: a valid handle and the GPU's live stream.
        unsafe { dnn::set_stream(handle.0, gpu.stream().cu_stream() as _) }
            .map_err(dnn_err("cudnnSetStream"))?;
        let c = Cudnn {
            mode: MathMode::new(tf32),
            handle,
            plans: HashMap::new(),
            workspace: None,
            gpu: gpu.clone(),
        };
        // One tiny plan now, so that a cuDNN that loads but cannot plan (a missing
        // sub-library, no usable algorithm) fails here, where `auto` can still fall back.
        let probe = ConvShape::new(1, 1, (3, 3), 1, 3, 1, 1)?;
        Plan::new(&c.handle, &probe, c.mode)?;
        Ok(c)
    }

    /// The cuDNN version the library reports (e.g. 91002 for 9.10.2).
    pub fn version() -> usize {
        dnn::get_version()
    }

    /// The plan of `s` and a workspace of its size, creating both on first use.
    fn prepare(&mut self, s: &ConvShape) -> Result<(&Plan, Option<&mut CudaSlice<u8>>)> {
        self.gpu
            .context()
            .bind_to_thread()
            .call("cuCtxSetCurrent")?;
        if !self.plans.contains_key(s) {
            let plan = Plan::new(&self.handle, s, self.mode)?;
            self.plans.insert(*s, plan);
        }
        let plan = &self.plans[s];
        if plan.workspace > self.workspace.as_ref().map_or(0, |w| w.len()) {
            self.workspace = None; // free the old one first
            self.workspace = Some(self.gpu.zeros::<u8>(plan.workspace)?);
        }
        let ws = self.workspace.as_mut().filter(|_| plan.workspace > 0);
        Ok((plan, ws))
    }

    /// `y = conv(x, w)`; the views were checked against `s` by the caller.
    pub fn forward(
        &mut self,
        s: &ConvShape,
        x: &CudaView<'_, f32>,
        w: &CudaView<'_, f32>,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let stream = self.gpu.stream().clone();
        let handle = self.handle.0;
        let (plan, ws) = self.prepare(s)?;
        let (xp, _gx) = x.device_ptr(&stream);
        let (wp, _gw) = w.device_ptr(&stream);
        let (yp, _gy) = y.device_ptr_mut(&stream);
        let (wsp, ws_len, _gws) = match ws {
            Some(b) => {
                let len = b.len();
                let (p, g) = b.device_ptr_mut(&stream);
                (p, len, Some(g))
            }
            None => (0, 0, None),
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the descriptors describe exactly the views' layouts (checked by the
        // caller against `s`), the workspace holds `ws_len` bytes, alpha and beta are host
        // f32 scalars; everything is on the handle's stream.
        unsafe {
            dnn::convolution_forward(
                handle,
                &alpha as *const f32 as *const c_void,
                plan.x.0,
                xp as *const c_void,
                plan.w.0,
                wp as *const c_void,
                plan.conv_fwd.0,
                plan.fwd,
                wsp as *mut c_void,
                ws_len,
                &beta as *const f32 as *const c_void,
                plan.y.0,
                yp as *mut c_void,
            )
        }
        .map_err(dnn_err("cudnnConvolutionForward"))
    }

    /// `dx = dL/dx` (overwritten) when `dx` is given, and `dw += dL/dw`.
    pub fn backward(
        &mut self,
        s: &ConvShape,
        x: &CudaView<'_, f32>,
        w: &CudaView<'_, f32>,
        dy: &CudaView<'_, f32>,
        dx: Option<&mut CudaViewMut<'_, f32>>,
        dw: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let stream = self.gpu.stream().clone();
        let handle = self.handle.0;
        let (plan, ws) = self.prepare(s)?;
        let (xp, _gx) = x.device_ptr(&stream);
        let (wp, _gw) = w.device_ptr(&stream);
        let (dyp, _gdy) = dy.device_ptr(&stream);
        let (dwp, _gdw) = dw.device_ptr_mut(&stream);
        let (wsp, ws_len, _gws) = match ws {
            Some(b) => {
                let len = b.len();
                let (p, g) = b.device_ptr_mut(&stream);
                (p, len, Some(g))
            }
            None => (0, 0, None),
        };
        let (one, zero) = (1.0f32, 0.0f32);
        if let Some(dx) = dx {
            let (dxp, _gdx) = dx.device_ptr_mut(&stream);
            // SAFETY: as in `forward`; dx is overwritten (beta 0).
            unsafe {
                dnn::convolution_backward_data(
                    handle,
                    &one as *const f32 as *const c_void,
                    plan.w.0,
                    wp as *const c_void,
                    plan.y.0,
                    dyp as *const c_void,
                    plan.conv_bwd_data.0,
                    plan.bwd_data,
                    wsp as *mut c_void,
                    ws_len,
                    &zero as *const f32 as *const c_void,
                    plan.x.0,
                    dxp as *mut c_void,
                )
            }
            .map_err(dnn_err("cudnnConvolutionBackwardData"))?;
        }
        // SAFETY: as in `forward`; dw accumulates (beta 1), as every backend's gradients do.
        unsafe {
            dnn::convolution_backward_filter(
                handle,
                &one as *const f32 as *const c_void,
                plan.x.0,
                xp as *const c_void,
                plan.y.0,
                dyp as *const c_void,
                plan.conv_bwd_filter.0,
                plan.bwd_filter,
                wsp as *mut c_void,
                ws_len,
                &one as *const f32 as *const c_void,
                plan.w.0,
                dwp as *mut c_void,
            )
        }
        .map_err(dnn_err("cudnnConvolutionBackwardFilter"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sys::cudnnMathType_t::{CUDNN_DEFAULT_MATH, CUDNN_FMA_MATH, CUDNN_TENSOR_OP_MATH};

    fn c(algo: u8, math: sys::cudnnMathType_t) -> Candidate<u8> {
        Candidate {
            algo,
            ok: true,
            deterministic: true,
            math,
            memory: 100 + algo as usize,
        }
    }

    #[test]
    fn fp32_takes_only_fma_results() {
        // Fastest first: a tensor-core DEFAULT_MATH variant and a TENSOR_OP one are faster.
        let r = [
            c(1, CUDNN_DEFAULT_MATH),
            c(2, CUDNN_TENSOR_OP_MATH),
            c(3, CUDNN_FMA_MATH),
        ];
        assert_eq!(choose(&r, MathMode::Fp32).map(|c| c.algo), Some(3));
        let p = plan_direction(true, &r, MathMode::Fp32, 9);
        assert_eq!((p.algo, p.math, p.memory), (3, CUDNN_FMA_MATH, 103));
        // No FMA result: the fallback with FMA math, never a tensor-core result.
        let p = plan_direction(true, &r[..2], MathMode::Fp32, 9);
        assert_eq!((p.algo, p.math, p.memory), (9, CUDNN_FMA_MATH, 0));
    }

    #[test]
    fn tf32_takes_the_fastest_and_its_math_type() {
        let r = [
            c(1, CUDNN_TENSOR_OP_MATH),
            c(2, CUDNN_DEFAULT_MATH),
            c(3, CUDNN_FMA_MATH),
        ];
        let p = plan_direction(true, &r, MathMode::Tf32, 9);
        assert_eq!((p.algo, p.math), (1, CUDNN_TENSOR_OP_MATH));
        let p = plan_direction(true, &r[1..], MathMode::Tf32, 9);
        assert_eq!((p.algo, p.math), (2, CUDNN_DEFAULT_MATH));
        let p = plan_direction(true, &r[2..], MathMode::Tf32, 9);
        assert_eq!((p.algo, p.math), (3, CUDNN_FMA_MATH));
        // Nothing timed: the fallback searches' math type, DEFAULT (tensor cores allowed).
        let p = plan_direction(true, &[], MathMode::Tf32, 9);
        assert_eq!((p.algo, p.math), (9, CUDNN_DEFAULT_MATH));
    }

    #[test]
    fn failed_and_nondeterministic_results_are_skipped() {
        let mut failed = c(1, CUDNN_FMA_MATH);
        failed.ok = false;
        let mut racy = c(2, CUDNN_FMA_MATH);
        racy.deterministic = false;
        let r = [failed, racy, c(3, CUDNN_FMA_MATH)];
        for mode in [MathMode::Fp32, MathMode::Tf32] {
            assert_eq!(plan_direction(true, &r, mode, 9).algo, 3);
            assert_eq!(plan_direction(true, &r[..2], mode, 9).algo, 9);
        }
        // A failed search: the fallback whatever the array holds.
        let p = plan_direction(false, &r, MathMode::Fp32, 9);
        assert_eq!((p.algo, p.math), (9, CUDNN_FMA_MATH));
    }

    #[test]
    fn alignment_predicates() {
        assert!(cudnn_aligned(0));
        assert!(cudnn_aligned(0x7f00_0000_0100));
        assert!(!cudnn_aligned(0x7f00_0000_0100 + 12));
        assert!(cudnn_aligned(0x7f00_0000_0100 + 16));
        assert!(!cudnn_aligned(0x7f00_0000_0100 + 8));
        for (off, ok) in [
            (0, true),
            (1, false),
            (2, false),
            (3, false),
            (4, true),
            (6, false),
            (8, true),
            (1732, true),
        ] {
            assert_eq!(f32_offset_aligned(off), ok, "offset {off}");
        }
    }

    /// The networks place every convolution weight (and so its gradient) at an aligned
    /// offset: training never takes the staging copy; only the layer tests' odd offsets do.
    #[test]
    fn network_convolution_weights_are_aligned() {
        use crate::backend::Cpu;
        use crate::model::{Arch, Encoder, EncoderConfig};
        for arch in [
            Arch::Resnet8,
            Arch::Resnet20,
            Arch::Resnet18Cifar,
            Arch::Resnet18,
        ] {
            for (in_channels, mlp) in [(1, false), (3, true), (3, false)] {
                let cfg = EncoderConfig {
                    arch,
                    in_channels,
                    dim: 128,
                    mlp,
                };
                let e = Encoder::new(Cpu::<f32>::new(), cfg, 0).unwrap();
                assert!(e.table().params().filter(|p| p.shape.len() == 4).count() >= 7);
                for p in e.table().params().filter(|p| p.shape.len() == 4) {
                    assert!(
                        f32_offset_aligned(p.offset),
                        "{arch} {in_channels} {}: offset {}",
                        p.name,
                        p.offset
                    );
                }
            }
        }
    }

    #[test]
    fn cudnn_versions_read_as_major_minor_patch() {
        assert_eq!(version_string(91002), "9.10.2");
        assert_eq!(version_string(90100), "9.1.0");
    }

    #[test]
    fn modes_search_with_their_math_type() {
        assert_eq!(MathMode::new(false), MathMode::Fp32);
        assert_eq!(MathMode::new(true), MathMode::Tf32);
        assert_eq!(MathMode::Fp32.search_math(), CUDNN_FMA_MATH);
        assert_eq!(MathMode::Tf32.search_math(), CUDNN_DEFAULT_MATH);
    }

    #[test]
    fn candidates_take_the_reported_count_only() {
        // SAFETY: plain C data; all-zero is a valid perf struct.
        let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; 3] = unsafe { std::mem::zeroed() };
        for (i, p) in perf.iter_mut().enumerate() {
            p.status = sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS;
            p.determinism = sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC;
            p.mathType = CUDNN_FMA_MATH;
            p.memory = i;
        }
        assert_eq!(candidates!(perf, 2i32).len(), 2);
        assert_eq!(candidates!(perf, -1i32).len(), 0);
        assert_eq!(candidates!(perf, 7i32).len(), 3);
        assert!(candidates!(perf, 3i32)
            .iter()
            .all(|c| c.ok && c.deterministic));
    }
}
