//! Elementwise layers (ReLU, residual add), pooling and the linear layer.

use rayon::prelude::*;

use super::norm::plane_sum;
use super::{gemm, Cpu, Scalar, ELEM_CHUNK, LINEAR_OUT_COLS, LINEAR_ROWS};
use crate::backend::{check_avgpool, check_len, LinearShape, PoolShape};
use crate::error::{Error, Result};

impl<T: Scalar> Cpu<T> {
    pub(super) fn relu_forward_impl(&self, x: &mut [T]) -> Result<()> {
        x.par_chunks_mut(ELEM_CHUNK).for_each(|c| {
            for v in c {
                // NaN propagates, as in PyTorch (`NaN <= 0` is false); a select, so it
                // vectorizes.
                *v = if *v <= T::ZERO { T::ZERO } else { *v };
            }
        });
        Ok(())
    }

    pub(super) fn relu_backward_impl(&self, y: &[T], dy: &mut [T]) -> Result<()> {
        check_len("relu y", y.len(), 0, dy.len())?;
        dy.par_chunks_mut(ELEM_CHUNK)
            .zip(y.par_chunks(ELEM_CHUNK))
            .for_each(|(d, y)| {
                for (d, &y) in d.iter_mut().zip(y) {
                    *d = if y > T::ZERO { *d } else { T::ZERO };
                }
            });
        Ok(())
    }

    pub(super) fn add_assign_impl(&self, a: &mut [T], b: &[T]) -> Result<()> {
        if a.len() != b.len() {
            return Err(Error::invalid(format!(
                "add: lengths differ ({} and {})",
                a.len(),
                b.len()
            )));
        }
        a.par_chunks_mut(ELEM_CHUNK)
            .zip(b.par_chunks(ELEM_CHUNK))
            .for_each(|(a, b)| {
                for (a, &b) in a.iter_mut().zip(b) {
                    *a += b;
                }
            });
        Ok(())
    }

    // x: planes x H x W -> y: planes x Ho x Wo; first maximum in scan order wins (PyTorch).
    pub(super) fn maxpool_forward_impl(
        &self,
        s: &PoolShape,
        x: &[T],
        y: &mut [T],
        idx: &mut [u32],
    ) -> Result<()> {
        let (hw, hwo) = (s.h * s.w, s.ho * s.wo);
        s.check_forward(x.len(), y.len(), idx.len())?;
        y[..s.planes * hwo]
            .par_chunks_mut(hwo)
            .zip(idx[..s.planes * hwo].par_chunks_mut(hwo))
            .zip(x[..s.planes * hw].par_chunks(hw))
            .for_each(|((yp, ip), xp)| {
                for oy in 0..s.ho {
                    for ox in 0..s.wo {
                        let y0 = (oy * s.stride) as isize - s.pad as isize;
                        let x0 = (ox * s.stride) as isize - s.pad as isize;
                        let (mut best, mut bi) = (T::NEG_INF, usize::MAX);
                        for iy in y0.max(0)..(y0 + s.k as isize).min(s.h as isize) {
                            for ix in x0.max(0)..(x0 + s.k as isize).min(s.w as isize) {
                                let i = iy as usize * s.w + ix as usize;
                                if bi == usize::MAX {
                                    bi = i;
                                }
                                let v = xp[i];
                                if v > best || v.is_nan() {
                                    best = v;
                                    bi = i;
                                    if v.is_nan() {
                                        break;
                                    }
                                }
                            }
                        }
                        yp[oy * s.wo + ox] = xp[bi];
                        ip[oy * s.wo + ox] = bi as u32;
                    }
                }
            });
        Ok(())
    }

    pub(super) fn maxpool_backward_impl(
        &self,
        s: &PoolShape,
        dy: &[T],
        idx: &[u32],
        dx: &mut [T],
    ) -> Result<()> {
        let (hw, hwo) = (s.h * s.w, s.ho * s.wo);
        s.check_backward(dy.len(), idx.len(), dx.len())?;
        dx[..s.planes * hw]
            .par_chunks_mut(hw)
            .zip(dy[..s.planes * hwo].par_chunks(hwo))
            .zip(idx[..s.planes * hwo].par_chunks(hwo))
            .for_each(|((dxp, dyp), ip)| {
                dxp.fill(T::ZERO);
                for (&d, &i) in dyp.iter().zip(ip) {
                    if let Some(t) = dxp.get_mut(i as usize) {
                        *t += d;
                    }
                }
            });
        Ok(())
    }

