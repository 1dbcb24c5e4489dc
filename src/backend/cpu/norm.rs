//! BatchNorm (training and inference, forward and backward) with f64 statistics.

use rayon::prelude::*;

use super::{Cpu, Scalar};
use crate::backend::{check_len, BnOffsets, BnParams, BnShape};
use crate::error::Result;

impl<T: Scalar> Cpu<T> {
    // x: N x C x HW. Group b = samples n with n % G == b; per (b, c) mean and biased var
    // over the (N/G) HW values, in f64: per-plane partial sums (fixed lanes, see
    // `plane_sum`) added in sample order, then y = epilogue((x - mean) scale + beta) with
    // the residual add and the ReLU in the same pass.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn bn_forward_train_fused_impl(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &[T],
        params: &[T],
        off: BnOffsets,
        running: &mut [T],
        residual: Option<&[T]>,
        relu: bool,
        y: &mut [T],
        mean: &mut [T],
        invstd: &mut [T],
    ) -> Result<()> {
        s.check_forward(x.len(), params.len(), off, running.len(), y.len())?;
        let (c, g, hw) = (s.c, s.groups, s.hw);
        s.check_stats(mean.len(), invstd.len())?;
        if let Some(r) = residual {
            check_len("batchnorm residual", r.len(), 0, s.len())?;
        }
        let eps = hp.eps;
        let mom = hp.momentum;
        let m = s.count() as f64;
        let x = &x[..s.len()];
        // Per (group, channel): its planes (about 100 KB for a 16-channel 28x28 layer in 8
        // groups) stay in cache from the statistics to the output, so `x` is read from
        // memory once.
        let plane = |n: usize, ch: usize| &x[(n * c + ch) * hw..(n * c + ch + 1) * hw];
        let stats = per_group_channel(s, y, |b, ch, ys| {
            // One pass: sums of x - k and (x - k)^2 around k, the group's first value.
            // Shifted by a value of the data, the variance sq / m - (s1 / m)^2 loses
            // about (mean - k)^2 / var ulps of f64 to cancellation, nothing at f32
            // scale, where the unshifted sums would lose mean^2 / var.
            let k = x.get(b * c * hw + ch * hw).map_or(0.0, |v| v.to_f64());
            let (mut s1, mut sq) = (0.0f64, 0.0f64);
            for n in (b..s.n).step_by(g) {
                if n + g < s.n {
                    prefetch(plane(n + g, ch));
                }
                let (a, q) = plane_sums(plane(n, ch), k);
                s1 += a;
                sq += q;
            }
            let d = s1 / m;
            let mu = k + d;
            let var = sq / m - d * d;
            // Rounding can take a constant group's variance below zero; NaN stays NaN.
            let var = if var < 0.0 { 0.0 } else { var };
            // y = (x - mean) scale + beta: centering first keeps the precision of values
            // near the mean (x scale + shift would cancel there).
            let mu_t = T::from_f64(mu);
            let is_t = T::from_f64(1.0 / (var + eps).sqrt());
            let scale = T::from_f64(params[off.gamma + ch].to_f64() * is_t.to_f64());
            let beta = params[off.beta + ch];
            for (yp, n) in ys.iter_mut().zip((b..s.n).step_by(g)) {
                let p = n * c + ch;
                if let (Some(r), true) = (residual, n + g < s.n) {
                    let q = p + g * c;
                    prefetch(&r[q * hw..(q + 1) * hw]);
                }
                let res = residual.map(|r| &r[p * hw..(p + 1) * hw]);
                epilogue(yp, plane(n, ch), res, relu, mu_t, scale, beta);
            }
            (mu, var)
        });
        let stat = |b: usize, ch: usize| stats[b * c + ch];
        for ch in 0..c {
            let (mut am, mut av) = (0.0, 0.0);
            for b in 0..g {
                let (mu, var) = stat(b, ch);
                mean[b * c + ch] = T::from_f64(mu);
                invstd[b * c + ch] = T::from_f64(1.0 / (var + eps).sqrt());
                am += mu;
                av += var * m / (m - 1.0);
            }
            let rm = &mut running[off.mean + ch];
            *rm = T::from_f64((1.0 - mom) * rm.to_f64() + mom * am / g as f64);
            let rv = &mut running[off.var + ch];
            *rv = T::from_f64((1.0 - mom) * rv.to_f64() + mom * av / g as f64);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn bn_forward_eval_impl(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &[T],
        params: &[T],
        off: BnOffsets,
        running: &[T],
        y: &mut [T],
    ) -> Result<()> {
        s.check_forward(x.len(), params.len(), off, running.len(), y.len())?;
        let (c, hw) = (s.c, s.hw);
        let pp = planes_per_item(hw);
        y[..s.len()]
            .par_chunks_mut(pp * hw)
            .zip(x[..s.len()].par_chunks(pp * hw))
            .enumerate()
            .for_each(|(i, (yc, xc))| {
                for (j, (yp, xp)) in yc.chunks_mut(hw).zip(xc.chunks(hw)).enumerate() {
                    let ch = (i * pp + j) % c;
                    let inv = 1.0 / (running[off.var + ch].to_f64() + hp.eps).sqrt();
                    let scale = T::from_f64(params[off.gamma + ch].to_f64() * inv);
                    let (mu, beta) = (running[off.mean + ch], params[off.beta + ch]);
                    for (yv, &xv) in yp.iter_mut().zip(xp) {
                        *yv = (xv - mu) * scale + beta;
                    }
                }
            });
        Ok(())
    }

    // Per (b, c): sdy = sum dy, sdx = sum dy xhat over the group's M values;
    // dx = gamma invstd (dy - sdy / M - xhat sdx / M). With `relu_out`, dy is first masked
    // by `relu_out > 0` (the backward of a ReLU after this BatchNorm), in the same passes.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn relu_bn_backward_train_impl(
        &self,
        s: &BnShape,
        x: &[T],
        params: &[T],
        off: BnOffsets,
        mean: &[T],
        invstd: &[T],
        relu_out: Option<&[T]>,
        dy: &[T],
        dx: &mut [T],
        grads: &mut [T],
    ) -> Result<()> {
        let (c, g, hw) = (s.c, s.groups, s.hw);
        s.check_backward_train(
            (x.len(), dy.len(), dx.len()),
            (params.len(), grads.len()),
            off,
            (mean.len(), invstd.len()),
        )?;
        if let Some(r) = relu_out {
            check_len("batchnorm relu output", r.len(), 0, s.len())?;
        }
        let m = s.count() as f64;
        // Per (group, channel) as in the forward pass: the sums and then `dx` while the
        // planes of `x`, `dy` and `relu_out` are in cache. Per plane
        // `(sum dy, sum dy (x - mean))`, added in sample order.
        let plane = |n: usize, ch: usize| (n * c + ch) * hw..(n * c + ch + 1) * hw;
        let sums = per_group_channel(s, dx, |b, ch, dxs| {
            let bc = b * c + ch;
            let mu_t = mean[bc];
            let mu = mu_t.to_f64();
            let is = invstd[bc].to_f64();
            let (mut sdy, mut sdx) = (0.0f64, 0.0f64);
            for n in (b..s.n).step_by(g) {
                if n + g < s.n {
                    let next = plane(n + g, ch);
                    prefetch(&x[next.clone()]);
                    prefetch(&dy[next.clone()]);
                    if let Some(ro) = relu_out {
                        prefetch(&ro[next]);
                    }
                }
                let r = plane(n, ch);
                let part =
                    plane_dy_dx(&x[r.clone()], &dy[r.clone()], relu_out.map(|ro| &ro[r]), mu);
                sdy += part.0;
                sdx += part.1;
            }
            let sdx = sdx * is;
            let a = params[off.gamma + ch].to_f64() * is;
            // dx = a (dy - sdy / M) + k (x - mean), with x - mean formed first.
            let kk = T::from_f64(-a * is * sdx / m);
            let c0 = T::from_f64(-a * sdy / m);
            let a = T::from_f64(a);
            for (dxp, n) in dxs.iter_mut().zip((b..s.n).step_by(g)) {
                let r = plane(n, ch);
                let ro = relu_out.map(|ro| &ro[r.clone()]);
                plane_dx(dxp, &x[r.clone()], &dy[r], ro, [a, c0, kk, mu_t]);
            }
            (sdy, sdx)
        });
        for ch in 0..c {
            let sum = |b: usize| sums[b * c + ch];
            let sdx: f64 = (0..g).map(|b| sum(b).1).sum();
            let sdy: f64 = (0..g).map(|b| sum(b).0).sum();
            let gg = &mut grads[off.gamma + ch];
            *gg = T::from_f64(gg.to_f64() + sdx);
            let gb = &mut grads[off.beta + ch];
            *gb = T::from_f64(gb.to_f64() + sdy);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn bn_backward_eval_impl(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &[T],
        params: &[T],
        off: BnOffsets,
        running: &[T],
        dy: &[T],
        dx: &mut [T],
        grads: &mut [T],
    ) -> Result<()> {
        s.check_backward_eval(
            (x.len(), dy.len(), dx.len()),
            (params.len(), grads.len()),
            off,
            running.len(),
        )?;
        let (c, hw) = (s.c, s.hw);
        let inv = |ch: usize| 1.0 / (running[off.var + ch].to_f64() + hp.eps).sqrt();
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (mu, is) = (running[off.mean + ch].to_f64(), inv(ch));
                let (mut sdy, mut sdx) = (0.0, 0.0);
                for n in 0..s.n {
                    let r = (n * c + ch) * hw..(n * c + ch + 1) * hw;
                    for (&xv, &d) in x[r.clone()].iter().zip(&dy[r]) {
                        sdy += d.to_f64();
                        sdx += d.to_f64() * (xv.to_f64() - mu) * is;
                    }
                }
                (sdy, sdx)
            })
            .collect();
        for (ch, &(sdy, sdx)) in sums.iter().enumerate() {
            let gg = &mut grads[off.gamma + ch];
            *gg = T::from_f64(gg.to_f64() + sdx);
            let gb = &mut grads[off.beta + ch];
            *gb = T::from_f64(gb.to_f64() + sdy);
        }
        dx[..s.len()]
            .par_chunks_mut(hw)
            .zip(dy[..s.len()].par_chunks(hw))
            .enumerate()
            .for_each(|(p, (dxp, dyp))| {
                let ch = p % c;
                let a = T::from_f64(params[off.gamma + ch].to_f64() * inv(ch));
                for (d, &v) in dxp.iter_mut().zip(dyp) {
                    *d = a * v;
                }
            });
        Ok(())
    }
}

