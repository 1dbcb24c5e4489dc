//! The encoder: ResNet backbone + MoCo head on one backend, with flat buffers. This file
//! holds [`Encoder`] with its forward and backward passes, and the activations, caches and
//! buffer pool those use; the network it runs is described and built in `network.rs`, its
//! state-dict export/import is in `state_dict.rs`.
use std::collections::HashMap;
use std::sync::Arc;

use super::network::{build, lin_shape, Bn, Conv, Head, InputShape, Net};
use super::{EncoderConfig, ParamTable};
use crate::backend::{Backend, BnParams, BnShape, ConvShape, PoolShape};
use crate::error::{Error, Result};

/// An activation: a shared buffer (cached by several layers) and its C, H, W.
struct Act<B: Backend> {
    buf: Arc<B::Buf>,
    c: usize,
    h: usize,
    w: usize,
}

impl<B: Backend> Clone for Act<B> {
    fn clone(&self) -> Self {
        Act {
            buf: self.buf.clone(),
            c: self.c,
            h: self.h,
            w: self.w,
        }
    }
}

struct ConvCache<B: Backend> {
    x: Arc<B::Buf>,
    s: ConvShape,
    conv: Conv,
}

struct BnCache<B: Backend> {
    x: Arc<B::Buf>,
    s: BnShape,
    bn: Bn,
    /// (mean, invstd) of the training-mode statistics; None in inference mode.
    stats: Option<(B::Buf, B::Buf)>,
}

/// conv, BN, and the ReLU output (None for a block's last stage).
type StageCache<B> = (ConvCache<B>, BnCache<B>, Option<Arc<<B as Backend>::Buf>>);

struct BlockCache<B: Backend> {
    /// Per stage: conv, BN, and the ReLU output (None for the last stage).
    stages: Vec<StageCache<B>>,
    down: Option<(ConvCache<B>, BnCache<B>)>,
    /// Block output after the final ReLU.
    out: Arc<B::Buf>,
    in_len: usize,
}

struct Cache<B: Backend> {
    input: InputShape,
    conv1: ConvCache<B>,
    bn1: BnCache<B>,
    relu1: Arc<B::Buf>,
    pool: Option<(PoolShape, B::Idx, usize)>,
    blocks: Vec<BlockCache<B>>,
    /// Last block output's (planes, hw) for the average pool.
    avg: (usize, usize),
    /// Backbone features (N x feat).
    feats: Arc<B::Buf>,
    /// MLP hidden activation after ReLU.
    hidden: Option<Arc<B::Buf>>,
}

/// The encoder's buffers between uses, by length, so that a step allocates nothing after
/// the first one of its shape. Only buffers the pool handed out come back, and it is
/// emptied when the input shape changes, so it never holds more than one pass of one
/// shape needs.
struct Pool<B: Backend> {
    shape: Option<InputShape>,
    free: HashMap<usize, Vec<B::Buf>>,
    /// Elements the pool allocated since it was last emptied, and elements it holds.
    made: usize,
    held: usize,
}

impl<B: Backend> Pool<B> {
    fn new() -> Self {
        Pool {
            shape: None,
            free: HashMap::new(),
            made: 0,
            held: 0,
        }
    }

    /// Empties the pool when `shape` is not the shape of its buffers.
    fn set_shape(&mut self, shape: InputShape) {
        if self.shape != Some(shape) {
            self.free.clear();
            self.shape = Some(shape);
            self.made = 0;
            self.held = 0;
        }
    }

    /// A buffer of `n` elements for an operation to write (zeroed unless the backend's
    /// [`Backend::reuse`] says its operations overwrite their outputs).
    fn take(&mut self, be: &B, n: usize) -> Result<B::Buf> {
        match self.free.get_mut(&n).and_then(Vec::pop) {
            Some(mut b) => {
                self.held -= n;
                be.reuse(&mut b)?;
                Ok(b)
            }
            None => {
                self.made = self.made.saturating_add(n);
                be.zeros(n)
            }
        }
    }

    /// Keeps `b` for a later [`Pool::take`].
    fn give(&mut self, be: &B, b: B::Buf) {
        let n = be.len(&b);
        // Never more than the pool allocated: a safety net, as only its own buffers return.
        if self.held + n <= self.made {
            self.held += n;
            self.free.entry(n).or_default().push(b);
        }
    }

