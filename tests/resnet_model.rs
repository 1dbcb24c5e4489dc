//! Whole encoders on the CPU: parameter tables (torchvision names and counts), gradient
//! checks of a whole resnet8 in f64, determinism across thread counts, errors.
use moco::backend::{Backend, Cpu};
use moco::model::{Arch, Encoder, EncoderConfig, InputShape, ParamTable, Storage};
use moco::testing::normal;

fn cfg(arch: Arch, cin: usize, dim: usize, mlp: bool) -> EncoderConfig {
    EncoderConfig {
        arch,
        in_channels: cin,
        dim,
        mlp,
    }
}

#[test]
fn parameter_counts_match_torchvision() {
    // torchvision.models.resnet18() / resnet50() with the default 1000-class fc.
    let t = ParamTable::for_config(&cfg(Arch::Resnet18, 3, 1000, false)).unwrap();
    assert_eq!(t.num_params(), 11_689_512);
    assert_eq!(t.backbone_params(), 11_176_512);
    let t = ParamTable::for_config(&cfg(Arch::Resnet50, 3, 1000, false)).unwrap();
    assert_eq!(t.num_params(), 25_557_032);
    assert_eq!(t.backbone_params(), 23_508_032);
    // MoCo v2 head on resnet50: fc.0 2048x2048 + fc.2 2048x128.
    let t = ParamTable::for_config(&cfg(Arch::Resnet50, 3, 128, true)).unwrap();
    assert_eq!(t.head_params(), 2048 * 2048 + 2048 + 2048 * 128 + 128);
    // BatchNorm buffers: resnet50 has 53 BNs.
    let bns = t
        .entries()
        .iter()
        .filter(|e| e.storage == Storage::NumBatchesTracked)
        .count();
    assert_eq!(bns, 53);
    // CIFAR ResNet-20 (projection shortcuts): 3x3x3x16 stem + 9 blocks + 2 downsamples.
    let t = ParamTable::for_config(&cfg(Arch::Resnet20, 3, 10, false)).unwrap();
    // Option-A ResNet-20 has 269,722 parameters with a 10-way fc (650); the two projection
    // shortcuts add 16*32 + 2*32 + 32*64 + 2*64 = 2,752.
    assert_eq!(t.backbone_params(), 269_722 - 650 + 2_752);
}

#[test]
fn names_follow_torchvision_state_dict_order() {
    let t = ParamTable::for_config(&cfg(Arch::Resnet18, 3, 128, true)).unwrap();
    let names: Vec<&str> = t.entries().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        &names[..8],
        &[
            "conv1.weight",
            "bn1.weight",
            "bn1.bias",
            "bn1.running_mean",
            "bn1.running_var",
            "bn1.num_batches_tracked",
            "layer1.0.conv1.weight",
            "layer1.0.bn1.weight",
        ]
    );
    assert!(names.contains(&"layer1.0.bn2.running_var"));
    assert!(names.contains(&"layer2.0.downsample.0.weight"));
    assert!(names.contains(&"layer4.1.bn2.num_batches_tracked"));
    assert!(!names.contains(&"layer1.0.downsample.0.weight"));
    assert_eq!(
        &names[names.len() - 4..],
        &["fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"]
    );
    let e = t.get("conv1.weight").unwrap();
    assert_eq!(e.shape, vec![64, 3, 7, 7]);
    assert_eq!(t.get("fc.2.weight").unwrap().shape, vec![128, 512]);
    // Offsets are contiguous in table order, backbone first.
    let mut next = 0;
    for e in t.params() {
        assert_eq!(e.offset, next, "{}", e.name);
        next += e.len;
    }
    assert_eq!(next, t.num_params());
    let t = ParamTable::for_config(&cfg(Arch::Resnet50, 1, 128, false)).unwrap();
    assert_eq!(t.get("conv1.weight").unwrap().shape, vec![64, 1, 7, 7]);
    assert_eq!(
        t.get("layer1.0.downsample.0.weight").unwrap().shape,
        vec![256, 64, 1, 1]
    );
    assert_eq!(
        t.get("layer3.5.conv3.weight").unwrap().shape,
        vec![1024, 256, 1, 1]
    );
    assert_eq!(t.get("fc.weight").unwrap().shape, vec![128, 2048]);
}