    pub(super) fn avgpool_forward_impl(
        &self,
        planes: usize,
        hw: usize,
        x: &[T],
        y: &mut [T],
    ) -> Result<()> {
        check_avgpool(planes, hw, ("avgpool x", x.len()), ("avgpool y", y.len()))?;
        y[..planes]
            .par_iter_mut()
            .zip(x[..planes * hw].par_chunks(hw))
            .for_each(|(y, xp)| *y = T::from_f64(plane_sum(xp) / hw as f64));
        Ok(())
    }

    pub(super) fn avgpool_backward_impl(
        &self,
        planes: usize,
        hw: usize,
        dy: &[T],
        dx: &mut [T],
    ) -> Result<()> {
        check_avgpool(
            planes,
            hw,
            ("avgpool dx", dx.len()),
            ("avgpool dy", dy.len()),
        )?;
        let inv = 1.0 / hw as f64;
        dx[..planes * hw]
            .par_chunks_mut(hw)
            .zip(dy[..planes].par_iter())
            .for_each(|(dxp, &d)| dxp.fill(T::from_f64(d.to_f64() * inv)));
        Ok(())
    }

    // x: N x IN, W: OUT x IN, b: OUT, y: N x OUT.
    pub(super) fn linear_forward_impl(
        &self,
        s: &LinearShape,
        x: &[T],
        params: &[T],
        w_off: usize,
        b_off: usize,
        y: &mut [T],
    ) -> Result<()> {
        s.check_forward(x.len(), params.len(), (w_off, b_off), y.len())?;
        let wm = &params[w_off..w_off + s.fout * s.fin];
        let bias = &params[b_off..b_off + s.fout];
        y[..s.n * s.fout]
            .par_chunks_mut(LINEAR_ROWS * s.fout)
            .zip(x[..s.n * s.fin].par_chunks(LINEAR_ROWS * s.fin))
            .for_each(|(yr, xr)| {
                let rows = xr.len() / s.fin;
                for r in 0..rows {
                    yr[r * s.fout..(r + 1) * s.fout].copy_from_slice(bias);
                }
                // y (rows x OUT) += x (rows x IN) . W^T (IN x OUT)
                gemm(
                    rows,
                    s.fin,
                    s.fout,
                    T::from_f64(1.0),
                    xr,
                    (s.fin, 1),
                    wm,
                    (1, s.fin),
                    T::from_f64(1.0),
                    yr,
                    (s.fout, 1),
                );
            });
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear_backward_impl(
        &self,
        s: &LinearShape,
        x: &[T],
        params: &[T],
        w_off: usize,
        b_off: usize,
        dy: &[T],
        dx: Option<&mut [T]>,
        grads: &mut [T],
    ) -> Result<()> {
        s.check_backward(
            (x.len(), dy.len(), dx.as_ref().map(|d| d.len())),
            (params.len(), grads.len()),
            (w_off, b_off),
        )?;
        let one = T::from_f64(1.0);
        let wm = &params[w_off..w_off + s.fout * s.fin];
        if let Some(dx) = dx {
            // dx (rows x IN) = dy (rows x OUT) . W (OUT x IN)
            dx[..s.n * s.fin]
                .par_chunks_mut(LINEAR_ROWS * s.fin)
                .zip(dy[..s.n * s.fout].par_chunks(LINEAR_ROWS * s.fout))
                .for_each(|(dxr, dyr)| {
                    let rows = dyr.len() / s.fout;
                    gemm(
                        rows,
                        s.fout,
                        s.fin,
                        one,
                        dyr,
                        (s.fout, 1),
                        wm,
                        (s.fin, 1),
                        T::ZERO,
                        dxr,
                        (s.fin, 1),
                    );
                });
        }
        // dW[o0..o1] (cols x IN) += dy[:, o0..o1]^T (cols x N) . x (N x IN)
        let (gw, rest) = grads.split_at_mut(w_off + s.fout * s.fin);
        let gw = &mut gw[w_off..];
        gw.par_chunks_mut(LINEAR_OUT_COLS * s.fin)
            .enumerate()
            .for_each(|(ci, gwc)| {
                let o0 = ci * LINEAR_OUT_COLS;
                let cols = gwc.len() / s.fin;
                gemm(
                    cols,
                    s.n,
                    s.fin,
                    one,
                    &dy[o0..],
                    (1, s.fout),
                    x,
                    (s.fin, 1),
                    one,
                    gwc,
                    (s.fin, 1),
                );
            });
        let gb: &mut [T] = if b_off >= w_off + s.fout * s.fin {
            &mut rest[b_off - (w_off + s.fout * s.fin)..][..s.fout]
        } else {
            &mut grads[b_off..b_off + s.fout]
        };
        for (o, g) in gb.iter_mut().enumerate() {
            let sum: f64 = (0..s.n).map(|n| dy[n * s.fout + o].to_f64()).sum();
            *g = T::from_f64(g.to_f64() + sum);
        }
        Ok(())
    }
}