    /// Keeps the buffer if this is its last reference; otherwise drops the reference
    /// (the last holder gives the buffer back, whatever order they come in).
    fn give_shared(&mut self, be: &B, a: Arc<B::Buf>) {
        if let Ok(b) = Arc::try_unwrap(a) {
            self.give(be, b);
        }
    }
}

impl<B: Backend> ConvCache<B> {
    fn recycle(self, pool: &mut Pool<B>, be: &B) {
        pool.give_shared(be, self.x);
    }
}

impl<B: Backend> BnCache<B> {
    fn recycle(self, pool: &mut Pool<B>, be: &B) {
        pool.give_shared(be, self.x);
        if let Some((m, i)) = self.stats {
            pool.give(be, m);
            pool.give(be, i);
        }
    }
}

impl<B: Backend> BlockCache<B> {
    fn recycle(self, pool: &mut Pool<B>, be: &B) {
        for (cc, bc, relu) in self.stages {
            cc.recycle(pool, be);
            bc.recycle(pool, be);
            if let Some(r) = relu {
                pool.give_shared(be, r);
            }
        }
        if let Some((cc, bc)) = self.down {
            cc.recycle(pool, be);
            bc.recycle(pool, be);
        }
        pool.give_shared(be, self.out);
    }
}

impl<B: Backend> Cache<B> {
    /// Gives every buffer of the cache back to the pool.
    fn recycle(self, pool: &mut Pool<B>, be: &B) {
        self.conv1.recycle(pool, be);
        self.bn1.recycle(pool, be);
        pool.give_shared(be, self.relu1);
        for bc in self.blocks {
            bc.recycle(pool, be);
        }
        pool.give_shared(be, self.feats);
        if let Some(h) = self.hidden {
            pool.give_shared(be, h);
        }
    }
}

/// A MoCo encoder (ResNet backbone + head) on backend `B`.
///
/// Parameters, gradients and BatchNorm running statistics each live in one flat buffer laid
/// out by [`ParamTable`]; two encoders built from the same config share the layout, so the
/// momentum update is one pass over [`Encoder::params`].
pub struct Encoder<B: Backend> {
    pub(super) backend: B,
    pub(super) cfg: EncoderConfig,
    net: Net,
    pub(super) table: ParamTable,
    pub(super) params: B::Buf,
    grads: B::Buf,
    pub(super) running: B::Buf,
    pub(super) num_batches_tracked: u64,
    bn: BnParams,
    cache: Option<Cache<B>>,
    pool: Pool<B>,
}

impl<B: Backend> Encoder<B> {
    /// Builds the encoder with torchvision's initialization, seeded: conv weights
    /// `N(0, 2 / fan_out)`, BatchNorm `gamma = 1, beta = 0`, linear layers
    /// `U(-1/sqrt(in), 1/sqrt(in))`; running mean 0, variance 1; gradients zero.
    pub fn new(backend: B, cfg: EncoderConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let (net, table, init, running_init) = build(&cfg, seed);
        let params = backend.upload_f32(&init)?;
        let grads = backend.zeros(table.num_params())?;
        let running = backend.upload_f32(&running_init)?;
        Ok(Encoder {
            backend,
            cfg,
            net,
            table,
            params,
            grads,
            running,
            num_batches_tracked: 0,
            bn: BnParams::default(),
            cache: None,
            pool: Pool::new(),
        })
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }
    /// The configuration.
    pub fn config(&self) -> &EncoderConfig {
        &self.cfg
    }
    /// The name/shape/offset table.
    pub fn table(&self) -> &ParamTable {
        &self.table
    }
    /// Width of the backbone features.
    pub fn feature_dim(&self) -> usize {
        self.net.feat
    }
    /// The flat parameter buffer.
    pub fn params(&self) -> &B::Buf {
        &self.params
    }
    /// The flat parameter buffer, mutable (momentum update, SGD, loading).
    pub fn params_mut(&mut self) -> &mut B::Buf {
        &mut self.params
    }
    /// The flat gradient buffer (same layout as the parameters).
    pub fn grads(&self) -> &B::Buf {
        &self.grads
    }
    /// The flat gradient buffer, mutable.
    pub fn grads_mut(&mut self) -> &mut B::Buf {
        &mut self.grads
    }
    /// Parameters and gradients together (for an optimizer step).
    pub fn params_and_grads(&mut self) -> (&mut B::Buf, &B::Buf) {
        (&mut self.params, &self.grads)
    }
    /// BatchNorm running statistics (means and variances, table layout).
    pub fn running_stats(&self) -> &B::Buf {
        &self.running
    }
    /// BatchNorm running statistics, mutable.
    pub fn running_stats_mut(&mut self) -> &mut B::Buf {
        &mut self.running
    }
    /// Training-mode forward passes so far (PyTorch's `num_batches_tracked`).
    pub fn num_batches_tracked(&self) -> u64 {
        self.num_batches_tracked
    }
    /// Sets the `num_batches_tracked` counter (checkpoint restore).
    pub fn set_num_batches_tracked(&mut self, n: u64) {
        self.num_batches_tracked = n;
    }
    /// BatchNorm momentum and epsilon (PyTorch defaults).
    pub fn bn_params(&self) -> BnParams {
        self.bn
    }
    /// Copies `other`'s parameters into this encoder (MoCo's `param_k.data.copy_(param_q)`
    /// at start-up). BatchNorm running statistics are not copied: each encoder keeps its
    /// own, as in the reference. Errors, changing nothing, when the configs differ.
    pub fn copy_params_from(&mut self, other: &Encoder<B>) -> Result<()> {
        if self.cfg != other.cfg {
            return Err(Error::invalid(format!(
                "copy_params_from: encoders differ ({:?} vs {:?})",
                self.cfg, other.cfg
            )));
        }
        self.params = self.backend.copy(&other.params)?;
        Ok(())
    }