fn loss_and_grads(
    enc: &mut Encoder<Cpu<f64>>,
    x: &[f64],
    shape: InputShape,
    r: &[f64],
    train: bool,
    splits: usize,
) -> (f64, Vec<f64>, Vec<f64>) {
    let y = enc.forward(&x.to_vec(), shape, train, splits).unwrap();
    let loss: f64 = y.iter().zip(r).map(|(a, b)| a * b).sum();
    enc.zero_grad().unwrap();
    let dx = enc.backward(&r.to_vec()).unwrap();
    (loss, dx, enc.grads().clone())
}

/// Whole-encoder gradient check in f64: three coordinates of every `every`-th parameter
/// tensor (and the last), and a spread of input coordinates.
fn fd_whole(arch: Arch, mlp: bool, train: bool, splits: usize, h: usize, n: usize, every: usize) {
    let be = Cpu::<f64>::new();
    let c = cfg(arch, 2, 5, mlp);
    let mut enc = Encoder::new(be, c, 7).unwrap();
    // Non-trivial BN affine parameters and running statistics.
    let init: Vec<f64> = enc.params().clone();
    let mut p = init.clone();
    for e in enc.table().params() {
        if e.name.contains("bn") || e.name.contains("downsample.1") {
            let noise = normal(e.len, e.offset as u64);
            for (i, v) in p[e.offset..e.offset + e.len].iter_mut().enumerate() {
                *v += 0.2 * noise[i] as f64;
            }
        }
    }
    *enc.params_mut() = p;
    let nr = enc.running_stats().len();
    let rs = normal(nr, 5);
    for (i, v) in enc.running_stats_mut().iter_mut().enumerate() {
        *v += 0.1 * rs[i].abs() as f64;
    }
    let shape = InputShape::new(n, 2, h, h);
    let mut x: Vec<f64> = normal(shape.len(), 8).iter().map(|&v| v as f64).collect();
    let r: Vec<f64> = normal(n * 5, 9).iter().map(|&v| v as f64).collect();
    let (_, dx, g) = loss_and_grads(&mut enc, &x, shape, &r, train, splits);
    let eps = 1e-6;
    let check = |fd: f64, an: f64, what: &str| {
        let err = (fd - an).abs() / (fd.abs() + an.abs() + 1e-3);
        assert!(
            err < 1e-5,
            "{arch} {what}: fd {fd:.8e} vs analytic {an:.8e} ({err:.1e})"
        );
    };
    // Parameters: a few coordinates of every tensor.
    let entries: Vec<_> = enc.table().params().cloned().collect();
    let last = entries.len() - 1;
    for (ti, e) in entries.iter().enumerate() {
        if ti % every != 0 && ti != last {
            continue;
        }
        for j in [0, e.len / 2, e.len - 1] {
            let i = e.offset + j;
            let old = enc.params()[i];
            enc.params_mut()[i] = old + eps;
            let yp = enc.forward(&x.clone(), shape, train, splits).unwrap();
            enc.params_mut()[i] = old - eps;
            let ym = enc.forward(&x.clone(), shape, train, splits).unwrap();
            enc.params_mut()[i] = old;
            let fd = (yp.iter().zip(&r).map(|(a, b)| a * b).sum::<f64>()
                - ym.iter().zip(&r).map(|(a, b)| a * b).sum::<f64>())
                / (2.0 * eps);
            check(fd, g[i], &format!("{}[{j}]", e.name));
        }
    }
    // Input.
    for i in (0..x.len()).step_by(x.len() / 17 + 1) {
        let old = x[i];
        x[i] = old + eps;
        let yp = enc.forward(&x.clone(), shape, train, splits).unwrap();
        x[i] = old - eps;
        let ym = enc.forward(&x.clone(), shape, train, splits).unwrap();
        x[i] = old;
        let fd = (yp.iter().zip(&r).map(|(a, b)| a * b).sum::<f64>()
            - ym.iter().zip(&r).map(|(a, b)| a * b).sum::<f64>())
            / (2.0 * eps);
        check(fd, dx[i], &format!("input[{i}]"));
    }
}

#[test]
fn resnet8_gradients_finite_differences_train_mode() {
    fd_whole(Arch::Resnet8, false, true, 1, 8, 4, 1);
}

