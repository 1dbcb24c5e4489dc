//! Every layer against the plain-loop f64 reference (`model::reference`): one test body per
//! layer, run on every backend by [`on_every_backend!`] (the CPU's f32 path always, the
//! CUDA backend when a GPU is present: those are `#[ignore]`d here and run by
//! `scripts/gpu-check`); gradients by finite differences in f64, SGD and the LR schedules.
use moco::backend::cuda::ConvBackend;
use moco::backend::{
    Backend, BnOffsets, BnParams, BnShape, ConvShape, Cpu, Cuda, LinearShape, PoolShape,
};
use moco::model::reference as r;
use moco::testing::{assert_close, normal, uniform};

/// Instantiates each generic test body `fn name<B: Backend>(be: &B)` once per backend:
/// `cpu::name` on `Cpu<f32>`, `cuda::name` on the first GPU with im2col convolutions and
/// `cudnn::name` with cuDNN's (both ignored without a GPU).
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod cpu {
            $(
                #[test]
                fn $name() {
                    super::$name(&moco::backend::Cpu::<f32>::new());
                }
            )*
        }
        mod cuda {
            $(
                #[test]
                #[ignore = "needs a CUDA GPU"]
                fn $name() {
                    super::$name(&super::cuda_backend(super::ConvBackend::Im2col));
                }
            )*
        }
        mod cudnn {
            $(
                #[test]
                #[ignore = "needs a CUDA GPU and cuDNN 9"]
                fn $name() {
                    super::$name(&super::cuda_backend(super::ConvBackend::Cudnn));
                }
            )*
        }
    };
}

on_every_backend!(
    conv_forward_backward_match_reference,
    batchnorm_train_forward_and_running_stats_match_reference,
    pools_relu_linear_match_reference,
    gather_rows_matches_the_host_gather,
    batchnorm_fused_epilogue_and_relu_backward_match_the_f64_composition,
);

/// The shuffle-BN row gather (on the GPU a kernel: nothing comes back to the host) equals
/// indexing on the host, for a permutation, repeated rows and a single row; an index out of
/// range is an error that names it.
fn gather_rows_matches_the_host_gather<B: Backend>(be: &B) {
    let (n, row) = (37, 3 * 5 * 5);
    let x = normal(n * row, 120);
    let xd = up(be, &x);
    let perm: Vec<usize> = (0..n).map(|i| (i * 17 + 5) % n).collect();
    for rows in [perm, vec![4, 4, 0, 36, 4], vec![36]] {
        let got = down(be, &be.gather_rows(&xd, &rows, row).unwrap());
        let want: Vec<f32> = rows
            .iter()
            .flat_map(|&r| x[r * row..(r + 1) * row].iter().copied())
            .collect();
        assert_eq!(got, want, "rows {rows:?}");
    }
    let Err(e) = be.gather_rows(&xd, &[0, 37], row) else {
        panic!("row 37 of 37 accepted");
    };
    assert!(e.to_string().contains("row 37 out of range"), "{e}");
    assert!(
        be.gather_rows(&xd, &[0], row + 1).is_err(),
        "not whole rows"
    );
}

/// The fused BatchNorm epilogue `relu(bn(x) + residual)` and the backward through the ReLU
/// (`relu_bn_backward_train`, dy masked inside) against the separate operations in f64
/// (`Cpu<f64>`: bn, add, ReLU; ReLU backward, bn backward), on edge shapes: groups of 2 and
/// 3, odd channel counts, 1x1 spatial.
fn batchnorm_fused_epilogue_and_relu_backward_match_the_f64_composition<B: Backend>(be: &B) {
    let r64 = Cpu::<f64>::new();
    let hp = BnParams::default();
    for &(n, c, hw, g) in &[(4, 3, 1, 2), (6, 5, 9, 3), (8, 7, 4, 2), (2, 1, 25, 1)] {
        let s = BnShape::new(n, c, hw, g, true).unwrap();
        let x: Vec<f32> = normal(s.len(), 130).iter().map(|v| 1.5 * v + 0.2).collect();
        let res = normal(s.len(), 131);
        let dy = normal(s.len(), 132);
        let (params, off, running0) = bn_setup(c, 133);
        for (with_res, relu) in [(true, true), (false, true), (true, false)] {
            let what = format!("{s:?} residual {with_res} relu {relu}");
            // f64 composition.
            let up64 = |v: &[f32]| f64s(v);
            let (x64, p64) = (up64(&x), up64(&params));
            let mut run64 = up64(&running0);
            let mut y64 = vec![0.0; s.len()];
            let (mut m64, mut is64) = (vec![0.0; g * c], vec![0.0; g * c]);
            r64.bn_forward_train(
                &s, hp, &x64, &p64, off, &mut run64, &mut y64, &mut m64, &mut is64,
            )
            .unwrap();
            if with_res {
                r64.add_assign(&mut y64, &up64(&res)).unwrap();
            }
            if relu {
                r64.relu_forward(&mut y64).unwrap();
            }
            // The backend's fused forward.
            let (xd, pd, rd) = (up(be, &x), up(be, &params), up(be, &res));
            let mut rund = up(be, &running0);
            let mut yd = up(be, &vec![f32::NAN; s.len()]);
            let (mut md, mut isd) = (up(be, &vec![0.0; g * c]), up(be, &vec![0.0; g * c]));
            be.bn_forward_train_fused(
                &s,
                hp,
                &xd,
                &pd,
                off,
                &mut rund,
                with_res.then_some(&rd),
                relu,
                &mut yd,
                &mut md,
                &mut isd,
            )
            .unwrap();
            let y = down(be, &yd);
            assert_close(&format!("fused y {what}"), &y, &f32s(&y64), 1e-5, 1e-5);
            assert_close(
                &format!("running {what}"),
                &down(be, &rund),
                &f32s(&run64),
                1e-6,
                1e-6,
            );
            if !relu {
                continue;
            }
            // Backward through the ReLU: mask by the f64 output, then bn backward.
            let mut d64 = up64(&dy);
            r64.relu_backward(&y64, &mut d64).unwrap();
            let mut dx64 = vec![0.0; s.len()];
            let mut g64 = vec![0.0; params.len()];
            r64.bn_backward_train(&s, &x64, &p64, off, &m64, &is64, &d64, &mut dx64, &mut g64)
                .unwrap();
            let dyd = up(be, &dy);
            let mut dxd = up(be, &vec![f32::NAN; s.len()]);
            let mut gd = up(be, &vec![0.0; params.len()]);
            be.relu_bn_backward_train(&s, &xd, &pd, off, &md, &isd, &yd, &dyd, &mut dxd, &mut gd)
                .unwrap();
            assert_eq!(down(be, &dyd), dy, "dy unchanged {what}");
            // Relative to the incoming gradient: with two values per group the exact dx
            // nearly cancels, so its own norm is no scale for f32 rounding.
            let scale = dy.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            for (name, got, want) in [
                ("dx", down(be, &dxd), &dx64),
                ("dgamma/dbeta", down(be, &gd), &g64),
            ] {
                let err = got
                    .iter()
                    .zip(want.iter())
                    .map(|(&a, &b)| (a as f64 - b).powi(2))
                    .sum::<f64>()
                    .sqrt();
                assert!(
                    err <= 1e-5 * scale,
                    "{name} {what}: error {err:.3e}, 1e-5 of |dy| is {:.3e}",
                    1e-5 * scale
                );
            }
        }
    }
}