    /// Zeroes the gradient buffer.
    pub fn zero_grad(&mut self) -> Result<()> {
        self.backend.fill_zero(&mut self.grads)
    }

    /// Forward pass to the head output (N x dim), keeping what the backward pass needs.
    ///
    /// `train`: BatchNorm uses batch statistics (per group of `bn_splits` interleaved
    /// sample groups, see [`BnShape`]) and updates the running statistics; otherwise the
    /// running statistics. `x` is N x C x H x W as `shape` says.
    pub fn forward(
        &mut self,
        x: &B::Buf,
        shape: InputShape,
        train: bool,
        bn_splits: usize,
    ) -> Result<B::Buf> {
        self.drop_cache();
        let (out, cache) = self.run(x, shape, train, bn_splits, true, true)?;
        self.cache = cache;
        Ok(out)
    }

    /// Forward pass to the head output without keeping activations (key encoder: no
    /// gradient). In training mode the running statistics are still updated.
    pub fn forward_no_grad(
        &mut self,
        x: &B::Buf,
        shape: InputShape,
        train: bool,
        bn_splits: usize,
    ) -> Result<B::Buf> {
        self.drop_cache();
        Ok(self.run(x, shape, train, bn_splits, true, false)?.0)
    }

    /// Backbone features (N x [`Encoder::feature_dim`]) in inference mode, for kNN monitors
    /// and linear evaluation. Keeps nothing, changes nothing.
    pub fn features(&mut self, x: &B::Buf, shape: InputShape) -> Result<B::Buf> {
        self.drop_cache();
        Ok(self.run(x, shape, false, 1, false, false)?.0)
    }

    /// Backward pass of the last [`Encoder::forward`]: adds the parameter gradients into
    /// [`Encoder::grads`] and returns the gradient with respect to the input.
    pub fn backward(&mut self, grad_out: &B::Buf) -> Result<B::Buf> {
        self.backward_impl(grad_out, true)?
            .ok_or_else(|| Error::Other("internal: no input gradient".into()))
    }

    /// [`Encoder::backward`] without the gradient with respect to the input (what a
    /// training step needs: the stem convolution's input gradient is not computed).
    pub fn backward_params(&mut self, grad_out: &B::Buf) -> Result<()> {
        self.backward_impl(grad_out, false).map(|_| ())
    }

