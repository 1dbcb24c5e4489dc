//! The CPU backend: direct AVX-512/AVX2 convolutions where they pay (`direct`), im2col + a
//! tuned GEMM (the `gemm` crate) for the rest and for f64, rayon over independent outputs,
//! f64 accumulation for statistics.
//!
//! Generic over the scalar ([`Scalar`]: f32 for training, f64 for finite-difference
//! gradient checks). Deterministic whatever the thread count: work is split into chunks
//! whose boundaries depend only on the shapes, every reduction runs over those chunks in a
//! fixed order, and each GEMM call is single-threaded.
//!
//! Layout: `gemm` (the scalar type and the strided GEMM), `conv` (im2col/col2im
//! convolutions and the dispatch), `direct` (the direct f32 kernels), `norm` (BatchNorm), `layers` (ReLU, add, pooling, linear), `optim` (SGD).
//! The [`Backend`] implementation here delegates each operation to its module.
use std::marker::PhantomData;

use super::{check_len, Backend, BnOffsets, BnParams, BnShape, ConvShape, LinearShape, PoolShape};
use crate::error::Result;
use crate::ops::{self, ContrastShape, InfoNceImpl, InfoNceStats};
use rayon::prelude::*;

/// Defines `fn $name` over `Scalar` slices whose body is compiled three times: with
/// AVX-512, with AVX2 + FMA, and for the baseline x86-64 (or other) target, the widest the
/// CPU has chosen at run time ([`direct::simd_level`]). The crate is built for the
/// baseline, so without this the plane loops of BatchNorm ran two f64 lanes wide. The
/// versions compute the same IEEE operations in the same order (Rust never contracts
/// `a * b + c` into an FMA), so their results are identical.
macro_rules! multiversion {
    (
        $(#[$m:meta])*
        $vis:vis fn $name:ident<T: Scalar>($($a:ident: $t:ty),* $(,)?) -> $r:ty $body:block
    ) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<T: Scalar>($($a: $t),*) -> $r {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<T: Scalar>($($a: $t),*) -> $r $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v512<T: Scalar>($($a: $t),*) -> $r {
                    body($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v256<T: Scalar>($($a: $t),*) -> $r {
                    body($($a),*)
                }
                match $crate::backend::cpu::direct::simd_level() {
                    // SAFETY: simd_level detected AVX-512F on this CPU at run time.
                    Some($crate::backend::cpu::direct::Isa::Avx512) => return unsafe { v512($($a),*) },
                    // SAFETY: simd_level detected AVX2 and FMA on this CPU at run time.
                    Some($crate::backend::cpu::direct::Isa::Avx2) => return unsafe { v256($($a),*) },
                    None => {}
                }
            }
            body($($a),*)
        }
    };
}

mod conv;
mod direct;
pub(crate) mod gemm;
mod layers;
mod norm;
mod optim;
pub mod profile;

pub(crate) use gemm::gemm;
pub use gemm::Scalar;
pub(crate) use optim::check_sgd;

/// Elements per work item of the elementwise operations.
const ELEM_CHUNK: usize = 1 << 15;
/// Rows (samples) per work item of the linear layer.
const LINEAR_ROWS: usize = 16;
/// Output features per work item of the linear layer's weight gradient.
const LINEAR_OUT_COLS: usize = 32;
/// Columns (samples x output pixels) one convolution GEMM aims for: small feature maps
/// put several samples side by side so the weight is packed once for all of them.
const CONV_TARGET_COLS: usize = 256;
/// Work items a convolution is split into at least, when the batch allows.
const CONV_MIN_ITEMS: usize = 8;
/// At most this many weight-gradient partials per convolution (summed in order).
const CONV_MAX_PARTIALS: usize = 16;
/// At least this many samples per weight-gradient partial.
const CONV_MIN_CHUNK: usize = 4;

/// The CPU backend over scalar `T` (use `Cpu::<f32>::new()` for training).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu<T: Scalar = f32> {
    _t: PhantomData<T>,
}

impl<T: Scalar> Cpu<T> {
    /// The backend (stateless; runs on rayon's current thread pool).
    pub fn new() -> Self {
        Cpu { _t: PhantomData }
    }
}

impl<T: Scalar> Backend for Cpu<T> {
    type Buf = Vec<T>;
    type Idx = Vec<u32>;

    fn name(&self) -> String {
        format!("cpu-{}", T::NAME)
    }