/// (Group, channel) pairs per work item of the training-mode passes: a pair holds
/// `n / groups * hw` values; small ones are blocked to about 4096 values per item.
fn channels_per_item(s: &BnShape) -> usize {
    (4096 / s.count().max(1)).max(1)
}

/// Runs `f(b, ch, planes)` for every (group `b`, channel `ch`) of `buf` (N x C x HW),
/// `planes` being group `b`'s planes of channel `ch` in sample order, in parallel work
/// items of [`channels_per_item`] consecutive (group, channel) pairs; returns the results
/// indexed `b C + ch`. Each pair's work is the same whatever the blocking.
fn per_group_channel<T: Send, R: Send>(
    s: &BnShape,
    buf: &mut [T],
    f: impl Fn(usize, usize, &mut [&mut [T]]) -> R + Sync,
) -> Vec<R> {
    let (c, g) = (s.c, s.groups);
    let mut planes: Vec<Vec<&mut [T]>> = (0..g * c).map(|_| Vec::with_capacity(s.n / g)).collect();
    for (p, plane) in buf[..s.len()].chunks_mut(s.hw).enumerate() {
        let (n, ch) = (p / c, p % c);
        planes[(n % g) * c + ch].push(plane);
    }
    let cpi = channels_per_item(s);
    let items: Vec<Vec<R>> = planes
        .par_chunks_mut(cpi)
        .enumerate()
        .map(|(i, item)| {
            item.iter_mut()
                .enumerate()
                .map(|(j, pl)| {
                    let bc = i * cpi + j;
                    f(bc / c, bc % c, pl)
                })
                .collect()
        })
        .collect();
    items.into_iter().flatten().collect()
}