/// The TF32 bounds of one convolution case: the relative 2-norm bound
/// ([`moco::testing::tf32_rel_bound`], reduction `cin k k`, one term per output) and the
/// max-abs bound, [`moco::testing::tf32_elem_bound`] times the largest `sum |x| |w|` of an
/// output.
fn tf32_conv_bounds(s: &ConvShape, x: &[f32], w: &[f32]) -> (f64, f64) {
    let abs = |v: &[f32]| v.iter().map(|&a| (a as f64).abs()).collect::<Vec<_>>();
    let mag = r::conv2d(s, &abs(x), &abs(w));
    let big = mag.iter().fold(0.0f64, |a, &b| a.max(b));
    let len = s.cin * s.k * s.k;
    (
        moco::testing::tf32_rel_bound(len, s.y_len()),
        moco::testing::tf32_elem_bound(len) * big,
    )
}

/// `--tf32`: the convolutions through cuDNN and im2col with TF32 tensor cores stay within
/// TF32's rounding of the f64 reference: the bounds of [`tf32_conv_bounds`], derived from
/// TF32's 10-bit mantissa (`moco::testing::tf32_rel_bound`; about 4e-4 to 1e-3 relative by
/// case). `cpu_tf32_bound_accepts_rounding_and_rejects_truncation` shows on the CPU that the
/// bound holds for rounded inputs and fails for truncated ones.
#[test]
#[ignore = "needs a CUDA GPU and cuDNN 9"]
fn tf32_convolutions_stay_within_tf32_rounding() {
    for conv in [ConvBackend::Cudnn, ConvBackend::Im2col] {
        let be = Cuda::with_options(
            moco::testing::test_gpu(),
            moco::backend::cuda::CudaOptions { conv, tf32: true },
        )
        .unwrap();
        for (ci, &(n, cin, hw, cout, k, st, p)) in CONV_CASES.iter().enumerate() {
            let s = ConvShape::new(n, cin, hw, cout, k, st, p).unwrap();
            let x = normal(s.x_len(), 10 + ci as u64);
            let w = normal(s.w_len(), 20 + ci as u64);
            let mut yd = up(&be, &vec![f32::NAN; s.y_len()]);
            be.conv2d_forward(&s, &up(&be, &x), &up(&be, &w), 0, &mut yd)
                .unwrap();
            let yr = r::conv2d(&s, &f64s(&x), &f64s(&w));
            let (rel, abs) = tf32_conv_bounds(&s, &x, &w);
            assert_close(
                &format!("tf32 {conv} y {s:?}"),
                &down(&be, &yd),
                &f32s(&yr),
                rel,
                abs,
            );
        }
    }
}

/// The TF32 bound on the CPU: a convolution over inputs rounded to TF32 (to nearest, as
/// the GPU converts them) stays within [`tf32_conv_bounds`] on every case; over truncated
/// inputs it exceeds the relative bound on the larger cases, and the per-element bound on
/// inputs just below a TF32 step. So a GPU result can fail the bound.
#[test]
fn cpu_tf32_bound_accepts_rounding_and_rejects_truncation() {
    use moco::testing::{rel_err, round_to_tf32, truncate_to_tf32};
    // The convolution (in f64) over inputs converted to TF32 by `f`.
    let conv_tf32 = |s: &ConvShape, x: &[f32], w: &[f32], f: fn(f32) -> f32| -> Vec<f32> {
        let tf32 = |v: &[f32]| -> Vec<f64> { v.iter().map(|&a| f(a) as f64).collect() };
        f32s(&r::conv2d(s, &tf32(x), &tf32(w)))
    };
    let mut truncation_failed = 0;
    for (ci, &(n, cin, hw, cout, k, st, p)) in CONV_CASES.iter().enumerate() {
        let s = ConvShape::new(n, cin, hw, cout, k, st, p).unwrap();
        let x = normal(s.x_len(), 10 + ci as u64);
        let w = normal(s.w_len(), 20 + ci as u64);
        let yr = f32s(&r::conv2d(&s, &f64s(&x), &f64s(&w)));
        let (rel, abs) = tf32_conv_bounds(&s, &x, &w);
        let rounded = conv_tf32(&s, &x, &w, round_to_tf32);
        assert_close(&format!("rounded {s:?}"), &rounded, &yr, rel, abs);
        let truncated = conv_tf32(&s, &x, &w, truncate_to_tf32);
        let (e, _) = rel_err(&truncated, &yr);
        if e > rel {
            truncation_failed += 1;
        }
    }
    assert!(
        truncation_failed >= CONV_CASES.len() / 2,
        "truncation exceeded the bound on only {truncation_failed} of {} cases",
        CONV_CASES.len()
    );
    // Per element: inputs just below 1 + 2^-10 (a TF32 step) lose almost 2^-10 each when
    // truncated, 4u per product, twice the worst case of rounding.
    let s = ConvShape::new(1, 4, (5, 5), 2, 3, 1, 1).unwrap();
    let v = 1.0f32 + 1.0 / 1024.0 - 1.0 / 1_048_576.0;
    let (x, w) = (vec![v; s.x_len()], vec![v; s.w_len()]);
    let yr = f32s(&r::conv2d(&s, &f64s(&x), &f64s(&w)));
    let (rel, abs) = tf32_conv_bounds(&s, &x, &w);
    let rounded = conv_tf32(&s, &x, &w, round_to_tf32);
    assert_close("rounded, near a step", &rounded, &yr, rel, abs);
    let truncated = conv_tf32(&s, &x, &w, truncate_to_tf32);
    let (_, worst) = rel_err(&truncated, &yr);
    assert!(worst > abs, "truncated: max abs {worst:e} within {abs:e}");
}

fn cuda_backend(conv: ConvBackend) -> Cuda {
    Cuda::with_conv(moco::testing::test_gpu(), conv).expect("CUDA backend")
}