    fn backward_impl(&mut self, grad_out: &B::Buf, want_dx: bool) -> Result<Option<B::Buf>> {
        let cache = self.cache.take().ok_or_else(|| {
            Error::invalid("backward called without a preceding forward (or twice)")
        })?;
        let n = cache.input.n;
        if self.backend.len(grad_out) != n * self.cfg.dim {
            let got = self.backend.len(grad_out);
            // Keep the forward pass: the caller may retry with the right gradient.
            self.cache = Some(cache);
            return Err(Error::invalid(format!(
                "backward: gradient has {got} elements, expected {n} x {}",
                self.cfg.dim
            )));
        }
        let Cache {
            input,
            conv1,
            bn1,
            relu1,
            pool,
            blocks,
            avg,
            feats,
            hidden,
        } = cache;
        let be = self.backend.clone();
        // Head.
        let feats_grad = match (&self.net.head, &hidden) {
            (Head::Linear(l), _) => {
                let mut d = self.pool.take(&be, n * l.fin)?;
                be.linear_backward(
                    &lin_shape(n, l),
                    &feats,
                    &self.params,
                    l.w,
                    l.b,
                    grad_out,
                    Some(&mut d),
                    &mut self.grads,
                )?;
                d
            }
            (Head::Mlp(l1, l2), Some(hidden)) => {
                let mut dh = self.pool.take(&be, n * l2.fin)?;
                be.linear_backward(
                    &lin_shape(n, l2),
                    hidden,
                    &self.params,
                    l2.w,
                    l2.b,
                    grad_out,
                    Some(&mut dh),
                    &mut self.grads,
                )?;
                be.relu_backward(hidden, &mut dh)?;
                let mut d = self.pool.take(&be, n * l1.fin)?;
                be.linear_backward(
                    &lin_shape(n, l1),
                    &feats,
                    &self.params,
                    l1.w,
                    l1.b,
                    &dh,
                    Some(&mut d),
                    &mut self.grads,
                )?;
                self.pool.give(&be, dh);
                d
            }
            (Head::Mlp(..), None) => {
                return Err(Error::Other("internal: missing MLP cache".into()))
            }
        };
        // Global average pool.
        let (planes, hw) = avg;
        let mut d = self.pool.take(&be, planes * hw)?;
        be.avgpool_backward(planes, hw, &feats_grad, &mut d)?;
        self.pool.give(&be, feats_grad);
        // Blocks, last first.
        for bc in blocks.into_iter().rev() {
            d = self.block_backward(bc, d)?;
        }
        // Stem.
        if let Some((ps, idx, in_len)) = &pool {
            let mut dx = self.pool.take(&be, *in_len)?;
            be.maxpool_backward(ps, &d, idx, &mut dx)?;
            self.pool.give(&be, std::mem::replace(&mut d, dx));
        }
        let dh = self.bn_backward(&bn1, &d, Some(&relu1))?;
        self.pool.give(&be, d);
        let dx = if want_dx {
            let mut dx = self.pool.take(&be, input.len())?;
            self.conv_backward(&conv1, &dh, Some(&mut dx))?;
            Some(dx)
        } else {
            self.conv_backward(&conv1, &dh, None)?;
            None
        };
        self.pool.give(&be, dh);
        conv1.recycle(&mut self.pool, &be);
        bn1.recycle(&mut self.pool, &be);
        self.pool.give_shared(&be, relu1);
        self.pool.give_shared(&be, feats);
        if let Some(h) = hidden {
            self.pool.give_shared(&be, h);
        }
        Ok(dx)
    }

    // ----- internals -------------------------------------------------------------------