#[test]
fn resnet8_gradients_finite_differences_split_bn_mlp() {
    fd_whole(Arch::Resnet8, true, true, 2, 9, 6, 1);
}

#[test]
fn resnet8_gradients_finite_differences_eval_mode() {
    fd_whole(Arch::Resnet8, false, false, 1, 8, 3, 1);
}

#[test]
fn resnet18_stem_gradients_finite_differences() {
    // 7x7/2 stem + max-pool. Inference-mode BatchNorm: on inputs this small the deep
    // stages see one value per channel and sample, where training-mode BatchNorm over two
    // values is too ill-conditioned for finite differences (training mode is checked on
    // resnet8 above and per layer).
    fd_whole(Arch::Resnet18, false, false, 1, 16, 2, 2);
}

#[test]
fn resnet50_bottleneck_gradients_finite_differences() {
    fd_whole(Arch::Resnet50, true, false, 1, 8, 2, 9);
}

fn run_once(threads: usize, arch: Arch) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let mut enc = Encoder::new(Cpu::<f32>::new(), cfg(arch, 3, 16, true), 3).unwrap();
        let shape = InputShape::new(40, 3, 12, 12);
        let x = normal(shape.len(), 4);
        let y = enc.forward(&x, shape, true, 4).unwrap();
        let dx = enc.backward(&normal(40 * 16, 5)).unwrap();
        (y, dx, enc.grads().clone(), enc.running_stats().clone())
    })
}

#[test]
fn cpu_results_identical_across_thread_counts() {
    for arch in [Arch::Resnet8, Arch::Resnet18Cifar] {
        let a = run_once(1, arch);
        for t in [2, 3, 5] {
            let b = run_once(t, arch);
            assert!(a == b, "{arch}: results differ between 1 and {t} threads");
        }
    }
}

#[test]
fn every_arch_runs_forward_backward_and_features() {
    for arch in Arch::ALL {
        for (cin, mlp) in [(1, false), (3, true)] {
            let mut enc = Encoder::new(Cpu::<f32>::new(), cfg(arch, cin, 8, mlp), 1).unwrap();
            let shape = InputShape::new(2, cin, 8, 8);
            let x = normal(shape.len(), 2);
            let y = enc.forward(&x, shape, true, 1).unwrap();
            assert_eq!(y.len(), 16);
            assert!(y.iter().all(|v| v.is_finite()));
            let dx = enc.backward(&vec![1.0; 16]).unwrap();
            assert_eq!(dx.len(), shape.len());
            assert!(enc.grads().iter().all(|v| v.is_finite()));
            assert!(enc.grads().iter().any(|&v| v != 0.0));
            let f = enc.features(&x, shape).unwrap();
            assert_eq!(f.len(), 2 * arch.feature_dim());
            assert_eq!(enc.num_batches_tracked(), 1);
        }
    }
}

#[test]
fn encoder_rejects_bad_input() {
    let mut enc = Encoder::new(Cpu::<f32>::new(), cfg(Arch::Resnet8, 3, 8, false), 1).unwrap();
    let shape = InputShape::new(4, 3, 8, 8);
    let x = normal(shape.len(), 2);
    let e = enc
        .forward(&x, InputShape::new(4, 1, 8, 8), true, 1)
        .unwrap_err();
    assert!(e.to_string().contains("channels"), "{e}");
    let e = enc.forward(&x, shape, true, 3).unwrap_err();
    assert!(e.to_string().contains("bn_splits"), "{e}");
    let e = enc.forward(&x[1..].to_vec(), shape, true, 1).unwrap_err();
    assert!(e.to_string().contains("elements"), "{e}");
    assert!(
        enc.backward(&vec![0.0; 32]).is_err(),
        "backward without forward"
    );
    enc.forward(&x, shape, true, 2).unwrap();
    assert!(enc.backward(&vec![0.0; 31]).is_err(), "wrong gradient size");
    let e = enc.forward(&x, InputShape::new(4, 3, 1, 1), true, 1);
    assert!(e.is_err());
    // Batch 2 in 4 splits... and a deep stage with one value per group: an error, and the
    // running statistics are untouched.
    let before = enc.running_stats().clone();
    let small = InputShape::new(2, 3, 4, 4);
    let e = enc
        .forward(&normal(small.len(), 3), small, true, 2)
        .unwrap_err();
    assert!(e.to_string().contains("more than one value"), "{e}");
    assert_eq!(*enc.running_stats(), before, "nothing changed on error");
    assert!("resnet7".parse::<Arch>().is_err());
    assert_eq!(
        "ResNet18_cifar".parse::<Arch>().unwrap(),
        Arch::Resnet18Cifar
    );
    let bad = EncoderConfig {
        in_channels: 0,
        ..EncoderConfig::new(Arch::Resnet8)
    };
    assert!(Encoder::new(Cpu::<f32>::new(), bad, 0).is_err());
}