/// Host values into a new buffer of `be`.
fn up<B: Backend>(be: &B, v: &[f32]) -> B::Buf {
    be.upload_f32(v).unwrap()
}
/// A buffer's values on the host.
fn down<B: Backend>(be: &B, b: &B::Buf) -> Vec<f32> {
    be.download_f32(b).unwrap()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}
fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}
fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Central finite differences of `loss` with respect to `v[i]` for the given indices,
/// compared with `analytic[i]`.
#[track_caller]
fn fd_check(
    what: &str,
    v: &mut [f64],
    idx: impl IntoIterator<Item = usize>,
    analytic: &[f64],
    mut loss: impl FnMut(&[f64]) -> f64,
) {
    let h = 1e-5;
    let mut worst = 0.0f64;
    for i in idx {
        let old = v[i];
        v[i] = old + h;
        let lp = loss(v);
        v[i] = old - h;
        let lm = loss(v);
        v[i] = old;
        let fd = (lp - lm) / (2.0 * h);
        let err = (fd - analytic[i]).abs() / (fd.abs() + analytic[i].abs() + 1e-3);
        assert!(
            err < 1e-6,
            "{what}[{i}]: finite difference {fd:.10e} vs analytic {:.10e} (rel {err:.2e})",
            analytic[i]
        );
        worst = worst.max(err);
    }
    assert!(worst.is_finite());
}

/// Indices 0..n, or a seeded sample of `k` of them when n is large.
fn some(n: usize, k: usize, seed: u64) -> Vec<usize> {
    if n <= k {
        return (0..n).collect();
    }
    let u = uniform(k, seed);
    u.iter()
        .map(|&x| ((x as f64 + 1.0) / 2.0 * n as f64) as usize % n)
        .collect()
}

/// n, cin, (h, w), cout, k, stride, pad
type ConvCase = (usize, usize, (usize, usize), usize, usize, usize, usize);

const CONV_CASES: &[ConvCase] = &[
    // n, cin, (h, w), cout, k, stride, pad
    (1, 1, (5, 5), 1, 3, 1, 1),
    (2, 3, (8, 8), 4, 3, 1, 1),
    (3, 3, (9, 7), 5, 3, 2, 1),
    (2, 4, (6, 6), 6, 1, 1, 0),
    (2, 4, (7, 9), 3, 1, 2, 0),
    (2, 3, (13, 11), 4, 7, 2, 3),
    (5, 2, (4, 4), 3, 3, 2, 1),
    (9, 2, (3, 3), 2, 3, 1, 1),
    // Batches large enough that several samples share one GEMM (and an uneven last group).
    (20, 3, (4, 4), 5, 3, 1, 1),
    (37, 2, (5, 6), 3, 3, 2, 1),
    (24, 4, (3, 3), 6, 1, 1, 0),
    (35, 3, (2, 2), 4, 1, 2, 0),
    (100, 2, (8, 8), 3, 3, 1, 1),
    // Stride-1 "same" convolutions on images narrower than the kernel's reach (the shifted
    // im2col rows and the transposed-convolution input gradient).
    (2, 2, (1, 1), 3, 3, 1, 1),
    (3, 2, (2, 3), 2, 5, 1, 2),
    (2, 3, (1, 6), 2, 3, 1, 1),
    (1, 2, (7, 5), 3, 5, 1, 2),
];

/// Weights at an offset of 3 floats and weight gradients at 2: unaligned for cuDNN's
/// 16-byte engines, so the cuDNN backend runs them through aligned copies.
fn conv_forward_backward_match_reference<B: Backend>(be: &B) {
    conv_forward_backward_at(be, 3, 2);
}

/// cuDNN with weights and gradients at 16-byte aligned offsets, as the networks place them
/// (no staging copy; `network_convolution_weights_are_aligned` checks the networks).
#[test]
#[ignore = "needs a CUDA GPU and cuDNN 9"]
fn cudnn_conv_with_aligned_weights_matches_reference() {
    let be = cuda_backend(ConvBackend::Cudnn);
    conv_forward_backward_at(&be, 0, 0);
    conv_forward_backward_at(&be, 4, 8);
}

/// The convolution cases with the weight at `wo` floats and the weight gradient at `go`
/// floats into their buffers.
fn conv_forward_backward_at<B: Backend>(be: &B, wo: usize, go: usize) {
    for (ci, &(n, cin, hw, cout, k, st, p)) in CONV_CASES.iter().enumerate() {
        let s = ConvShape::new(n, cin, hw, cout, k, st, p).unwrap();
        let x = normal(s.x_len(), 10 + ci as u64);
        let w = normal(s.w_len() + wo, 20 + ci as u64);
        let dy = normal(s.y_len(), 30 + ci as u64);
        let (xd, wd, dyd) = (up(be, &x), up(be, &w), up(be, &dy));
        let mut yd = up(be, &vec![f32::NAN; s.y_len()]);
        be.conv2d_forward(&s, &xd, &wd, wo, &mut yd).unwrap();
        let y = down(be, &yd);
        let yr = r::conv2d(&s, &f64s(&x), &f64s(&w[wo..]));
        assert_close(&format!("conv y {s:?}"), &y, &f32s(&yr), 1e-5, 1e-4);
        let mut dxd = up(be, &vec![f32::NAN; s.x_len()]);
        let mut dwd = up(be, &vec![1.0f32; s.w_len() + go]);
        be.conv2d_backward(&s, &xd, &wd, wo, &dyd, Some(&mut dxd), &mut dwd, go)
            .unwrap();
        let (dx, dw) = (down(be, &dxd), down(be, &dwd));
        let (dxr, dwr) = r::conv2d_backward(&s, &f64s(&x), &f64s(&w[wo..]), &f64s(&dy));
        assert_close(&format!("conv dx {s:?}"), &dx, &f32s(&dxr), 1e-5, 1e-4);
        let dwr1: Vec<f32> = dwr.iter().map(|v| (v + 1.0) as f32).collect();
        assert_close(
            &format!("conv dw (accumulated) {s:?}"),
            &dw[go..],
            &dwr1,
            1e-5,
            1e-3,
        );
        assert!(
            dw[..go].iter().all(|&v| v == 1.0),
            "conv dw: elements before the offset untouched"
        );
        // Without dx, the same dw.
        let mut dw2d = up(be, &vec![1.0f32; s.w_len() + go]);
        be.conv2d_backward(&s, &xd, &wd, wo, &dyd, None, &mut dw2d, go)
            .unwrap();
        assert_eq!(dw, down(be, &dw2d));
    }
}

