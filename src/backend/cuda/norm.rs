//! BatchNorm on the GPU (`kernels/norm.cu`): per-(group, channel) statistics in one block
//! each, the running-statistics update, the normalize-and-scale pass, and the backward's
//! reduce, parameter-gradient and `dx` passes.
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{bn_abi, u32_of, Cuda};
use crate::backend::{BnOffsets, BnParams, BnShape};
use crate::cuda::{grow, kernels, launch, lock, view, view_mut, Disjoint, Nullable, BLOCK};
use crate::error::Result;

impl Cuda {
    /// One block per (channel, group).
    fn per_group_channel(c: u32, g: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (c, g, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Training-mode BatchNorm with the fused epilogue `y = relu(bn(x) + residual)` (the
    /// add when `residual` is given, the ReLU when `relu`) in the normalize pass.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn bn_forward_train_fused_impl(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &CudaSlice<f32>,
        params: &CudaSlice<f32>,
        off: BnOffsets,
        running: &mut CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
        relu: bool,
        y: &mut CudaSlice<f32>,
        mean: &mut CudaSlice<f32>,
        invstd: &mut CudaSlice<f32>,
    ) -> Result<()> {
        s.check_forward(x.len(), params.len(), off, running.len(), y.len())?;
        s.check_stats(mean.len(), invstd.len())?;
        let residual = match residual {
            Some(r) => Some(view("batchnorm residual", r, 0, s.len())?),
            None => None,
        };
        let (c, g) = (s.c, s.groups);
        let running_at = Disjoint::new(
            "batchnorm running stats",
            running.len(),
            off.mean,
            off.var,
            c,
        )?;
        let abi = bn_abi(s)?;
        let (c32, g32) = (abi.c, abi.groups);
        let xv = view("batchnorm x", x, 0, s.len())?;
        let mut guard = lock(&self.scratch.bn)?;
        let var = grow(&self.gpu, &mut guard, g * c)?;
        launch!(self.gpu, kernels::norm::BN_STATS_F32, Self::per_group_channel(c32, g32);
            xv.slice(..),
            mut view_mut("batchnorm mean", mean, 0, g * c)?,
            mut view_mut("batchnorm invstd", invstd, 0, g * c)?,
            mut var.as_view_mut(),
            abi,
            hp.eps as f32
        );
        {
            let (mut lo, mut hi) = running.split_at_mut(running_at.mid);
            let (rm, rv) = running_at.pick(&mut lo, &mut hi);
            launch!(self.gpu, kernels::norm::BN_RUNNING_F32, self.per_channel(c);
                mut rm,
                mut rv,
                view("batchnorm mean", mean, 0, g * c)?,
                var.as_view(),
                c32,
                g32,
                hp.momentum
            );
        }
        launch!(self.gpu, kernels::norm::BN_APPLY_F32, self.elementwise(s.len() as u64);
            xv,
            mut view_mut("batchnorm y", y, 0, s.len())?,
            view("batchnorm gamma", params, off.gamma, c)?,
            view("batchnorm beta", params, off.beta, c)?,
            view("batchnorm mean", mean, 0, g * c)?,
            view("batchnorm invstd", invstd, 0, g * c)?,
            abi,
            Nullable::from(residual),
            u32::from(relu)
        );
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn bn_forward_eval_impl(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &CudaSlice<f32>,
        params: &CudaSlice<f32>,
        off: BnOffsets,
        running: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        s.check_forward(x.len(), params.len(), off, running.len(), y.len())?;
        let c = s.c;
        let mut guard = lock(&self.scratch.eval)?;
        let (mean, invstd) = &mut *guard;
        let mean = grow(&self.gpu, mean, c)?;
        let invstd = grow(&self.gpu, invstd, c)?;
        self.eval_stats(hp, running, off, c, mean, invstd)?;
        launch!(self.gpu, kernels::norm::BN_APPLY_F32, self.elementwise(s.len() as u64);
            view("batchnorm x", x, 0, s.len())?,
            mut view_mut("batchnorm y", y, 0, s.len())?,
            view("batchnorm gamma", params, off.gamma, c)?,
            view("batchnorm beta", params, off.beta, c)?,
            mean.as_view(),
            invstd.as_view(),
            bn_abi(&BnShape { groups: 1, ..*s })?,
            Nullable::<f32>::from(None),
            0u32
        );
        Ok(())
    }

    /// Training-mode backward; through the ReLU that followed the BatchNorm when
    /// `relu_out` (its output) is given, masking `dy` inside the two passes (`dy` itself is
    /// not changed).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn relu_bn_backward_train_impl(
        &self,
        s: &BnShape,
        x: &CudaSlice<f32>,
        params: &CudaSlice<f32>,
        off: BnOffsets,
        mean: &CudaSlice<f32>,
        invstd: &CudaSlice<f32>,
        relu_out: Option<&CudaSlice<f32>>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
    ) -> Result<()> {
        s.check_backward_train(
            (x.len(), dy.len(), dx.len()),
            (params.len(), grads.len()),
            off,
            (mean.len(), invstd.len()),
        )?;
        if let Some(r) = relu_out {
            crate::backend::check_len("batchnorm relu output", r.len(), 0, s.len())?;
        }
        let mode = (true, relu_out);
        self.bn_backward_common(s, x, params, off, mean, invstd, dy, dx, grads, mode)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn bn_backward_eval_impl(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &CudaSlice<f32>,
        params: &CudaSlice<f32>,
        off: BnOffsets,
        running: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
    ) -> Result<()> {
        s.check_backward_eval(
            (x.len(), dy.len(), dx.len()),
            (params.len(), grads.len()),
            off,
            running.len(),
        )?;
        let mut guard = lock(&self.scratch.eval)?;
        let (mean, invstd) = &mut *guard;
        let mean = grow(&self.gpu, mean, s.c)?;
        let invstd = grow(&self.gpu, invstd, s.c)?;
        self.eval_stats(hp, running, off, s.c, mean, invstd)?;
        let s1 = BnShape { groups: 1, ..*s };
        self.bn_backward_common(
            &s1,
            x,
            params,
            off,
            mean,
            invstd,
            dy,
            dx,
            grads,
            (false, None),
        )
    }

    /// The inference-mode statistics (mean, 1 / sqrt(var + eps)) from the running ones.
    fn eval_stats(
        &self,
        hp: BnParams,
        running: &CudaSlice<f32>,
        off: BnOffsets,
        c: usize,
        mean: &mut CudaSlice<f32>,
        invstd: &mut CudaSlice<f32>,
    ) -> Result<()> {
        launch!(self.gpu, kernels::norm::BN_EVAL_STATS_F32, self.per_channel(c);
            view("batchnorm running_mean", running, off.mean, c)?,
            view("batchnorm running_var", running, off.var, c)?,
            mut view_mut("batchnorm mean", mean, 0, c)?,
            mut view_mut("batchnorm invstd", invstd, 0, c)?,
            u32_of(c, "c")?,
            hp.eps as f32
        );
        Ok(())
    }

    /// Shared backward: per-(group, channel) sums, parameter gradients, dx. Lengths checked
    /// by the callers (and again by the views).
    #[allow(clippy::too_many_arguments)]
    fn bn_backward_common(
        &self,
        s: &BnShape,
        x: &CudaSlice<f32>,
        params: &CudaSlice<f32>,
        off: BnOffsets,
        mean: &CudaSlice<f32>,
        invstd: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
        (train, relu_out): (bool, Option<&CudaSlice<f32>>),
    ) -> Result<()> {
        let relu_out = match relu_out {
            Some(r) => Some(view("batchnorm relu output", r, 0, s.len())?),
            None => None,
        };
        let (c, g) = (s.c, s.groups);
        let grads_at = Disjoint::new("batchnorm grads", grads.len(), off.gamma, off.beta, c)?;
        let abi = bn_abi(s)?;
        let (c32, g32) = (abi.c, abi.groups);
        let xv = view("batchnorm x", x, 0, s.len())?;
        let dyv = view("batchnorm dy", dy, 0, s.len())?;
        let meanv = view("batchnorm mean", mean, 0, g * c)?;
        let invstdv = view("batchnorm invstd", invstd, 0, g * c)?;
        let mut guard = lock(&self.scratch.bn)?;
        let sums = grow(&self.gpu, &mut guard, 2 * g * c)?;
        launch!(self.gpu, kernels::norm::BN_BWD_REDUCE_F32, Self::per_group_channel(c32, g32);
            xv.slice(..),
            dyv.slice(..),
            meanv.slice(..),
            invstdv.slice(..),
            mut sums.as_view_mut(),
            abi,
            Nullable::from(relu_out.as_ref().map(|r| r.slice(..)))
        );
        {
            let (mut lo, mut hi) = grads.split_at_mut(grads_at.mid);
            let (dgamma, dbeta) = grads_at.pick(&mut lo, &mut hi);
            launch!(self.gpu, kernels::norm::BN_BWD_PARAMS_F32, self.per_channel(c);
                sums.as_view(),
                mut dgamma,
                mut dbeta,
                c32,
                g32
            );
        }
        launch!(self.gpu, kernels::norm::BN_BWD_DX_F32, self.elementwise(s.len() as u64);
            xv,
            dyv,
            mut view_mut("batchnorm dx", dx, 0, s.len())?,
            view("batchnorm gamma", params, off.gamma, c)?,
            meanv,
            invstdv,
            sums.as_view(),
            abi,
            u32::from(train),
            Nullable::from(relu_out)
        );
        Ok(())
    }
}