/// Asks the CPU to bring `p` into cache: the planes of one (group, channel) are `G C`
/// planes apart in memory, each only a few KB, too short for the hardware prefetcher to
/// lock on before the next jump.
fn prefetch<T>(p: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = std::mem::size_of_val(p);
        let base = p.as_ptr() as *const i8;
        for off in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults and reads nothing the program sees; the
            // address is inside `p`.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(base.add(off))
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// `d` where the ReLU output `r` is positive, else 0 (also for a NaN `r`), the mask of
/// the ReLU backward pass fused into BatchNorm's.
#[inline(always)]
fn relu_mask<T: Scalar>(d: T, r: T) -> T {
    if r > T::ZERO {
        d
    } else {
        T::ZERO
    }
}

/// Planes per work item of the plane-wise passes: about 4096 elements, so small feature
/// maps (7x7) do not pay rayon's per-item cost per plane. Depends on the shape only.
fn planes_per_item(hw: usize) -> usize {
    (4096 / hw.max(1)).max(1)
}

/// Independent f64 accumulators of the plane reductions: a fixed order (lane `i` takes the
/// elements `i mod LANES`, then the lanes are added pairwise, then the tail), so the sums
/// vectorize and do not depend on the thread count.
const LANES: usize = 8;

fn reduce_lanes(a: [f64; LANES]) -> f64 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

multiversion! {
/// Sum of a plane in f64.
pub(super) fn plane_sum<T: Scalar>(p: &[T]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut it = p.chunks_exact(LANES);
    for ch in &mut it {
        for (a, &v) in acc.iter_mut().zip(ch) {
            *a += v.to_f64();
        }
    }
    reduce_lanes(acc) + it.remainder().iter().map(|v| v.to_f64()).sum::<f64>()
}
}

multiversion! {
/// `(sum (x - k), sum (x - k)^2)` over a plane in f64 (the lanes of [`plane_sum`]).
fn plane_sums<T: Scalar>(p: &[T], k: f64) -> (f64, f64) {
    let (mut a1, mut a2) = ([0.0f64; LANES], [0.0f64; LANES]);
    let mut it = p.chunks_exact(LANES);
    for ch in &mut it {
        for l in 0..LANES {
            let d = ch[l].to_f64() - k;
            a1[l] += d;
            a2[l] += d * d;
        }
    }
    let (mut t1, mut t2) = (0.0f64, 0.0f64);
    for v in it.remainder() {
        let d = v.to_f64() - k;
        t1 += d;
        t2 += d * d;
    }
    (reduce_lanes(a1) + t1, reduce_lanes(a2) + t2)
}
}

multiversion! {
/// `(sum dy, sum dy (x - mu))` over a plane in f64, `dy` masked by `relu_out > 0` if given.
/// Lane `l` of the accumulators takes the elements `l mod LANES` (as `plane_sum`); the
/// loops run over exact chunks so that they vectorize.
fn plane_dy_dx<T: Scalar>(x: &[T], dy: &[T], relu_out: Option<&[T]>, mu: f64) -> (f64, f64) {
    let (mut sdy, mut sdx) = ([0.0f64; LANES], [0.0f64; LANES]);
    // One chunk of LANES: whole arrays, so that the loops compile to vector code.
    let mut add = |xs: &[T; LANES], ds: &[T; LANES]| {
        for l in 0..LANES {
            let d = ds[l].to_f64();
            sdy[l] += d;
            sdx[l] += d * (xs[l].to_f64() - mu);
        }
    };
    let full = x.len() / LANES * LANES;
    let (xc, xt) = x.split_at(full);
    let (dc, dt) = dy[..x.len()].split_at(full);
    let mask = relu_mask::<T>;
    let (mut ty, mut tx) = (0.0f64, 0.0f64);
    let mut tail = |xv: T, d: T| {
        let d = d.to_f64();
        ty += d;
        tx += d * (xv.to_f64() - mu);
    };
    match relu_out {
        Some(r) => {
            let (rc, rt) = r[..x.len()].split_at(full);
            for ((xs, ds), rs) in xc
                .chunks_exact(LANES)
                .zip(dc.chunks_exact(LANES))
                .zip(rc.chunks_exact(LANES))
            {
                let mut dm = [T::ZERO; LANES];
                for l in 0..LANES {
                    dm[l] = mask(ds[l], rs[l]);
                }
                add(xs.try_into().expect("LANES"), &dm);
            }
            for ((&xv, &d), &rv) in xt.iter().zip(dt).zip(rt) {
                tail(xv, mask(d, rv));
            }
        }
        None => {
            for (xs, ds) in xc.chunks_exact(LANES).zip(dc.chunks_exact(LANES)) {
                add(xs.try_into().expect("LANES"), ds.try_into().expect("LANES"));
            }
            for (&xv, &d) in xt.iter().zip(dt) {
                tail(xv, d);
            }
        }
    }
    (reduce_lanes(sdy) + ty, reduce_lanes(sdx) + tx)
}
}

multiversion! {
/// `y = (x - mu) scale + beta (+ residual)`, then `max(., 0)` if `relu` (NaN propagates),
/// over one plane.
fn epilogue<T: Scalar>(
    y: &mut [T],
    x: &[T],
    res: Option<&[T]>,
    relu: bool,
    mu: T,
    scale: T,
    beta: T,
) -> () {
    let act = |v: T| {
        // `!(v <= 0)` keeps NaN, as PyTorch's ReLU.
        if relu && v <= T::ZERO {
            T::ZERO
        } else {
            v
        }
    };
    let f = |xv: T| (xv - mu) * scale + beta;
    match res {
        Some(r) => {
            for ((yv, &xv), &rv) in y.iter_mut().zip(x).zip(r) {
                *yv = act(f(xv) + rv);
            }
        }
        None => {
            for (yv, &xv) in y.iter_mut().zip(x) {
                *yv = act(f(xv));
            }
        }
    }
}
}

multiversion! {
/// `dx = a dy' + c0 + kk (x - mu)` over one plane, `[a, c0, kk, mu] = k`, `dy'` being `dy`
/// masked by `relu_out > 0` when given (the backward of BatchNorm + ReLU).
fn plane_dx<T: Scalar>(dx: &mut [T], x: &[T], dy: &[T], relu_out: Option<&[T]>, k: [T; 4]) -> () {
    let [a, c0, kk, mu] = k;
    match relu_out {
        Some(ro) => {
            for (((d, &xv), &dv), &rv) in dx.iter_mut().zip(x).zip(dy).zip(ro) {
                *d = a * relu_mask(dv, rv) + c0 + kk * (xv - mu);
            }
        }
        None => {
            for ((d, &xv), &dv) in dx.iter_mut().zip(x).zip(dy) {
                *d = a * dv + c0 + kk * (xv - mu);
            }
        }
    }
}
}