    #[allow(clippy::type_complexity)]
    fn run(
        &mut self,
        x: &B::Buf,
        shape: InputShape,
        train: bool,
        bn_splits: usize,
        head: bool,
        keep: bool,
    ) -> Result<(B::Buf, Option<Cache<B>>)> {
        if shape.c != self.cfg.in_channels {
            return Err(Error::invalid(format!(
                "input has {} channels but the encoder was built for {}",
                shape.c, self.cfg.in_channels
            )));
        }
        if shape.n == 0 || shape.h == 0 || shape.w == 0 {
            return Err(Error::invalid(format!("empty input batch {shape:?}")));
        }
        if self.backend.len(x) != shape.len() {
            return Err(Error::invalid(format!(
                "input has {} elements, expected {} for {:?}",
                self.backend.len(x),
                shape.len(),
                shape
            )));
        }
        if train && (bn_splits == 0 || !shape.n.is_multiple_of(bn_splits)) {
            return Err(Error::invalid(format!(
                "bn_splits = {bn_splits} must divide the batch size {}",
                shape.n
            )));
        }
        let groups = if train { bn_splits } else { 1 };
        // Validate every layer's shape first, so a bad input changes nothing (no running
        // statistics updated by the layers before the one that fails).
        self.check_shapes(shape, train, groups)?;
        self.pool.set_shape(shape);
        let be = self.backend.clone();
        let n = shape.n;
        let mut inp = self.pool.take(&be, shape.len())?;
        be.copy_into(x, &mut inp)?;
        let input = Act::<B> {
            buf: Arc::new(inp),
            c: shape.c,
            h: shape.h,
            w: shape.w,
        };
        let conv1 = self.net.conv1;
        let (h, c1) = self.conv_forward(n, &conv1, &input)?;
        let bn1 = self.net.bn1;
        let (a, b1) = self.bn_forward(n, &bn1, h, train, groups, None, true)?;
        let relu1 = Arc::new(a.0);
        let mut cur = Act::<B> {
            buf: relu1.clone(),
            c: a.1,
            h: a.2,
            w: a.3,
        };
        let mut pool = None;
        if self.net.maxpool {
            let ps = PoolShape::new(n * cur.c, (cur.h, cur.w), 3, 2, 1)?;
            let mut y = self.pool.take(&be, ps.planes * ps.ho * ps.wo)?;
            let mut idx = be.zeros_idx(ps.planes * ps.ho * ps.wo)?;
            be.maxpool_forward(&ps, &cur.buf, &mut y, &mut idx)?;
            pool = Some((ps, idx, n * cur.c * cur.h * cur.w));
            cur = Act {
                buf: Arc::new(y),
                c: cur.c,
                h: ps.ho,
                w: ps.wo,
            };
        }
        let mut blocks = Vec::new();
        for bi in 0..self.net.blocks.len() {
            let (out, bc) = self.block_forward(n, bi, cur, train, groups)?;
            if keep {
                blocks.push(bc);
            } else {
                // Its buffers serve the next blocks.
                bc.recycle(&mut self.pool, &be);
            }
            cur = out;
        }
        let (planes, hw) = (n * cur.c, cur.h * cur.w);
        let mut feats = self.pool.take(&be, planes)?;
        be.avgpool_forward(planes, hw, &cur.buf, &mut feats)?;
        drop(cur);
        if train {
            self.num_batches_tracked += 1;
        }
        if !head {
            c1.recycle(&mut self.pool, &be);
            b1.recycle(&mut self.pool, &be);
            self.pool.give_shared(&be, relu1);
            for bc in blocks {
                bc.recycle(&mut self.pool, &be);
            }
            return Ok((feats, None));
        }
        let feats = Arc::new(feats);
        let (out, hidden) = match &self.net.head {
            Head::Linear(l) => {
                let mut y = self.pool.take(&be, n * l.fout)?;
                be.linear_forward(&lin_shape(n, l), &feats, &self.params, l.w, l.b, &mut y)?;
                (y, None)
            }
            Head::Mlp(l1, l2) => {
                let mut hid = self.pool.take(&be, n * l1.fout)?;
                be.linear_forward(
                    &lin_shape(n, l1),
                    &feats,
                    &self.params,
                    l1.w,
                    l1.b,
                    &mut hid,
                )?;
                be.relu_forward(&mut hid)?;
                let mut y = self.pool.take(&be, n * l2.fout)?;
                be.linear_forward(&lin_shape(n, l2), &hid, &self.params, l2.w, l2.b, &mut y)?;
                (y, Some(Arc::new(hid)))
            }
        };
        let cache = Cache {
            input: shape,
            conv1: c1,
            bn1: b1,
            relu1,
            pool,
            blocks,
            avg: (planes, hw),
            feats,
            hidden,
        };
        if keep {
            return Ok((out, Some(cache)));
        }
        cache.recycle(&mut self.pool, &be);
        Ok((out, None))
    }

    /// Walks the network's shapes without computing anything.
    fn check_shapes(&self, shape: InputShape, train: bool, groups: usize) -> Result<()> {
        let n = shape.n;
        let conv = |c: &Conv, hw: (usize, usize)| -> Result<(usize, usize)> {
            let s = ConvShape::new(n, c.cin, hw, c.cout, c.k, c.stride, c.pad)?;
            Ok((s.ho, s.wo))
        };
        let bn = |b: &Bn, hw: (usize, usize)| BnShape::new(n, b.c, hw.0 * hw.1, groups, train);
        let mut hw = conv(&self.net.conv1, (shape.h, shape.w))?;
        bn(&self.net.bn1, hw)?;
        if self.net.maxpool {
            let p = PoolShape::new(n * self.net.conv1.cout, hw, 3, 2, 1)?;
            hw = (p.ho, p.wo);
        }
        for b in &self.net.blocks {
            let mut cur = hw;
            for (c, nb) in &b.stages {
                cur = conv(c, cur)?;
                bn(nb, cur)?;
            }
            if let Some((c, nb)) = &b.down {
                let d = conv(c, hw)?;
                bn(nb, d)?;
            }
            hw = cur;
        }
        Ok(())
    }