    fn zeros(&self, n: usize) -> Result<Vec<T>> {
        let _p = profile::scope(|| "zeros (alloc)".into());
        Ok(vec![T::ZERO; n])
    }

    fn zeros_idx(&self, n: usize) -> Result<Vec<u32>> {
        Ok(vec![0; n])
    }

    fn upload_f32(&self, host: &[f32]) -> Result<Vec<T>> {
        let _p = profile::scope(|| "upload".into());
        Ok(host.iter().map(|&v| T::from_f64(v as f64)).collect())
    }

    fn download_f32(&self, buf: &Vec<T>) -> Result<Vec<f32>> {
        Ok(buf.iter().map(|v| v.to_f64() as f32).collect())
    }

    fn write_f32(&self, buf: &mut Vec<T>, off: usize, src: &[f32]) -> Result<()> {
        check_len("write_f32", buf.len(), off, src.len())?;
        for (d, &s) in buf[off..off + src.len()].iter_mut().zip(src) {
            *d = T::from_f64(s as f64);
        }
        Ok(())
    }

    fn upload_f64(&self, host: &[f64]) -> Result<Vec<T>> {
        Ok(host.iter().map(|&v| T::from_f64(v)).collect())
    }

    fn download_f64(&self, buf: &Vec<T>) -> Result<Vec<f64>> {
        Ok(buf.iter().map(|v| v.to_f64()).collect())
    }

    fn len(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }

    fn fill_zero(&self, buf: &mut Vec<T>) -> Result<()> {
        let _p = profile::scope(|| "fill_zero".into());
        buf.par_chunks_mut(ELEM_CHUNK).for_each(|c| c.fill(T::ZERO));
        Ok(())
    }

    fn copy(&self, buf: &Vec<T>) -> Result<Vec<T>> {
        let _p = profile::scope(|| "copy".into());
        Ok(buf.clone())
    }

    fn copy_into(&self, src: &Vec<T>, dst: &mut Vec<T>) -> Result<()> {
        let _p = profile::scope(|| "copy".into());
        super::check_copy_len(src.len(), dst.len())?;
        dst.par_chunks_mut(ELEM_CHUNK)
            .zip(src.par_chunks(ELEM_CHUNK))
            .for_each(|(d, s)| d.copy_from_slice(s));
        Ok(())
    }

    /// Leaves the buffer as it is: every CPU operation writes all of the outputs it is
    /// given without reading them (tested with NaN-filled outputs in
    /// `tests/resnet_layers.rs`), so a reused buffer needs no zeroing.
    fn reuse(&self, _buf: &mut Vec<T>) -> Result<()> {
        Ok(())
    }

    fn conv2d_forward(
        &self,
        s: &ConvShape,
        x: &Vec<T>,
        w: &Vec<T>,
        w_off: usize,
        y: &mut Vec<T>,
    ) -> Result<()> {
        let _p = profile::scope(|| {
            format!(
                "conv{}x{}s{} fwd {}->{} {}x{}",
                s.k, s.k, s.stride, s.cin, s.cout, s.h, s.w
            )
        });
        self.conv2d_forward_impl(s, x, w, w_off, y)
    }

    fn conv2d_backward(
        &self,
        s: &ConvShape,
        x: &Vec<T>,
        w: &Vec<T>,
        w_off: usize,
        dy: &Vec<T>,
        dx: Option<&mut Vec<T>>,
        dw: &mut Vec<T>,
        dw_off: usize,
    ) -> Result<()> {
        let _p = profile::scope(|| {
            format!(
                "conv{}x{}s{} bwd{} {}->{} {}x{}",
                s.k,
                s.k,
                s.stride,
                if dx.is_some() { "" } else { " (no dx)" },
                s.cin,
                s.cout,
                s.h,
                s.w
            )
        });
        self.conv2d_backward_impl(s, x, w, w_off, dy, dx.map(|d| d.as_mut_slice()), dw, dw_off)
    }

    fn bn_forward_train(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &Vec<T>,
        params: &Vec<T>,
        off: BnOffsets,
        running: &mut Vec<T>,
        y: &mut Vec<T>,
        mean: &mut Vec<T>,
        invstd: &mut Vec<T>,
    ) -> Result<()> {
        let _p = profile::scope(|| format!("bn train fwd c{} hw{}", s.c, s.hw));
        self.bn_forward_train_fused_impl(
            s, hp, x, params, off, running, None, false, y, mean, invstd,
        )
    }