#[test]
fn conv_gradients_finite_differences_f64() {
    let be = Cpu::<f64>::new();
    for (ci, &(n, cin, hw, cout, k, st, p)) in CONV_CASES.iter().enumerate() {
        let s = ConvShape::new(n, cin, hw, cout, k, st, p).unwrap();
        let mut x = f64s(&normal(s.x_len(), 40 + ci as u64));
        let mut w = f64s(&normal(s.w_len(), 50 + ci as u64));
        let rr = f64s(&normal(s.y_len(), 60 + ci as u64));
        let mut dx = vec![0.0; s.x_len()];
        let mut dw = vec![0.0; s.w_len()];
        be.conv2d_backward(&s, &x, &w, 0, &rr, Some(&mut dx), &mut dw, 0)
            .unwrap();
        let loss = |x: &[f64], w: &[f64]| {
            let mut y = vec![0.0; s.y_len()];
            be.conv2d_forward(&s, &x.to_vec(), &w.to_vec(), 0, &mut y)
                .unwrap();
            dot(&y, &rr)
        };
        let w0 = w.clone();
        fd_check("conv dx", &mut x, some(s.x_len(), 40, 1), &dx, |x| {
            loss(x, &w0)
        });
        let x0 = x.clone();
        fd_check("conv dw", &mut w, some(s.w_len(), 40, 2), &dw, |w| {
            loss(&x0, w)
        });
    }
}

fn bn_setup(c: usize, seed: u64) -> (Vec<f32>, BnOffsets, Vec<f32>) {
    // params: [pad, gamma (C), beta (C)], running: [mean (C), var (C)]
    let mut params = vec![0.5f32];
    params.extend(uniform(c, seed).iter().map(|v| 1.0 + 0.5 * v));
    params.extend(uniform(c, seed + 1).iter().map(|v| 0.3 * v));
    let mut running = uniform(c, seed + 2);
    running.extend(uniform(c, seed + 3).iter().map(|v| 1.0 + 0.5 * v));
    let off = BnOffsets {
        gamma: 1,
        beta: 1 + c,
        mean: 0,
        var: c,
    };
    (params, off, running)
}

fn batchnorm_train_forward_and_running_stats_match_reference<B: Backend>(be: &B) {
    for &(n, c, hw, g) in &[
        (2, 3, 4, 1),
        (4, 2, 9, 2),
        (8, 5, 1, 4),
        (6, 3, 5, 3),
        (16, 4, 16, 8),
        (3, 1, 1, 1),
    ] {
        let s = BnShape::new(n, c, hw, g, true).unwrap();
        let x: Vec<f32> = normal(s.len(), 7).iter().map(|v| 2.0 * v + 0.7).collect();
        let (params, off, running0) = bn_setup(c, 11);
        let (xd, pd) = (up(be, &x), up(be, &params));
        let mut runningd = up(be, &running0);
        let mut yd = up(be, &vec![f32::NAN; s.len()]);
        let (mut meand, mut invstdd) = (up(be, &vec![0.0; g * c]), up(be, &vec![0.0; g * c]));
        let hp = BnParams::default();
        be.bn_forward_train(
            &s,
            hp,
            &xd,
            &pd,
            off,
            &mut runningd,
            &mut yd,
            &mut meand,
            &mut invstdd,
        )
        .unwrap();
        let (y, mean, running) = (down(be, &yd), down(be, &meand), down(be, &runningd));
        let p = f64s(&params);
        let (yr, mr, vr) = r::batchnorm_train(&s, &f64s(&x), &p[1..1 + c], &p[1 + c..], 1e-5);
        assert_close("bn train y", &y, &f32s(&yr), 1e-6, 1e-5);
        assert_close("bn mean", &mean, &f32s(&mr), 1e-6, 1e-6);
        let mut rm = f64s(&running0[..c]);
        let mut rv = f64s(&running0[c..]);
        r::batchnorm_running_update(&s, &mr, &vr, &mut rm, &mut rv, 0.1);
        assert_close("bn running_mean", &running[..c], &f32s(&rm), 1e-6, 1e-6);
        assert_close("bn running_var", &running[c..], &f32s(&rv), 1e-6, 1e-6);
        // Eval mode with the running statistics.
        be.bn_forward_eval(&s, hp, &xd, &pd, off, &runningd, &mut yd)
            .unwrap();
        let y = down(be, &yd);
        let ye = r::batchnorm_eval(&s, &f64s(&x), &p[1..1 + c], &p[1 + c..], &rm, &rv, 1e-5);
        assert_close("bn eval y", &y, &f32s(&ye), 1e-6, 1e-5);
    }
}

/// Statistics of data far from zero: a mean 1e8 (f64) or 1e3 (f32) standard deviations
/// away. Sums of x and x^2 in one pass would lose the variance to cancellation (about
/// 1e16 / 1 ulps of f64); the batch variance must still match the two-pass reference.
#[test]
fn batchnorm_statistics_survive_a_large_mean() {
    fn check<T: moco::backend::Scalar>(offset: f64, tol: f64) {
        let be = Cpu::<T>::new();
        let s = BnShape::new(16, 3, 25, 4, true).unwrap();
        let xf: Vec<f64> = normal(s.len(), 5)
            .iter()
            .map(|&v| offset + v as f64)
            .collect();
        let x: Vec<T> = xf.iter().map(|&v| T::from_f64(v)).collect();
        // The reference on the values as the backend holds them.
        let xr: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
        let (params, off, running0) = bn_setup(3, 11);
        let params: Vec<T> = params.iter().map(|&v| T::from_f64(v as f64)).collect();
        let mut running: Vec<T> = running0.iter().map(|&v| T::from_f64(v as f64)).collect();
        let mut y = vec![T::from_f64(f64::NAN); s.len()];
        let (mut mean, mut invstd) = (vec![T::ZERO; 12], vec![T::ZERO; 12]);
        be.bn_forward_train(
            &s,
            BnParams::default(),
            &x,
            &params,
            off,
            &mut running,
            &mut y,
            &mut mean,
            &mut invstd,
        )
        .unwrap();
        let p: Vec<f64> = params.iter().map(|v| v.to_f64()).collect();
        let (_, mr, vr) = r::batchnorm_train(&s, &xr, &p[1..4], &p[4..], 1e-5);
        for i in 0..12 {
            let want = 1.0 / (vr[i] + 1e-5).sqrt();
            let got = invstd[i].to_f64();
            assert!(
                (got - want).abs() <= tol * want,
                "{} offset {offset}: invstd[{i}] {got}, the two-pass reference {want}",
                T::NAME
            );
            let m = mean[i].to_f64();
            assert!(
                (m - mr[i]).abs() <= tol * mr[i].abs(),
                "mean[{i}] {m} vs {}",
                mr[i]
            );
        }
    }
    check::<f64>(1e8, 1e-9);
    check::<f32>(1e3, 1e-5);
}

