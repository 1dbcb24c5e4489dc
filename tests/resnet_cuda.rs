//! CUDA backend against the CPU backend: every layer (outputs, input and parameter
//! gradients, running statistics), whole resnet8 and resnet18-cifar encoders, SGD.
//!
//! Tolerances: layers 1e-5 relative (fp32 with a different summation order: cuBLAS SGEMM
//! without TF32, double-accumulated BatchNorm statistics), convolution weight gradients
//! `max(1e-5, 2e-7 sqrt(N Ho Wo))` (fp32 sums of that many terms); whole networks 1e-4 on outputs
//! and running statistics, 1e-2 on gradients: a pre-activation within rounding of zero can
//! fall on the other side of a ReLU on the other device, and that one flipped mask element
//! moves the upstream gradients by about 1/sqrt(activations) relative (1.8e-3 measured
//! between f32 and f64 on the CPU for resnet18-cifar, tests/resnet_model.rs). A wiring bug
//! gives O(1) errors; each layer alone is held to 1e-5 above. Outputs are poisoned (NaN) before each launch.
use moco::backend::{
    Backend, BnOffsets, BnParams, BnShape, ConvShape, Cpu, Cuda, LinearShape, PoolShape,
};
use moco::model::{Arch, Encoder, EncoderConfig, InputShape};
use moco::testing::{assert_close, assert_close_flip_aware, normal, test_gpu, POISON};

fn cuda() -> Cuda {
    Cuda::new(test_gpu()).expect("cuBLAS handle")
}

fn up(g: &Cuda, v: &[f32]) -> cudarc::driver::CudaSlice<f32> {
    g.upload_f32(v).unwrap()
}

fn down(g: &Cuda, v: &cudarc::driver::CudaSlice<f32>) -> Vec<f32> {
    g.download_f32(v).unwrap()
}