    fn bn_forward_train_fused(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &Vec<T>,
        params: &Vec<T>,
        off: BnOffsets,
        running: &mut Vec<T>,
        residual: Option<&Vec<T>>,
        relu: bool,
        y: &mut Vec<T>,
        mean: &mut Vec<T>,
        invstd: &mut Vec<T>,
    ) -> Result<()> {
        let _p = profile::scope(|| {
            let r = if residual.is_some() { "+add" } else { "" };
            let a = if relu { "+relu" } else { "" };
            format!("bn train fwd{r}{a} c{} hw{}", s.c, s.hw)
        });
        let residual = residual.map(|r| r.as_slice());
        self.bn_forward_train_fused_impl(
            s, hp, x, params, off, running, residual, relu, y, mean, invstd,
        )
    }

    fn relu_bn_backward_train(
        &self,
        s: &BnShape,
        x: &Vec<T>,
        params: &Vec<T>,
        off: BnOffsets,
        mean: &Vec<T>,
        invstd: &Vec<T>,
        relu_out: &Vec<T>,
        dy: &Vec<T>,
        dx: &mut Vec<T>,
        grads: &mut Vec<T>,
    ) -> Result<()> {
        let _p = profile::scope(|| format!("relu+bn train bwd c{} hw{}", s.c, s.hw));
        self.relu_bn_backward_train_impl(
            s,
            x,
            params,
            off,
            mean,
            invstd,
            Some(relu_out),
            dy,
            dx,
            grads,
        )
    }

    fn bn_forward_eval(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &Vec<T>,
        params: &Vec<T>,
        off: BnOffsets,
        running: &Vec<T>,
        y: &mut Vec<T>,
    ) -> Result<()> {
        let _p = profile::scope(|| format!("bn eval fwd c{} hw{}", s.c, s.hw));
        self.bn_forward_eval_impl(s, hp, x, params, off, running, y)
    }

    fn bn_backward_train(
        &self,
        s: &BnShape,
        x: &Vec<T>,
        params: &Vec<T>,
        off: BnOffsets,
        mean: &Vec<T>,
        invstd: &Vec<T>,
        dy: &Vec<T>,
        dx: &mut Vec<T>,
        grads: &mut Vec<T>,
    ) -> Result<()> {
        let _p = profile::scope(|| format!("bn train bwd c{} hw{}", s.c, s.hw));
        self.relu_bn_backward_train_impl(s, x, params, off, mean, invstd, None, dy, dx, grads)
    }

    fn bn_backward_eval(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &Vec<T>,
        params: &Vec<T>,
        off: BnOffsets,
        running: &Vec<T>,
        dy: &Vec<T>,
        dx: &mut Vec<T>,
        grads: &mut Vec<T>,
    ) -> Result<()> {
        let _p = profile::scope(|| format!("bn eval bwd c{} hw{}", s.c, s.hw));
        self.bn_backward_eval_impl(s, hp, x, params, off, running, dy, dx, grads)
    }

    fn relu_forward(&self, x: &mut Vec<T>) -> Result<()> {
        let _p = profile::scope(|| "relu fwd".into());
        self.relu_forward_impl(x)
    }

    fn relu_backward(&self, y: &Vec<T>, dy: &mut Vec<T>) -> Result<()> {
        let _p = profile::scope(|| "relu bwd".into());
        self.relu_backward_impl(y, dy)
    }

    fn add_assign(&self, a: &mut Vec<T>, b: &Vec<T>) -> Result<()> {
        let _p = profile::scope(|| "add".into());
        self.add_assign_impl(a, b)
    }

    fn maxpool_forward(
        &self,
        s: &PoolShape,
        x: &Vec<T>,
        y: &mut Vec<T>,
        idx: &mut Vec<u32>,
    ) -> Result<()> {
        let _p = profile::scope(|| "maxpool fwd".into());
        self.maxpool_forward_impl(s, x, y, idx)
    }

    fn maxpool_backward(
        &self,
        s: &PoolShape,
        dy: &Vec<T>,
        idx: &Vec<u32>,
        dx: &mut Vec<T>,
    ) -> Result<()> {
        let _p = profile::scope(|| "maxpool bwd".into());
        self.maxpool_backward_impl(s, dy, idx, dx)
    }