    /// Gives the kept forward pass's buffers (if any) back to the pool.
    fn drop_cache(&mut self) {
        if let Some(c) = self.cache.take() {
            c.recycle(&mut self.pool, &self.backend);
        }
    }

    fn conv_forward(
        &mut self,
        n: usize,
        conv: &Conv,
        x: &Act<B>,
    ) -> Result<(Act<B>, ConvCache<B>)> {
        if x.c != conv.cin {
            return Err(Error::Other(format!(
                "internal: conv expects {} channels, got {}",
                conv.cin, x.c
            )));
        }
        let s = ConvShape::new(
            n,
            conv.cin,
            (x.h, x.w),
            conv.cout,
            conv.k,
            conv.stride,
            conv.pad,
        )?;
        let mut y = self.pool.take(&self.backend, s.y_len())?;
        self.backend
            .conv2d_forward(&s, &x.buf, &self.params, conv.w, &mut y)?;
        Ok((
            Act {
                buf: Arc::new(y),
                c: s.cout,
                h: s.ho,
                w: s.wo,
            },
            ConvCache {
                x: x.buf.clone(),
                s,
                conv: *conv,
            },
        ))
    }

    /// Returns (output buffer, c, h, w) and the cache.
    #[allow(clippy::type_complexity)]
    /// `y = relu(bn(x) + residual)`: the add when `residual` is given, the ReLU when
    /// `relu` (one fused pass in training mode).
    #[allow(clippy::too_many_arguments)]
    fn bn_forward(
        &mut self,
        n: usize,
        bn: &Bn,
        x: Act<B>,
        train: bool,
        groups: usize,
        residual: Option<&B::Buf>,
        relu: bool,
    ) -> Result<((B::Buf, usize, usize, usize), BnCache<B>)> {
        let s = BnShape::new(n, bn.c, x.h * x.w, groups, train)?;
        let be = &self.backend;
        let mut y = self.pool.take(be, s.len())?;
        let stats = if train {
            let mut mean = self.pool.take(be, groups * bn.c)?;
            let mut invstd = self.pool.take(be, groups * bn.c)?;
            be.bn_forward_train_fused(
                &s,
                self.bn,
                &x.buf,
                &self.params,
                bn.off,
                &mut self.running,
                residual,
                relu,
                &mut y,
                &mut mean,
                &mut invstd,
            )?;
            Some((mean, invstd))
        } else {
            be.bn_forward_eval(
                &s,
                self.bn,
                &x.buf,
                &self.params,
                bn.off,
                &self.running,
                &mut y,
            )?;
            if let Some(r) = residual {
                be.add_assign(&mut y, r)?;
            }
            if relu {
                be.relu_forward(&mut y)?;
            }
            None
        };
        Ok((
            (y, x.c, x.h, x.w),
            BnCache {
                x: x.buf,
                s,
                bn: *bn,
                stats,
            },
        ))
    }

    fn block_forward(
        &mut self,
        n: usize,
        bi: usize,
        x: Act<B>,
        train: bool,
        groups: usize,
    ) -> Result<(Act<B>, BlockCache<B>)> {
        let block = self.net.blocks[bi].clone();
        let mut stages = Vec::new();
        let mut cur = x.clone();
        let last = block.stages.len() - 1;
        // The shortcut first, so the last BatchNorm of the main branch can add it and
        // apply the block's ReLU in its own pass.
        let (shortcut, down) = match &block.down {
            Some((conv, bn)) => {
                let (h, cc) = self.conv_forward(n, conv, &x)?;
                let ((sc, ..), bc) = self.bn_forward(n, bn, h, train, groups, None, false)?;
                (Arc::new(sc), Some((cc, bc)))
            }
            None => (x.buf.clone(), None),
        };
        let mut main = None;
        for (si, (conv, bn)) in block.stages.iter().enumerate() {
            let (h, cc) = self.conv_forward(n, conv, &cur)?;
            if si < last {
                let ((y, c, hh, ww), bc) = self.bn_forward(n, bn, h, train, groups, None, true)?;
                let y = Arc::new(y);
                stages.push((cc, bc, Some(y.clone())));
                cur = Act {
                    buf: y,
                    c,
                    h: hh,
                    w: ww,
                };
            } else {
                let (out, bc) = self.bn_forward(n, bn, h, train, groups, Some(&shortcut), true)?;
                stages.push((cc, bc, None));
                main = Some(out);
            }
        }
        let (y, c, hh, ww) = main.ok_or_else(|| Error::Other("internal: empty block".into()))?;
        let out = Arc::new(y);
        Ok((
            Act {
                buf: out.clone(),
                c,
                h: hh,
                w: ww,
            },
            BlockCache {
                stages,
                down,
                out,
                in_len: n * x.c * x.h * x.w,
            },
        ))
    }

