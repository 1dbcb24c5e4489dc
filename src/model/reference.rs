//! Plain-loop f64 reference of every layer, written for readability, not speed. Tests
//! compare the backends against these and check gradients by finite differences.
use crate::backend::{BnShape, ConvShape, PoolShape};

/// Convolution. x: N x Cin x H x W, w: Cout x Cin x K x K -> y: N x Cout x Ho x Wo.
pub fn conv2d(s: &ConvShape, x: &[f64], w: &[f64]) -> Vec<f64> {
    let mut y = vec![0.0; s.y_len()];
    for n in 0..s.n {
        for co in 0..s.cout {
            for oy in 0..s.ho {
                for ox in 0..s.wo {
                    let mut acc = 0.0;
                    for ci in 0..s.cin {
                        for ky in 0..s.k {
                            for kx in 0..s.k {
                                let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                                let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                                if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                    continue;
                                }
                                let xi = ((n * s.cin + ci) * s.h + iy as usize) * s.w + ix as usize;
                                let wi = ((co * s.cin + ci) * s.k + ky) * s.k + kx;
                                acc += x[xi] * w[wi];
                            }
                        }
                    }
                    y[((n * s.cout + co) * s.ho + oy) * s.wo + ox] = acc;
                }
            }
        }
    }
    y
}

/// Convolution backward: returns (dx: N x Cin x H x W, dw: Cout x Cin x K x K).
pub fn conv2d_backward(s: &ConvShape, x: &[f64], w: &[f64], dy: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut dx = vec![0.0; s.x_len()];
    let mut dw = vec![0.0; s.w_len()];
    for n in 0..s.n {
        for co in 0..s.cout {
            for oy in 0..s.ho {
                for ox in 0..s.wo {
                    let d = dy[((n * s.cout + co) * s.ho + oy) * s.wo + ox];
                    for ci in 0..s.cin {
                        for ky in 0..s.k {
                            for kx in 0..s.k {
                                let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                                let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                                if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                    continue;
                                }
                                let xi = ((n * s.cin + ci) * s.h + iy as usize) * s.w + ix as usize;
                                let wi = ((co * s.cin + ci) * s.k + ky) * s.k + kx;
                                dx[xi] += d * w[wi];
                                dw[wi] += d * x[xi];
                            }
                        }
                    }
                }
            }
        }
    }
    (dx, dw)
}

/// Training-mode BatchNorm with groups (sample n in group n % G).
/// x: N x C x HW; gamma, beta: C. Returns (y, per-(group, channel) mean, biased var), the
/// statistics laid out G x C.
pub fn batchnorm_train(
    s: &BnShape,
    x: &[f64],
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (c, g, hw) = (s.c, s.groups, s.hw);
    let m = s.count() as f64;
    let mut mean = vec![0.0; g * c];
    let mut var = vec![0.0; g * c];
    for n in 0..s.n {
        for ch in 0..c {
            for i in 0..hw {
                mean[(n % g) * c + ch] += x[(n * c + ch) * hw + i] / m;
            }
        }
    }
    for n in 0..s.n {
        for ch in 0..c {
            for i in 0..hw {
                let d = x[(n * c + ch) * hw + i] - mean[(n % g) * c + ch];
                var[(n % g) * c + ch] += d * d / m;
            }
        }
    }
    let mut y = vec![0.0; s.len()];
    for n in 0..s.n {
        for ch in 0..c {
            let b = (n % g) * c + ch;
            for i in 0..hw {
                let j = (n * c + ch) * hw + i;
                y[j] = (x[j] - mean[b]) / (var[b] + eps).sqrt() * gamma[ch] + beta[ch];
            }
        }
    }
    (y, mean, var)
}

/// Running statistics after one training step of split BatchNorm: each group updates a
/// copy `(1 - m) old + m stat` (variance unbiased), then the copies are averaged.
pub fn batchnorm_running_update(
    s: &BnShape,
    mean: &[f64],
    var: &[f64],
    running_mean: &mut [f64],
    running_var: &mut [f64],
    momentum: f64,
) {
    let m = s.count() as f64;
    for ch in 0..s.c {
        let (mut am, mut av) = (0.0, 0.0);
        for b in 0..s.groups {
            am += (1.0 - momentum) * running_mean[ch] + momentum * mean[b * s.c + ch];
            av += (1.0 - momentum) * running_var[ch] + momentum * var[b * s.c + ch] * m / (m - 1.0);
        }
        running_mean[ch] = am / s.groups as f64;
        running_var[ch] = av / s.groups as f64;
    }
}

/// Inference-mode BatchNorm. x: N x C x HW.
pub fn batchnorm_eval(
    s: &BnShape,
    x: &[f64],
    gamma: &[f64],
    beta: &[f64],
    running_mean: &[f64],
    running_var: &[f64],
    eps: f64,
) -> Vec<f64> {
    let mut y = vec![0.0; s.len()];
    for n in 0..s.n {
        for ch in 0..s.c {
            for i in 0..s.hw {
                let j = (n * s.c + ch) * s.hw + i;
                y[j] = (x[j] - running_mean[ch]) / (running_var[ch] + eps).sqrt() * gamma[ch]
                    + beta[ch];
            }
        }
    }
    y
}

/// Max-pool. x: planes x H x W -> (y: planes x Ho x Wo, argmax within the plane).
pub fn maxpool(s: &PoolShape, x: &[f64]) -> (Vec<f64>, Vec<usize>) {
    let mut y = vec![0.0; s.planes * s.ho * s.wo];
    let mut idx = vec![0; s.planes * s.ho * s.wo];
    for p in 0..s.planes {
        for oy in 0..s.ho {
            for ox in 0..s.wo {
                let mut best = f64::NEG_INFINITY;
                let mut bi = None;
                for ky in 0..s.k {
                    for kx in 0..s.k {
                        let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                        let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                        if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                            continue;
                        }
                        let i = iy as usize * s.w + ix as usize;
                        let v = x[p * s.h * s.w + i];
                        if bi.is_none() || v > best {
                            best = v;
                            bi = Some(i);
                        }
                    }
                }
                let o = (p * s.ho + oy) * s.wo + ox;
                y[o] = best;
                idx[o] = bi.unwrap_or(0);
            }
        }
    }
    (y, idx)
}

/// Global average pool. x: planes x HW -> planes.
pub fn avgpool(planes: usize, hw: usize, x: &[f64]) -> Vec<f64> {
    (0..planes)
        .map(|p| x[p * hw..(p + 1) * hw].iter().sum::<f64>() / hw as f64)
        .collect()
}

/// Linear. x: N x IN, w: OUT x IN, b: OUT -> y: N x OUT.
pub fn linear(n: usize, fin: usize, fout: usize, x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
    let mut y = vec![0.0; n * fout];
    for i in 0..n {
        for o in 0..fout {
            let mut acc = b[o];
            for k in 0..fin {
                acc += x[i * fin + k] * w[o * fin + k];
            }
            y[i * fout + o] = acc;
        }
    }
    y
}

/// SGD with momentum and weight decay, PyTorch semantics, one step in f64.
pub fn sgd_step(p: &mut [f64], g: &[f64], buf: &mut [f64], lr: f64, momentum: f64, wd: f64) {
    for i in 0..p.len() {
        let d = g[i] + wd * p[i];
        buf[i] = momentum * buf[i] + d;
        p[i] -= lr * buf[i];
    }
}