#[test]
fn state_dict_round_trip() {
    let c = cfg(Arch::Resnet8, 1, 8, true);
    let mut a = Encoder::new(Cpu::<f32>::new(), c, 1).unwrap();
    let shape = InputShape::new(4, 1, 8, 8);
    a.forward(&normal(shape.len(), 3), shape, true, 2).unwrap();
    let sd = a.state_dict().unwrap();
    assert_eq!(sd.len(), a.table().entries().len());
    let mut b = Encoder::new(Cpu::<f32>::new(), c, 99).unwrap();
    assert_ne!(a.params(), b.params());
    for (name, shape, v) in &sd {
        b.load_tensor(name, shape, v).unwrap();
    }
    assert_eq!(a.params(), b.params());
    assert_eq!(a.running_stats(), b.running_stats());
    assert_eq!(b.num_batches_tracked(), 1);
    assert!(b
        .load_tensor("conv1.weight", &[16, 1, 3], &[0.0; 48])
        .is_err());
    assert!(b.load_tensor("nope", &[1], &[0.0]).is_err());
    let x = normal(shape.len(), 4);
    assert_eq!(
        a.features(&x, shape).unwrap(),
        b.features(&x, shape).unwrap()
    );
    let _ = Cpu::<f32>::new().name();
    // Key encoder initialization: parameters copied, running statistics kept.
    let mut k = Encoder::new(Cpu::<f32>::new(), c, 7).unwrap();
    let k_running = k.running_stats().clone();
    k.copy_params_from(&a).unwrap();
    assert_eq!(k.params(), a.params());
    assert_eq!(*k.running_stats(), k_running);
    let other = Encoder::new(Cpu::<f32>::new(), cfg(Arch::Resnet8, 1, 8, false), 1).unwrap();
    assert!(k.copy_params_from(&other).is_err());
}

#[test]
fn cli_info_prints_parameter_counts() {
    let out = std::process::Command::new(
        std::env::var("MOCO_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_moco").to_string()),
    )
    .args(["info", "--arch", "resnet18", "--dim", "1000", "--verbose"])
    .output()
    .unwrap();
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.contains("backbone_params: 11176512\n"), "{s}");
    assert!(s.contains("head_params: 513000\n"), "{s}");
    assert!(s.contains("layer1.0.bn2.running_var [64] buffer\n"), "{s}");
    let out = std::process::Command::new(
        std::env::var("MOCO_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_moco").to_string()),
    )
    .args(["info", "--arch", "resnet9"])
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown architecture"));
}