#[test]
fn batchnorm_split_groups_are_interleaved_like_pytorch() {
    // PyTorch's split BN views N x C as (N/G) x (G C): sample n is in group n % G.
    let be = Cpu::<f64>::new();
    let s = BnShape::new(4, 1, 1, 2, true).unwrap();
    let x = vec![0.0, 10.0, 2.0, 14.0];
    let params = vec![1.0, 0.0];
    let off = BnOffsets {
        gamma: 0,
        beta: 1,
        mean: 0,
        var: 1,
    };
    let mut running = vec![0.0, 1.0];
    let mut y = vec![0.0; 4];
    let (mut m, mut is) = (vec![0.0; 2], vec![0.0; 2]);
    be.bn_forward_train(
        &s,
        BnParams::default(),
        &x,
        &params,
        off,
        &mut running,
        &mut y,
        &mut m,
        &mut is,
    )
    .unwrap();
    assert_eq!(m, vec![1.0, 12.0]);
    // Running mean: average of 0.1 * 1 and 0.1 * 12; unbiased variances 2 and 8.
    assert!((running[0] - 0.65).abs() < 1e-12, "{running:?}");
    assert!(
        (running[1] - (0.9 + 0.1 * 5.0)).abs() < 1e-12,
        "{running:?}"
    );
}

#[test]
fn batchnorm_gradients_finite_differences_f64() {
    let be = Cpu::<f64>::new();
    for &(n, c, hw, g, train) in &[
        (2, 3, 4, 1, true),
        (4, 2, 3, 2, true),
        (6, 2, 1, 3, true),
        (3, 2, 5, 1, false),
    ] {
        let s = BnShape::new(n, c, hw, g, train).unwrap();
        let mut x = f64s(&normal(s.len(), 70));
        let (p32, off, run32) = bn_setup(c, 12);
        let mut params = f64s(&p32);
        let running = f64s(&run32);
        let rr = f64s(&normal(s.len(), 71));
        let hp = BnParams::default();
        let fwd = |x: &[f64], params: &[f64]| {
            let mut y = vec![0.0; s.len()];
            let mut run = running.clone();
            let (mut m, mut is) = (vec![0.0; g * c], vec![0.0; g * c]);
            if train {
                be.bn_forward_train(
                    &s,
                    hp,
                    &x.to_vec(),
                    &params.to_vec(),
                    off,
                    &mut run,
                    &mut y,
                    &mut m,
                    &mut is,
                )
                .unwrap();
            } else {
                be.bn_forward_eval(&s, hp, &x.to_vec(), &params.to_vec(), off, &run, &mut y)
                    .unwrap();
            }
            (y, m, is)
        };
        let (_, m, is) = fwd(&x, &params);
        let mut dx = vec![0.0; s.len()];
        let mut grads = vec![0.0; params.len()];
        if train {
            be.bn_backward_train(&s, &x, &params, off, &m, &is, &rr, &mut dx, &mut grads)
                .unwrap();
        } else {
            be.bn_backward_eval(&s, hp, &x, &params, off, &running, &rr, &mut dx, &mut grads)
                .unwrap();
        }
        let p0 = params.clone();
        fd_check("bn dx", &mut x, 0..s.len(), &dx, |x| {
            dot(&fwd(x, &p0).0, &rr)
        });
        let x0 = x.clone();
        fd_check("bn dgamma/dbeta", &mut params, 1..1 + 2 * c, &grads, |p| {
            dot(&fwd(&x0, p).0, &rr)
        });
    }
}

#[test]
fn batchnorm_rejects_bad_shapes() {
    assert!(
        BnShape::new(6, 2, 1, 4, true).is_err(),
        "splits must divide the batch"
    );
    assert!(
        BnShape::new(2, 2, 1, 2, true).is_err(),
        "one value per group and channel"
    );
    assert!(
        BnShape::new(2, 2, 1, 2, false).is_ok(),
        "fine in inference mode"
    );
}

fn pools_relu_linear_match_reference<B: Backend>(be: &B) {
    for &(planes, h, w) in &[(3, 8, 8), (2, 7, 5), (1, 2, 2), (4, 1, 1), (2, 112, 112)] {
        let s = PoolShape::new(planes, (h, w), 3, 2, 1).unwrap();
        let x = normal(planes * h * w, 80);
        let xd = up(be, &x);
        let mut yd = up(be, &vec![f32::NAN; planes * s.ho * s.wo]);
        let mut idxd = be.zeros_idx(planes * s.ho * s.wo).unwrap();
        be.maxpool_forward(&s, &xd, &mut yd, &mut idxd).unwrap();
        let (yr, ir) = r::maxpool(&s, &f64s(&x));
        assert_eq!(down(be, &yd), f32s(&yr));
        // The argmax indices, seen through the backward of dy = 1: each input counts the
        // windows whose maximum (the reference's index within the plane) it is.
        let mut dxd = up(be, &vec![f32::NAN; planes * h * w]);
        be.maxpool_backward(&s, &up(be, &vec![1.0; yr.len()]), &idxd, &mut dxd)
            .unwrap();
        let mut counts = vec![0.0f32; planes * h * w];
        for (o, &i) in ir.iter().enumerate() {
            counts[o / (s.ho * s.wo) * h * w + i] += 1.0;
        }
        assert_eq!(down(be, &dxd), counts, "maxpool argmax {s:?}");
        let mut ad = up(be, &vec![f32::NAN; planes]);
        be.avgpool_forward(planes, h * w, &xd, &mut ad).unwrap();
        assert_close(
            "avgpool",
            &down(be, &ad),
            &f32s(&r::avgpool(planes, h * w, &f64s(&x))),
            1e-6,
            1e-6,
        );
    }
    for &(n, fin, fout) in &[(1, 1, 1), (3, 5, 7), (17, 64, 128), (40, 33, 65)] {
        let s = LinearShape { n, fin, fout };
        let x = normal(n * fin, 81);
        let params = normal(fout * fin + fout + 1, 82);
        let mut yd = up(be, &vec![f32::NAN; n * fout]);
        be.linear_forward(
            &s,
            &up(be, &x),
            &up(be, &params),
            1,
            1 + fout * fin,
            &mut yd,
        )
        .unwrap();
        let p = f64s(&params);
        let yr = r::linear(
            n,
            fin,
            fout,
            &f64s(&x),
            &p[1..1 + fout * fin],
            &p[1 + fout * fin..],
        );
        assert_close("linear", &down(be, &yd), &f32s(&yr), 1e-5, 1e-4);
    }
    let mut xd = up(be, &[-1.0f32, 0.0, 2.0, -0.5]);
    be.relu_forward(&mut xd).unwrap();
    assert_eq!(down(be, &xd), vec![0.0, 0.0, 2.0, 0.0]);
    let mut dd = up(be, &[1.0f32; 4]);
    be.relu_backward(&xd, &mut dd).unwrap();
    assert_eq!(down(be, &dd), vec![0.0, 0.0, 1.0, 0.0]);
}

