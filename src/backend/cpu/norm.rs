//! BatchNorm (training and inference, forward and backward) with f64 statistics.

use rayon::prelude::*;

use super::{f64_sum, Cpu, Scalar};
use crate::backend::{check_len, BnOffsets, BnParams, BnShape};
use crate::error::Result;

impl<T: Scalar> Cpu<T> {
    // x: N x C x HW. Group b = samples n with n % G == b; per (b, c) mean and biased var
    // over the (N/G) HW values, in f64.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn bn_forward_train_impl(
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
        bn_checks(s, x.len(), params.len(), off, running.len(), y.len())?;
        let (c, g, hw) = (s.c, s.groups, s.hw);
        check_len("batchnorm mean", mean.len(), 0, g * c)?;
        check_len("batchnorm invstd", invstd.len(), 0, g * c)?;
        let eps = hp.eps;
        let mom = hp.momentum;
        let m = s.count() as f64;
        // stats[ch][b] = (mean, biased var)
        let stats: Vec<Vec<(f64, f64)>> = (0..c)
            .into_par_iter()
            .map(|ch| {
                (0..g)
                    .map(|b| {
                        let planes = (b..s.n)
                            .step_by(g)
                            .map(|n| &x[(n * c + ch) * hw..(n * c + ch + 1) * hw]);
                        let mut sum = 0.0f64;
                        for p in planes.clone() {
                            sum += f64_sum(p.iter().copied());
                        }
                        let mu = sum / m;
                        let mut sq = 0.0f64;
                        for p in planes {
                            for &v in p {
                                let d = v.to_f64() - mu;
                                sq += d * d;
                            }
                        }
                        let var = sq / m;
                        (mu, var)
                    })
                    .collect()
            })
            .collect();
        for (ch, st) in stats.iter().enumerate() {
            let (mut am, mut av) = (0.0, 0.0);
            for (b, &(mu, var)) in st.iter().enumerate() {
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
        let mean = &*mean;
        let invstd = &*invstd;
        y[..s.len()]
            .par_chunks_mut(hw)
            .zip(x[..s.len()].par_chunks(hw))
            .enumerate()
            .for_each(|(p, (yp, xp))| {
                let (n, ch) = (p / c, p % c);
                let b = n % g;
                // y = (x - mean) scale + beta: centering first keeps the precision of values
                // near the mean (x scale + shift would cancel there).
                let scale =
                    T::from_f64(params[off.gamma + ch].to_f64() * invstd[b * c + ch].to_f64());
                let (mu, beta) = (mean[b * c + ch], params[off.beta + ch]);
                for (yv, &xv) in yp.iter_mut().zip(xp) {
                    *yv = (xv - mu) * scale + beta;
                }
            });
        Ok(())
    }

    pub(super) fn bn_forward_eval_impl(
        &self,
        s: &BnShape,
        hp: BnParams,
        x: &Vec<T>,
        params: &Vec<T>,
        off: BnOffsets,
        running: &Vec<T>,
        y: &mut Vec<T>,
    ) -> Result<()> {
        bn_checks(s, x.len(), params.len(), off, running.len(), y.len())?;
        let c = s.c;
        y[..s.len()]
            .par_chunks_mut(s.hw)
            .zip(x[..s.len()].par_chunks(s.hw))
            .enumerate()
            .for_each(|(p, (yp, xp))| {
                let ch = p % c;
                let inv = 1.0 / (running[off.var + ch].to_f64() + hp.eps).sqrt();
                let scale = T::from_f64(params[off.gamma + ch].to_f64() * inv);
                let (mu, beta) = (running[off.mean + ch], params[off.beta + ch]);
                for (yv, &xv) in yp.iter_mut().zip(xp) {
                    *yv = (xv - mu) * scale + beta;
                }
            });
        Ok(())
    }

    // Per (b, c): sdy = sum dy, sdx = sum dy xhat over the group's M values;
    // dx = gamma invstd (dy - sdy / M - xhat sdx / M).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn bn_backward_train_impl(
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
        let (c, g, hw) = (s.c, s.groups, s.hw);
        check_len("batchnorm x", x.len(), 0, s.len())?;
        check_len("batchnorm dy", dy.len(), 0, s.len())?;
        check_len("batchnorm dx", dx.len(), 0, s.len())?;
        check_len("batchnorm mean", mean.len(), 0, g * c)?;
        check_len("batchnorm invstd", invstd.len(), 0, g * c)?;
        for (what, o) in [("gamma", off.gamma), ("beta", off.beta)] {
            check_len(what, params.len(), o, c)?;
            check_len(what, grads.len(), o, c)?;
        }
        let m = s.count() as f64;
        let sums: Vec<Vec<(f64, f64)>> = (0..c)
            .into_par_iter()
            .map(|ch| {
                (0..g)
                    .map(|b| {
                        let mu = mean[b * c + ch].to_f64();
                        let is = invstd[b * c + ch].to_f64();
                        let (mut sdy, mut sdx) = (0.0f64, 0.0f64);
                        for n in (b..s.n).step_by(g) {
                            let r = (n * c + ch) * hw..(n * c + ch + 1) * hw;
                            for (&xv, &d) in x[r.clone()].iter().zip(&dy[r]) {
                                let d = d.to_f64();
                                sdy += d;
                                sdx += d * (xv.to_f64() - mu) * is;
                            }
                        }
                        (sdy, sdx)
                    })
                    .collect()
            })
            .collect();
        for (ch, st) in sums.iter().enumerate() {
            let sdx: f64 = st.iter().map(|v| v.1).sum();
            let sdy: f64 = st.iter().map(|v| v.0).sum();
            let gg = &mut grads[off.gamma + ch];
            *gg = T::from_f64(gg.to_f64() + sdx);
            let gb = &mut grads[off.beta + ch];
            *gb = T::from_f64(gb.to_f64() + sdy);
        }
        dx[..s.len()]
            .par_chunks_mut(hw)
            .enumerate()
            .for_each(|(p, dxp)| {
                let (n, ch) = (p / c, p % c);
                let b = n % g;
                let (sdy, sdx) = sums[ch][b];
                let is = invstd[b * c + ch].to_f64();
                let a = params[off.gamma + ch].to_f64() * is;
                // dx = a (dy - sdy / M) + k (x - mean), with x - mean formed first.
                let k = T::from_f64(-a * is * sdx / m);
                let c0 = T::from_f64(-a * sdy / m);
                let (a, mu) = (T::from_f64(a), mean[b * c + ch]);
                let r = p * hw..(p + 1) * hw;
                for ((d, &xv), &dv) in dxp.iter_mut().zip(&x[r.clone()]).zip(&dy[r]) {
                    *d = a * dv + c0 + k * (xv - mu);
                }
            });
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn bn_backward_eval_impl(
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
        bn_checks(s, x.len(), params.len(), off, running.len(), dx.len())?;
        check_len("batchnorm dy", dy.len(), 0, s.len())?;
        check_len("batchnorm grads", grads.len(), off.gamma.max(off.beta), s.c)?;
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

pub(crate) fn bn_checks(
    s: &BnShape,
    x: usize,
    params: usize,
    off: BnOffsets,
    running: usize,
    y: usize,
) -> Result<()> {
    check_len("batchnorm x", x, 0, s.len())?;
    check_len("batchnorm y", y, 0, s.len())?;
    check_len("batchnorm gamma", params, off.gamma, s.c)?;
    check_len("batchnorm beta", params, off.beta, s.c)?;
    check_len("batchnorm running_mean", running, off.mean, s.c)?;
    check_len("batchnorm running_var", running, off.var, s.c)?;
    Ok(())
}