/// The f32 fast path of whole encoders against the same code in f64 (same initial weights):
/// outputs, input gradient, every parameter gradient and the running statistics.
///
/// Tolerances: outputs and running statistics 1e-4 (fp32 through ~20 layers). Gradients
/// 1e-2: a pre-activation within rounding of zero can take the other side of a ReLU in the
/// other precision; that one flipped mask element changes its gradient by O(|dy|), which
/// BatchNorm's backward spreads over its group, about 1/sqrt(activations) ~ 1e-3 relative
/// for these sizes (measured: 1.8e-3 for resnet18-cifar). Each layer alone is checked at
/// 1e-5 in tests/resnet_layers.rs; a wiring bug here gives O(1) errors.
#[test]
fn f32_encoders_match_f64() {
    for (arch, mlp, n, cin, size, splits) in [
        (Arch::Resnet8, false, 16, 1, 28, 1),
        (Arch::Resnet20, true, 8, 3, 16, 2),
        // 32x32 so that layer4's BatchNorm groups hold 4x4 x 4 values; with 1x1 maps and two
        // samples per group, BatchNorm maps any two values to about +-1 and is too
        // ill-conditioned to compare precisions.
        (Arch::Resnet18Cifar, true, 8, 3, 32, 2),
    ] {
        let c = cfg(arch, cin, 12, mlp);
        let mut e32 = Encoder::new(Cpu::<f32>::new(), c, 11).unwrap();
        let mut e64 = Encoder::new(Cpu::<f64>::new(), c, 11).unwrap();
        let shape = InputShape::new(n, cin, size, size);
        let x = normal(shape.len(), 12);
        let dy = normal(n * 12, 13);
        let to64 = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        let to32 = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        for step in 0..2 {
            let y32 = e32.forward(&x, shape, true, splits).unwrap();
            let y64 = e64.forward(&to64(&x), shape, true, splits).unwrap();
            let dx32 = e32.backward(&dy).unwrap();
            let dx64 = e64.backward(&to64(&dy)).unwrap();
            let what = format!("{arch} step {step}");
            moco::testing::assert_close(&format!("{what} output"), &y32, &to32(&y64), 1e-4, 1e-2);
            moco::testing::assert_close(&format!("{what} dx"), &dx32, &to32(&dx64), 1e-2, 1e-1);
            moco::testing::assert_close(
                &format!("{what} running"),
                e32.running_stats(),
                &to32(e64.running_stats()),
                1e-4,
                1e-3,
            );
            let (g32, g64) = (e32.grads().clone(), to32(e64.grads()));
            for e in e32.table().params() {
                let r = e.offset..e.offset + e.len;
                moco::testing::assert_close(
                    &format!("{what} grad {}", e.name),
                    &g32[r.clone()],
                    &g64[r],
                    1e-2,
                    1.0,
                );
            }
        }
        let f32s = e32.features(&x, shape).unwrap();
        let f64s = e64.features(&to64(&x), shape).unwrap();
        moco::testing::assert_close(&format!("{arch} features"), &f32s, &to32(&f64s), 1e-4, 1e-2);
    }
}

/// The encoder keeps its buffers from one pass to the next (and the CPU backend does not
/// zero them): a pass after others, of the same or another shape, must give bitwise what
/// a fresh encoder gives.
#[test]
fn reused_buffers_change_nothing() {
    for arch in [Arch::Resnet8, Arch::Resnet18] {
        let c = cfg(arch, 3, 16, true);
        let shape = InputShape::new(8, 3, 16, 16);
        let other = InputShape::new(4, 3, 12, 12);
        let x = normal(shape.len(), 4);
        let r = normal(8 * 16, 5);
        let fresh = || Encoder::new(Cpu::<f32>::new(), c, 3).unwrap();
        let mut want = fresh();
        let y0 = want.forward(&x, shape, true, 2).unwrap();
        let dx0 = want.backward(&r).unwrap();

        let mut enc = fresh();
        // Earlier passes fill the pool: a training step, a key-encoder pass, features of
        // another shape, a forward without its backward.
        let x1 = normal(shape.len(), 6);
        enc.forward(&x1, shape, true, 2).unwrap();
        enc.backward_params(&normal(8 * 16, 7)).unwrap();
        enc.forward_no_grad(&x1, shape, true, 2).unwrap();
        enc.features(&normal(other.len(), 8), other).unwrap();
        enc.forward(&x1, shape, true, 4).unwrap();
        enc.forward(&x1, shape, true, 2).unwrap();
        enc.backward_params(&normal(8 * 16, 9)).unwrap();
        enc.zero_grad().unwrap();
        let y = enc.forward(&x, shape, true, 2).unwrap();
        let dx = enc.backward(&r).unwrap();
        assert!(y == y0, "{arch}: forward differs after reuse");
        assert!(dx == dx0, "{arch}: input gradient differs after reuse");
        assert!(
            enc.grads() == want.grads(),
            "{arch}: gradients differ after reuse"
        );
        // Running statistics differ (more training passes); features use them, so compare
        // them with the running statistics copied over.
        let running = enc.running_stats().clone();
        *want.running_stats_mut() = running;
        let f = want.features(&x, shape).unwrap();
        assert!(
            enc.features(&x, shape).unwrap() == f,
            "{arch}: features differ"
        );
    }
}