#[test]
fn pools_linear_gradients_finite_differences_f64() {
    let be = Cpu::<f64>::new();
    // Max-pool (distinct values: no ties within a window).
    let s = PoolShape::new(3, (7, 6), 3, 2, 1).unwrap();
    let mut x = f64s(&uniform(3 * 7 * 6, 90));
    let rr = f64s(&normal(3 * s.ho * s.wo, 91));
    let fwd = |x: &[f64]| {
        let mut y = vec![0.0; rr.len()];
        let mut idx = vec![0; rr.len()];
        be.maxpool_forward(&s, &x.to_vec(), &mut y, &mut idx)
            .unwrap();
        (y, idx)
    };
    let (_, idx) = fwd(&x);
    let mut dx = vec![0.0; x.len()];
    be.maxpool_backward(&s, &rr, &idx, &mut dx).unwrap();
    let nx = x.len();
    fd_check("maxpool dx", &mut x, 0..nx, &dx, |x| dot(&fwd(x).0, &rr));
    // Average pool.
    let mut x = f64s(&normal(4 * 9, 92));
    let rr = f64s(&normal(4, 93));
    let mut dx = vec![0.0; x.len()];
    be.avgpool_backward(4, 9, &rr, &mut dx).unwrap();
    fd_check("avgpool dx", &mut x, 0..36, &dx, |x| {
        let mut y = vec![0.0; 4];
        be.avgpool_forward(4, 9, &x.to_vec(), &mut y).unwrap();
        dot(&y, &rr)
    });
    // Linear, with the weight at an offset.
    for &(n, fin, fout) in &[(3, 4, 5), (20, 7, 40), (1, 3, 1)] {
        let s = LinearShape { n, fin, fout };
        let mut x = f64s(&normal(n * fin, 94));
        let mut p = f64s(&normal(2 + fout * fin + fout, 95));
        let rr = f64s(&normal(n * fout, 96));
        let (wo, bo) = (2, 2 + fout * fin);
        let loss = |x: &[f64], p: &[f64]| {
            let mut y = vec![0.0; n * fout];
            be.linear_forward(&s, &x.to_vec(), &p.to_vec(), wo, bo, &mut y)
                .unwrap();
            dot(&y, &rr)
        };
        let mut dx = vec![0.0; n * fin];
        let mut g = vec![0.0; p.len()];
        be.linear_backward(&s, &x, &p, wo, bo, &rr, Some(&mut dx), &mut g)
            .unwrap();
        assert_eq!(&g[..2], &[0.0, 0.0]);
        let p0 = p.clone();
        fd_check("linear dx", &mut x, 0..n * fin, &dx, |x| loss(x, &p0));
        let x0 = x.clone();
        fd_check("linear dw db", &mut p, 2..p0.len(), &g, |p| loss(&x0, p));
    }
    // ReLU (away from the kink).
    let mut x: Vec<f64> = f64s(&uniform(50, 97))
        .iter()
        .map(|v| v + 0.01f64.copysign(*v))
        .collect();
    let rr = f64s(&normal(50, 98));
    let mut y = x.clone();
    be.relu_forward(&mut y).unwrap();
    let mut d = rr.clone();
    be.relu_backward(&y, &mut d).unwrap();
    fd_check("relu dx", &mut x, 0..50, &d, |x| {
        let mut y = x.to_vec();
        be.relu_forward(&mut y).unwrap();
        dot(&y, &rr)
    });
}

#[test]
fn sgd_matches_pytorch_formula() {
    let be = Cpu::<f32>::new();
    let n = 70_001;
    let mut p = normal(n, 100);
    let g = normal(n, 101);
    let mut opt = moco::optim::Sgd::new(be, n, 0.9, 5e-4).unwrap();
    let (mut pr, mut br) = (f64s(&p), vec![0.0; n]);
    for step in 0..3 {
        opt.step(&mut p, &g, 0.06 / (step + 1) as f64).unwrap();
        r::sgd_step(
            &mut pr,
            &f64s(&g),
            &mut br,
            0.06 / (step + 1) as f64,
            0.9,
            5e-4,
        );
    }
    assert_close("sgd params", &p, &f32s(&pr), 1e-6, 1e-6);
    assert_close(
        "sgd momentum",
        opt.momentum_buffer(),
        &f32s(&br),
        1e-6,
        1e-6,
    );
    assert!(opt.step(&mut p, &g[..5].to_vec(), 0.1).is_err());
    assert!(opt.step(&mut p, &g, f64::NAN).is_err());
    // Finite in f64 but infinite once rounded to the f32 the backend computes with.
    assert!(opt.step(&mut p, &g, 1e39).is_err());
    assert!(moco::optim::Sgd::new(be, 3, 1.5, 0.0).is_err());
    assert!(moco::optim::Sgd::new(be, 3, 0.9, 1e39).is_err());
}

#[test]
fn sgd_in_f64_takes_its_hyperparameters_in_f64() {
    // The f64 backend uses lr, momentum and weight decay unrounded: its step equals the
    // f64 reference to the last bit or two, where rounding them to f32 would change the
    // update by about 1e-8 relative.
    let be = Cpu::<f64>::new();
    let n = 10_007;
    let mut p = f64s(&normal(n, 100));
    let g = f64s(&normal(n, 101));
    let mut opt = moco::optim::Sgd::new(be, n, 0.9, 5e-4).unwrap();
    let (mut pr, mut br) = (p.clone(), vec![0.0; n]);
    for step in 0..3 {
        let lr = 0.1 / (step + 1) as f64;
        opt.step(&mut p, &g, lr).unwrap();
        r::sgd_step(&mut pr, &g, &mut br, lr, 0.9, 5e-4);
    }
    let rel = p
        .iter()
        .zip(&pr)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1e-300))
        .fold(0.0f64, f64::max);
    assert!(rel <= 1e-15, "f64 SGD vs reference: max rel {rel:e}");
}