fn poison(g: &Cuda, n: usize) -> cudarc::driver::CudaSlice<f32> {
    up(g, &vec![POISON; n])
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn conv_matches_cpu() {
    let g = cuda();
    let c = Cpu::<f32>::new();
    for (i, &(n, cin, hw, cout, k, st, p)) in [
        (
            1usize,
            1usize,
            (5usize, 5usize),
            1usize,
            3usize,
            1usize,
            1usize,
        ),
        (3, 3, (9, 7), 5, 3, 2, 1),
        (2, 4, (6, 6), 6, 1, 1, 0),
        (2, 4, (7, 9), 3, 1, 2, 0),
        (2, 3, (33, 31), 16, 7, 2, 3),
        (64, 64, (32, 32), 64, 3, 1, 1),
        (17, 128, (8, 8), 256, 3, 2, 1),
        (512, 3, (32, 32), 64, 3, 1, 1),
    ]
    .iter()
    .enumerate()
    {
        let s = ConvShape::new(n, cin, hw, cout, k, st, p).unwrap();
        let x = normal(s.x_len(), i as u64);
        let w = normal(s.w_len() + 5, 100 + i as u64);
        let dy = normal(s.y_len(), 200 + i as u64);
        let mut y = vec![0.0; s.y_len()];
        c.conv2d_forward(&s, &x, &w, 5, &mut y).unwrap();
        let mut dx = vec![0.0; s.x_len()];
        let mut dw = vec![0.5; s.w_len() + 5];
        c.conv2d_backward(&s, &x, &w, 5, &dy, Some(&mut dx), &mut dw, 5)
            .unwrap();
        let (xg, wg, dyg) = (up(&g, &x), up(&g, &w), up(&g, &dy));
        let mut yg = poison(&g, s.y_len());
        g.conv2d_forward(&s, &xg, &wg, 5, &mut yg).unwrap();
        assert_close(&format!("conv y {s:?}"), &down(&g, &yg), &y, 1e-5, 1e-3);
        let mut dxg = poison(&g, s.x_len());
        let mut dwg = up(&g, &vec![0.5; s.w_len() + 5]);
        g.conv2d_backward(&s, &xg, &wg, 5, &dyg, Some(&mut dxg), &mut dwg, 5)
            .unwrap();
        assert_close(&format!("conv dx {s:?}"), &down(&g, &dxg), &dx, 1e-5, 1e-3);
        // dW sums K = N Ho Wo products in fp32 on both sides (different blockings): the
        // relative error of such sums grows like eps sqrt(K).
        let k_dw = (s.n * s.ho * s.wo) as f64;
        let tol_dw = (1e-5f64).max(2e-7 * k_dw.sqrt());
        assert_close(
            &format!("conv dw {s:?}"),
            &down(&g, &dwg),
            &dw,
            tol_dw,
            1e-2,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn batchnorm_matches_cpu() {
    let g = cuda();
    let c = Cpu::<f32>::new();
    for &(n, ch, hw, groups) in &[
        (2, 3, 4, 1),
        (8, 5, 1, 4),
        (16, 64, 256, 8),
        (512, 64, 1024, 8),
        (6, 7, 9, 3),
    ] {
        let s = BnShape::new(n, ch, hw, groups, true).unwrap();
        let x: Vec<f32> = normal(s.len(), 1).iter().map(|v| 3.0 * v + 1.0).collect();
        let mut params = vec![0.0f32];
        params.extend(normal(2 * ch, 2));
        let off = BnOffsets {
            gamma: 1,
            beta: 1 + ch,
            mean: 2,
            var: 2 + ch,
        };
        let mut running = vec![0.0f32, 0.0];
        running.extend(normal(ch, 3));
        running.extend(normal(ch, 4).iter().map(|v| 1.0 + v.abs()));
        let dy = normal(s.len(), 5);
        let hp = BnParams::default();
        // CPU.
        let mut rc = running.clone();
        let mut y = vec![0.0; s.len()];
        let (mut m, mut is) = (vec![0.0; groups * ch], vec![0.0; groups * ch]);
        c.bn_forward_train(&s, hp, &x, &params, off, &mut rc, &mut y, &mut m, &mut is)
            .unwrap();
        let mut dx = vec![0.0; s.len()];
        let mut gr = vec![0.25; params.len()];
        c.bn_backward_train(&s, &x, &params, off, &m, &is, &dy, &mut dx, &mut gr)
            .unwrap();
        let mut ye = vec![0.0; s.len()];
        c.bn_forward_eval(&s, hp, &x, &params, off, &rc, &mut ye)
            .unwrap();
        let mut dxe = vec![0.0; s.len()];
        let mut gre = vec![0.25; params.len()];
        c.bn_backward_eval(&s, hp, &x, &params, off, &rc, &dy, &mut dxe, &mut gre)
            .unwrap();
        // CUDA.
        let (xg, pg, dyg) = (up(&g, &x), up(&g, &params), up(&g, &dy));
        let mut rg = up(&g, &running);
        let mut yg = poison(&g, s.len());
        let (mut mg, mut ig) = (poison(&g, groups * ch), poison(&g, groups * ch));
        g.bn_forward_train(&s, hp, &xg, &pg, off, &mut rg, &mut yg, &mut mg, &mut ig)
            .unwrap();
        let what = format!("bn {s:?}");
        assert_close(&format!("{what} y"), &down(&g, &yg), &y, 1e-5, 1e-4);
        assert_close(&format!("{what} running"), &down(&g, &rg), &rc, 1e-6, 1e-5);
        let mut dxg = poison(&g, s.len());
        let mut grg = up(&g, &vec![0.25; params.len()]);
        g.bn_backward_train(&s, &xg, &pg, off, &mg, &ig, &dyg, &mut dxg, &mut grg)
            .unwrap();
        // With two samples per group the BatchNorm output is +-gamma + beta whatever x is,
        // so dx is zero up to rounding: compare by max-abs there (first H200 run: rel 5.7e-3,
        // max abs 1.3e-7 for n = 8, groups = 4).
        moco::testing::assert_close_or_zero(
            &format!("{what} dx"),
            &down(&g, &dxg),
            &dx,
            1e-5,
            1e-4,
        );
        assert_close(
            &format!("{what} dgamma dbeta"),
            &down(&g, &grg),
            &gr,
            1e-5,
            1e-2,
        );
        let mut yeg = poison(&g, s.len());
        g.bn_forward_eval(&s, hp, &xg, &pg, off, &rg, &mut yeg)
            .unwrap();
        assert_close(&format!("{what} eval y"), &down(&g, &yeg), &ye, 1e-5, 1e-4);
        let mut dxeg = poison(&g, s.len());
        let mut greg = up(&g, &vec![0.25; params.len()]);
        g.bn_backward_eval(&s, hp, &xg, &pg, off, &rg, &dyg, &mut dxeg, &mut greg)
            .unwrap();
        assert_close(
            &format!("{what} eval dx"),
            &down(&g, &dxeg),
            &dxe,
            1e-5,
            1e-4,
        );
        assert_close(
            &format!("{what} eval dgamma dbeta"),
            &down(&g, &greg),
            &gre,
            1e-5,
            1e-2,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn pools_relu_add_linear_sgd_match_cpu() {
    let g = cuda();
    let c = Cpu::<f32>::new();
    for &(planes, h, w) in &[
        (3, 8, 8),
        (2, 7, 5),
        (1, 2, 2),
        (4, 1, 1),
        (64 * 8, 112, 112),
    ] {
        let s = PoolShape::new(planes, (h, w), 3, 2, 1).unwrap();
        let x = normal(planes * h * w, 1);
        let no = planes * s.ho * s.wo;
        let (mut y, mut idx) = (vec![0.0; no], vec![0u32; no]);
        c.maxpool_forward(&s, &x, &mut y, &mut idx).unwrap();
        let dy = normal(no, 2);
        let mut dx = vec![0.0; x.len()];
        c.maxpool_backward(&s, &dy, &idx, &mut dx).unwrap();
        let xg = up(&g, &x);
        let mut yg = poison(&g, no);
        let mut ig = g.zeros_idx(no).unwrap();
        g.maxpool_forward(&s, &xg, &mut yg, &mut ig).unwrap();
        assert_eq!(down(&g, &yg), y, "maxpool y");
        assert_eq!(g.gpu().download(&ig).unwrap(), idx, "maxpool argmax");
        let mut dxg = poison(&g, x.len());
        g.maxpool_backward(&s, &up(&g, &dy), &ig, &mut dxg).unwrap();
        assert_close("maxpool dx", &down(&g, &dxg), &dx, 1e-6, 1e-6);
        let mut a = vec![0.0; planes];
        c.avgpool_forward(planes, h * w, &x, &mut a).unwrap();
        let mut ag = poison(&g, planes);
        g.avgpool_forward(planes, h * w, &xg, &mut ag).unwrap();
        assert_close("avgpool", &down(&g, &ag), &a, 1e-5, 1e-5);
        let mut da = vec![0.0; x.len()];
        c.avgpool_backward(planes, h * w, &dy[..planes].to_vec(), &mut da)
            .unwrap();
        let mut dag = poison(&g, x.len());
        g.avgpool_backward(planes, h * w, &up(&g, &dy[..planes]), &mut dag)
            .unwrap();
        assert_close("avgpool dx", &down(&g, &dag), &da, 1e-6, 1e-6);
    }
    // ReLU and add.
    let v = normal(100_003, 3);
    let mut r = v.clone();
    c.relu_forward(&mut r).unwrap();
    let mut rg = up(&g, &v);
    g.relu_forward(&mut rg).unwrap();
    assert_eq!(down(&g, &rg), r);
    let d = normal(100_003, 4);
    let mut dc = d.clone();
    c.relu_backward(&r, &mut dc).unwrap();
    let mut dg = up(&g, &d);
    g.relu_backward(&rg, &mut dg).unwrap();
    assert_eq!(down(&g, &dg), dc);
    c.add_assign(&mut dc, &v).unwrap();
    g.add_assign(&mut dg, &up(&g, &v)).unwrap();
    assert_eq!(down(&g, &dg), dc);
    // Linear.
    for &(n, fin, fout) in &[
        (1, 1, 1),
        (3, 5, 7),
        (256, 512, 128),
        (512, 2048, 2048),
        (33, 64, 10),
    ] {
        let s = LinearShape { n, fin, fout };
        let x = normal(n * fin, 5);
        let p = normal(3 + fout * fin + fout, 6);
        let dy = normal(n * fout, 7);
        let (wo, bo) = (3, 3 + fout * fin);
        let mut y = vec![0.0; n * fout];
        c.linear_forward(&s, &x, &p, wo, bo, &mut y).unwrap();
        let mut dx = vec![0.0; n * fin];
        let mut gr = vec![0.5; p.len()];
        c.linear_backward(&s, &x, &p, wo, bo, &dy, Some(&mut dx), &mut gr)
            .unwrap();
        let (xg, pg) = (up(&g, &x), up(&g, &p));
        let mut yg = poison(&g, n * fout);
        g.linear_forward(&s, &xg, &pg, wo, bo, &mut yg).unwrap();
        assert_close("linear y", &down(&g, &yg), &y, 1e-5, 1e-3);
        let mut dxg = poison(&g, n * fin);
        let mut grg = up(&g, &vec![0.5; p.len()]);
        g.linear_backward(&s, &xg, &pg, wo, bo, &up(&g, &dy), Some(&mut dxg), &mut grg)
            .unwrap();
        assert_close("linear dx", &down(&g, &dxg), &dx, 1e-5, 1e-3);
        assert_close("linear dw db", &down(&g, &grg), &gr, 1e-5, 1e-3);
    }
    // SGD over a large flat buffer, three steps.
    let n = 1_000_003;
    let (p0, gr) = (normal(n, 8), normal(n, 9));
    let mut pc = p0.clone();
    let mut oc = moco::optim::Sgd::new(c, n, 0.9, 1e-4).unwrap();
    let mut pg = up(&g, &p0);
    let grg = up(&g, &gr);
    let mut og = moco::optim::Sgd::new(g.clone(), n, 0.9, 1e-4).unwrap();
    for lr in [0.03f64, 0.02, 0.01] {
        oc.step(&mut pc, &gr, lr).unwrap();
        og.step(&mut pg, &grg, lr).unwrap();
    }
    assert_close("sgd params", &down(&g, &pg), &pc, 1e-6, 1e-6);
    assert_close(
        "sgd momentum",
        &down(&g, og.momentum_buffer()),
        oc.momentum_buffer(),
        1e-6,
        1e-6,
    );
}

fn whole(arch: Arch, mlp: bool, n: usize, cin: usize, size: usize, splits: usize) {
    whole_on(cuda(), arch, mlp, n, cin, size, splits);
}

fn whole_on(g: Cuda, arch: Arch, mlp: bool, n: usize, cin: usize, size: usize, splits: usize) {
    let cfg = EncoderConfig {
        arch,
        in_channels: cin,
        dim: 32,
        mlp,
    };
    let mut ec = Encoder::new(Cpu::<f32>::new(), cfg, 5).unwrap();
    let mut eg = Encoder::new(g.clone(), cfg, 5).unwrap();
    assert_eq!(down(&g, eg.params()), *ec.params(), "same initialization");
    let shape = InputShape::new(n, cin, size, size);
    let x = normal(shape.len(), 6);
    let dy = normal(n * 32, 7);
    for step in 0..2 {
        let yc = ec.forward(&x, shape, true, splits).unwrap();
        let dxc = ec.backward(&dy).unwrap();
        let yg = eg.forward(&up(&g, &x), shape, true, splits).unwrap();
        let dxg = eg.backward(&up(&g, &dy)).unwrap();
        let what = format!("{arch} step {step}");
        assert_close(&format!("{what} output"), &down(&g, &yg), &yc, 1e-4, 1e-2);
        assert_close(
            &format!("{what} input grad"),
            &down(&g, &dxg),
            &dxc,
            1e-2,
            1e-1,
        );
        assert_close(
            &format!("{what} running stats"),
            &down(&g, eg.running_stats()),
            ec.running_stats(),
            1e-4,
            1e-3,
        );
        let (gg, gc) = (down(&g, eg.grads()), ec.grads().clone());
        for e in ec.table().params() {
            let r = e.offset..e.offset + e.len;
            // moco::testing::FLIP_REL_TOL (1e-2) relative (ReLU flips, see the module docs)
            // and, per element, FLIP_ELEM_FRACTION (10%) of the tensor's largest gradient.
            // A ReLU flip moves single elements by a sizable fraction while the 2-norm stays
            // within 1e-2; on the H200, resnet50 (4 samples, split BatchNorm) showed
            // conv1.weight max abs 4.8 of 741 (0.7%) and layer4.2.conv1.weight 1.34e-2 of
            // 0.26 (5.2%), with rel errors 6.9e-3 and 8.0e-3. (A fixed 1.0 failed the first;
            // 5% failed the second.)
            assert_close_flip_aware(&format!("{what} grad {}", e.name), &gg[r.clone()], &gc[r]);
        }
        // Inference mode and backbone features.
        let fc = ec.features(&x, shape).unwrap();
        let fg = eg.features(&up(&g, &x), shape).unwrap();
        assert_close(&format!("{what} features"), &down(&g, &fg), &fc, 1e-4, 1e-2);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn resnet8_matches_cpu() {
    whole(Arch::Resnet8, false, 32, 1, 28, 1);
    whole(Arch::Resnet8, true, 64, 3, 32, 8);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn resnet18_cifar_matches_cpu() {
    whole(Arch::Resnet18Cifar, true, 16, 3, 32, 2);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn resnet18_and_resnet50_imagenet_layouts_match_cpu() {
    whole(Arch::Resnet18, false, 4, 3, 64, 1);
    whole(Arch::Resnet50, true, 4, 3, 64, 2);
}

/// The whole networks with cuDNN convolutions against the CPU backend.
#[test]
#[ignore = "needs a CUDA GPU and cuDNN 9"]
fn resnets_with_cudnn_convolutions_match_cpu() {
    let dnn =
        || Cuda::with_conv(test_gpu(), moco::backend::cuda::ConvBackend::Cudnn).expect("cuDNN");
    whole_on(dnn(), Arch::Resnet8, true, 64, 3, 32, 8);
    whole_on(dnn(), Arch::Resnet18Cifar, true, 16, 3, 32, 2);
    whole_on(dnn(), Arch::Resnet50, true, 4, 3, 64, 2);
}