    fn avgpool_forward(&self, planes: usize, hw: usize, x: &Vec<T>, y: &mut Vec<T>) -> Result<()> {
        let _p = profile::scope(|| "avgpool fwd".into());
        self.avgpool_forward_impl(planes, hw, x, y)
    }

    fn avgpool_backward(
        &self,
        planes: usize,
        hw: usize,
        dy: &Vec<T>,
        dx: &mut Vec<T>,
    ) -> Result<()> {
        let _p = profile::scope(|| "avgpool bwd".into());
        self.avgpool_backward_impl(planes, hw, dy, dx)
    }

    fn linear_forward(
        &self,
        s: &LinearShape,
        x: &Vec<T>,
        params: &Vec<T>,
        w_off: usize,
        b_off: usize,
        y: &mut Vec<T>,
    ) -> Result<()> {
        let _p = profile::scope(|| format!("linear fwd {}->{}", s.fin, s.fout));
        self.linear_forward_impl(s, x, params, w_off, b_off, y)
    }

    fn linear_backward(
        &self,
        s: &LinearShape,
        x: &Vec<T>,
        params: &Vec<T>,
        w_off: usize,
        b_off: usize,
        dy: &Vec<T>,
        dx: Option<&mut Vec<T>>,
        grads: &mut Vec<T>,
    ) -> Result<()> {
        let _p = profile::scope(|| format!("linear bwd {}->{}", s.fin, s.fout));
        self.linear_backward_impl(
            s,
            x,
            params,
            w_off,
            b_off,
            dy,
            dx.map(|d| d.as_mut_slice()),
            grads,
        )
    }

    fn sgd_step(
        &self,
        params: &mut Vec<T>,
        grads: &Vec<T>,
        momentum_buf: &mut Vec<T>,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    ) -> Result<()> {
        let _p = profile::scope(|| "sgd".into());
        self.sgd_step_impl(params, grads, momentum_buf, lr, momentum, weight_decay)
    }

    type Ctx = ();
    fn contrast_ctx(&self) -> Result<()> {
        Ok(())
    }
    fn momentum(&self, key: &mut Vec<T>, query: &Vec<T>, m: f64) -> Result<()> {
        let _p = profile::scope(|| "momentum".into());
        ops::momentum_update_host(key, query, m)
    }
    fn normalize(&self, _: &mut (), x: &Vec<T>, n: usize, c: usize) -> Result<Vec<T>> {
        let _p = profile::scope(|| "normalize".into());
        ops::contrast::l2_normalize_host(x, n, c)
    }
    fn infonce(
        &self,
        _: &mut (),
        q: &Vec<T>,
        k: &Vec<T>,
        queue: &Vec<T>,
        s: ContrastShape,
        _imp: InfoNceImpl,
    ) -> Result<(InfoNceStats, Vec<T>)> {
        let _p = profile::scope(|| "infonce".into());
        if let (Some(q), Some(k), Some(queue)) = (T::as_f32(q), T::as_f32(k), T::as_f32(queue)) {
            // f32: GEMMs and exp in f32, sums and the loss in f64.
            let s = s.rounded_to_f32();
            let (loss, grad, correct) = ops::contrast::infonce_gemm_f32(q, k, queue, s)?;
            let grad = grad.into_iter().map(|v| T::from_f64(v as f64)).collect();
            let stats = InfoNceStats {
                loss,
                accuracy: correct as f64 / s.n as f64,
            };
            return Ok((stats, grad));
        }
        ops::contrast::infonce_host(q, k, queue, s)
    }
    fn enqueue(
        &self,
        queue: &mut Vec<T>,
        keys: &Vec<T>,
        k: usize,
        c: usize,
        ptr: usize,
    ) -> Result<usize> {
        let _p = profile::scope(|| "enqueue".into());
        ops::enqueue_cpu(queue, keys, k, c, ptr)
    }
    fn gather_rows(&self, x: &Vec<T>, rows: &[usize], row_len: usize) -> Result<Vec<T>> {
        let _p = profile::scope(|| "gather_rows".into());
        super::gather_host(x, rows, row_len)
    }
    fn count_non_finite(&self, bufs: &[&Vec<T>]) -> Result<Vec<u64>> {
        let _p = profile::scope(|| "count_non_finite".into());
        Ok(bufs
            .iter()
            .map(|b| b.iter().filter(|v| !v.to_f64().is_finite()).count() as u64)
            .collect())
    }
    fn free_device_memory(&self) -> Result<Option<u64>> {
        Ok(None)
    }
}