#[test]
fn lr_schedules() {
    use moco::optim::{Decay, LrSchedule};
    let cos = LrSchedule {
        base_lr: 0.06,
        epochs: 200,
        steps_per_epoch: 10,
        warmup_epochs: 0,
        decay: Decay::Cosine { per_step: false },
    };
    cos.validate().unwrap();
    assert!((cos.lr_at(0) - 0.06).abs() < 1e-12);
    assert!(
        (cos.lr_at(9) - 0.06).abs() < 1e-12,
        "per epoch: constant within an epoch"
    );
    assert!((cos.lr_at(1000) - 0.03).abs() < 1e-12, "half way");
    let e199 = 0.06 * 0.5 * (1.0 + (std::f64::consts::PI * 199.0 / 200.0).cos());
    assert!((cos.lr_at(1999) - e199).abs() < 1e-12);
    let per_step = LrSchedule {
        decay: Decay::Cosine { per_step: true },
        ..cos.clone()
    };
    assert!(per_step.lr_at(5) < per_step.lr_at(4));
    let step = LrSchedule {
        base_lr: 0.03,
        epochs: 200,
        steps_per_epoch: 5,
        warmup_epochs: 0,
        decay: Decay::Step {
            milestones: vec![120, 160],
            gamma: 0.1,
        },
    };
    assert!((step.lr_at(599) - 0.03).abs() < 1e-12);
    assert!((step.lr_at(600) - 0.003).abs() < 1e-12);
    assert!((step.lr_at(800) - 0.0003).abs() < 1e-12);
    let warm = LrSchedule {
        warmup_epochs: 2,
        ..cos.clone()
    };
    assert!((warm.lr_at(0) - 0.003).abs() < 1e-12);
    assert!((warm.lr_at(19) - 0.06).abs() < 1e-12);
    assert!(
        (warm.lr_at(20) - 0.06).abs() < 1e-12,
        "cosine starts after the warmup"
    );
    assert!(LrSchedule {
        warmup_epochs: 200,
        ..cos.clone()
    }
    .validate()
    .is_err());
    assert!(LrSchedule {
        base_lr: f64::NAN,
        ..cos
    }
    .validate()
    .is_err());
}

#[test]
fn bad_lengths_are_errors_not_panics() {
    let be = Cpu::<f32>::new();
    let s = ConvShape::new(2, 3, (8, 8), 4, 3, 1, 1).unwrap();
    let mut y = vec![0.0; s.y_len()];
    let e = be
        .conv2d_forward(&s, &vec![0.0; 10], &vec![0.0; s.w_len()], 0, &mut y)
        .unwrap_err();
    assert!(e.to_string().contains("too small"), "{e}");
    assert!(be
        .conv2d_forward(&s, &vec![0.0; s.x_len()], &vec![0.0; s.w_len()], 1, &mut y)
        .is_err());
    assert!(ConvShape::new(1, 1, (2, 2), 1, 7, 2, 0).is_err());
    assert!(PoolShape::new(1, (1, 1), 3, 2, 0).is_err());
}

/// Runs `op` on outputs filled with `fill`, returning them.
fn outputs_after<const K: usize>(
    lens: [usize; K],
    fill: f32,
    op: impl Fn(&mut [Vec<f32>; K]),
) -> [Vec<f32>; K] {
    let mut outs = lens.map(|n| vec![fill; n]);
    op(&mut outs);
    outs
}

/// Asserts that `op`'s outputs do not depend on what they held: the CPU backend's
/// `Backend::reuse` hands out buffers of earlier steps without zeroing them.
fn check_overwrites<const K: usize>(what: &str, lens: [usize; K], op: impl Fn(&mut [Vec<f32>; K])) {
    let zero = outputs_after(lens, 0.0, &op);
    let nan = outputs_after(lens, f32::NAN, &op);
    let big = outputs_after(lens, 1e30, &op);
    for (i, z) in zero.iter().enumerate() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(z),
            bits(&nan[i]),
            "{what}: output {i} read its NaN fill"
        );
        assert_eq!(
            bits(z),
            bits(&big[i]),
            "{what}: output {i} read its 1e30 fill"
        );
    }
}