    fn conv_backward(
        &mut self,
        cc: &ConvCache<B>,
        dy: &B::Buf,
        dx: Option<&mut B::Buf>,
    ) -> Result<()> {
        self.backend.conv2d_backward(
            &cc.s,
            &cc.x,
            &self.params,
            cc.conv.w,
            dy,
            dx,
            &mut self.grads,
            cc.conv.w,
        )
    }

    /// The backward of the BatchNorm `bc`, through the ReLU after it when `relu_out` (that
    /// ReLU's output) is given; `dy` is not changed.
    fn bn_backward(
        &mut self,
        bc: &BnCache<B>,
        dy: &B::Buf,
        relu_out: Option<&B::Buf>,
    ) -> Result<B::Buf> {
        let be = &self.backend;
        let mut dx = self.pool.take(be, bc.s.len())?;
        match (&bc.stats, relu_out) {
            (Some((mean, invstd)), Some(r)) => be.relu_bn_backward_train(
                &bc.s,
                &bc.x,
                &self.params,
                bc.bn.off,
                mean,
                invstd,
                r,
                dy,
                &mut dx,
                &mut self.grads,
            )?,
            (Some((mean, invstd)), None) => be.bn_backward_train(
                &bc.s,
                &bc.x,
                &self.params,
                bc.bn.off,
                mean,
                invstd,
                dy,
                &mut dx,
                &mut self.grads,
            )?,
            (None, _) => {
                let masked;
                let dy = match relu_out {
                    Some(r) => {
                        let mut d = be.copy(dy)?;
                        be.relu_backward(r, &mut d)?;
                        masked = d;
                        &masked
                    }
                    None => dy,
                };
                be.bn_backward_eval(
                    &bc.s,
                    self.bn,
                    &bc.x,
                    &self.params,
                    bc.bn.off,
                    &self.running,
                    dy,
                    &mut dx,
                    &mut self.grads,
                )?
            }
        }
        Ok(dx)
    }

    fn block_backward(&mut self, bc: BlockCache<B>, mut dout: B::Buf) -> Result<B::Buf> {
        let be = self.backend.clone();
        be.relu_backward(&bc.out, &mut dout)?;
        // Shortcut branch (an identity shortcut passes `dout` itself).
        let short = match &bc.down {
            Some((cc, nc)) => {
                let d = self.bn_backward(nc, &dout, None)?;
                let mut dx = self.pool.take(&be, bc.in_len)?;
                self.conv_backward(cc, &d, Some(&mut dx))?;
                self.pool.give(&be, d);
                Some(dx)
            }
            None => None,
        };
        // Main branch, last stage first; `d` None stands for `dout`.
        let mut d: Option<B::Buf> = None;
        for (cc, nc, relu) in bc.stages.iter().rev() {
            let dh = self.bn_backward(nc, d.as_ref().unwrap_or(&dout), relu.as_deref())?;
            let mut dxs = self.pool.take(&be, cc.s.x_len())?;
            self.conv_backward(cc, &dh, Some(&mut dxs))?;
            self.pool.give(&be, dh);
            if let Some(old) = d.replace(dxs) {
                self.pool.give(&be, old);
            }
        }
        let mut dx = d.ok_or_else(|| Error::Other("internal: empty block".into()))?;
        match short {
            Some(sc) => {
                be.add_assign(&mut dx, &sc)?;
                self.pool.give(&be, sc);
            }
            None => be.add_assign(&mut dx, &dout)?,
        }
        self.pool.give(&be, dout);
        bc.recycle(&mut self.pool, &be);
        Ok(dx)
    }
}