#[test]
fn every_output_is_written_whatever_it_held() {
    let be = Cpu::<f32>::new();
    // Convolutions: both CPU paths (direct where the CPU has AVX2/AVX-512, im2col).
    for &(n, cin, hw, cout, k, st, p) in &[
        (4, 16, (28, 28), 16, 3, 1, 1),
        (4, 16, (28, 28), 32, 3, 2, 1),
        (4, 16, (28, 28), 32, 1, 2, 0),
        (8, 64, (7, 7), 64, 3, 1, 1),
        (3, 3, (9, 7), 5, 3, 2, 1),
        (2, 3, (13, 11), 4, 7, 2, 3),
    ] {
        let s = ConvShape::new(n, cin, hw, cout, k, st, p).unwrap();
        let x = normal(s.x_len(), 1);
        let w = normal(s.w_len(), 2);
        let dy = normal(s.y_len(), 3);
        check_overwrites("conv y", [s.y_len()], |[y]| {
            be.conv2d_forward(&s, &x, &w, 0, y).unwrap()
        });
        check_overwrites("conv dx", [s.x_len()], |[dx]| {
            let mut dw = vec![0.0; s.w_len()];
            be.conv2d_backward(&s, &x, &w, 0, &dy, Some(dx), &mut dw, 0)
                .unwrap()
        });
    }
    // BatchNorm: training (fused epilogues, split groups, 1x1 maps) and inference.
    for &(n, c, hw, g) in &[(16, 4, 16, 8), (8, 5, 1, 4), (6, 3, 5, 3), (32, 16, 49, 8)] {
        let s = BnShape::new(n, c, hw, g, true).unwrap();
        let x: Vec<f32> = normal(s.len(), 4).iter().map(|v| 2.0 * v + 0.7).collect();
        let res = normal(s.len(), 5);
        let dy = normal(s.len(), 6);
        let (params, off, running0) = bn_setup(c, 7);
        let hp = BnParams::default();
        for (residual, relu) in [(None, false), (Some(&res), true)] {
            check_overwrites(
                "bn train y, mean, invstd",
                [s.len(), g * c, g * c],
                |[y, m, i]| {
                    let mut running = running0.clone();
                    be.bn_forward_train_fused(
                        &s,
                        hp,
                        &x,
                        &params,
                        off,
                        &mut running,
                        residual,
                        relu,
                        y,
                        m,
                        i,
                    )
                    .unwrap()
                },
            );
        }
        let (mut y, mut mean, mut invstd) =
            (vec![0.0; s.len()], vec![0.0; g * c], vec![0.0; g * c]);
        let mut running = running0.clone();
        be.bn_forward_train_fused(
            &s,
            hp,
            &x,
            &params,
            off,
            &mut running,
            None,
            true,
            &mut y,
            &mut mean,
            &mut invstd,
        )
        .unwrap();
        check_overwrites("bn train dx", [s.len()], |[dx]| {
            let mut grads = vec![0.0; params.len()];
            be.bn_backward_train(&s, &x, &params, off, &mean, &invstd, &dy, dx, &mut grads)
                .unwrap()
        });
        check_overwrites("relu + bn train dx", [s.len()], |[dx]| {
            let mut grads = vec![0.0; params.len()];
            be.relu_bn_backward_train(
                &s, &x, &params, off, &mean, &invstd, &y, &dy, dx, &mut grads,
            )
            .unwrap()
        });
        let se = BnShape::new(n, c, hw, 1, false).unwrap();
        check_overwrites("bn eval y", [s.len()], |[y]| {
            be.bn_forward_eval(&se, hp, &x, &params, off, &running0, y)
                .unwrap()
        });
        check_overwrites("bn eval dx", [s.len()], |[dx]| {
            let mut grads = vec![0.0; params.len()];
            be.bn_backward_eval(&se, hp, &x, &params, off, &running0, &dy, dx, &mut grads)
                .unwrap()
        });
    }
    // Pools and the linear layer.
    let ps = PoolShape::new(6, (9, 8), 3, 2, 1).unwrap();
    let x = normal(6 * 9 * 8, 8);
    let dy = normal(6 * ps.ho * ps.wo, 9);
    let mut idx = vec![0u32; dy.len()];
    let mut y = vec![0.0; dy.len()];
    be.maxpool_forward(&ps, &x, &mut y, &mut idx).unwrap();
    check_overwrites("maxpool dx", [x.len()], |[dx]| {
        be.maxpool_backward(&ps, &dy, &idx, dx).unwrap()
    });
    check_overwrites("avgpool dx", [x.len()], |[dx]| {
        be.avgpool_backward(6, 72, &normal(6, 10), dx).unwrap()
    });
    let s = LinearShape {
        n: 40,
        fin: 33,
        fout: 65,
    };
    let xl = normal(s.n * s.fin, 11);
    let params = normal(s.fout * s.fin + s.fout, 12);
    let dyl = normal(s.n * s.fout, 13);
    check_overwrites("linear y", [s.n * s.fout], |[y]| {
        be.linear_forward(&s, &xl, &params, 0, s.fout * s.fin, y)
            .unwrap()
    });
    check_overwrites("linear dx", [s.n * s.fin], |[dx]| {
        let mut g = vec![0.0; params.len()];
        be.linear_backward(&s, &xl, &params, 0, s.fout * s.fin, &dyl, Some(dx), &mut g)
            .unwrap()
    });
    check_overwrites("copy_into", [x.len()], |[d]| {
        let mut v = d.to_vec();
        be.copy_into(&x, &mut v).unwrap();
        d.copy_from_slice(&v)
    });
}

/// The SGD step that writes the parameters' bf16 copy: the f32 state exactly as the plain
/// step, the copy the rounding of the new parameters; a wrong copy length changes nothing.
#[test]
fn sgd_bf16_copy_reference_is_the_step_then_the_rounding() {
    use half::bf16;
    let be = Cpu::<f32>::new();
    let n = 1000;
    let (p0, g, b0) = (normal(n, 140), normal(n, 141), normal(n, 142));
    let hp = (0.06, 0.9, 5e-4);
    let (mut p1, mut b1) = (p0.clone(), b0.clone());
    be.sgd_step(&mut p1, &g, &mut b1, hp.0, hp.1, hp.2).unwrap();
    let (mut p2, mut b2, mut copy) = (p0.clone(), b0.clone(), vec![bf16::ZERO; n]);
    be.sgd_step_bf16_copy(&mut p2, &g, &mut b2, &mut copy, hp)
        .unwrap();
    assert_eq!((&p2, &b2), (&p1, &b1));
    assert!(copy
        .iter()
        .zip(&p2)
        .all(|(c, &p)| c.to_bits() == bf16::from_f32(p).to_bits()));
    let mut short = vec![bf16::ZERO; n - 1];
    assert!(be
        .sgd_step_bf16_copy(&mut p2, &g, &mut b2, &mut short, hp)
        .is_err());
    assert_eq!((&p2, &b2), (&p1, &b1), "nothing changed on error");
}

/// CUDA: the same, bit for bit against the GPU's own plain step.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_sgd_bf16_copy_matches_the_plain_step_and_rounds_it() {
    use half::bf16;
    let be = cuda_backend(ConvBackend::Im2col);
    let gpu = be.gpu().clone();
    for &n in &[1usize, 5, 4097, 1_000_003] {
        let (p0, g, b0) = (normal(n, 150), normal(n, 151), normal(n, 152));
        let hp = (0.06, 0.9, 5e-4);
        let gd = up(&be, &g);
        let (mut p1, mut b1) = (up(&be, &p0), up(&be, &b0));
        be.sgd_step(&mut p1, &gd, &mut b1, hp.0, hp.1, hp.2)
            .unwrap();
        let (mut p2, mut b2) = (up(&be, &p0), up(&be, &b0));
        let mut copy = gpu.zeros::<bf16>(n).unwrap();
        be.sgd_step_bf16_copy(&mut p2, &gd, &mut b2, &mut copy, hp)
            .unwrap();
        let (p1, p2) = (down(&be, &p1), down(&be, &p2));
        assert_eq!(p1, p2, "n={n}: params as the plain step");
        assert_eq!(
            down(&be, &b1),
            down(&be, &b2),
            "n={n}: momentum as the plain step"
        );
        let copy = gpu.download(&copy).unwrap();
        assert!(copy
            .iter()
            .zip(&p2)
            .all(|(c, &p)| c.to_bits() == bf16::from_f32(p).to_bits()));
    }
}

/// TF32 is a mode of the GPU's shared cuBLAS handle: a second backend on the same `Gpu`
/// asking for the other mode is refused, the same mode is fine, and a separate `Gpu` may
/// choose freely.
#[test]
#[ignore = "needs a CUDA GPU"]
fn tf32_mode_is_per_gpu_handle_and_conflicts_are_errors() {
    use moco::backend::cuda::CudaOptions;
    let gpu = moco::testing::test_gpu();
    let tf32 = CudaOptions {
        tf32: true,
        ..CudaOptions::default()
    };
    Cuda::with_options(gpu.clone(), tf32).unwrap();
    Cuda::with_options(gpu.clone(), tf32).unwrap();
    let e = Cuda::new(gpu.clone()).unwrap_err().to_string();
    assert!(e.contains("TF32 mode"), "{e}");
    Cuda::new(moco::testing::test_gpu()).unwrap();
}
