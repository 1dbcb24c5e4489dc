//! The library API for embedding: a whole step in f64 rebuilt by hand from the public
//! pieces, the bring-your-own-encoder head against the crate's own step, state round trips,
//! and export from the library against the CLI's files.
use std::process::Command;

use moco::backend::{Backend, Cpu, Scalar};
use moco::model::{Encoder, EncoderConfig, InputShape};
use moco::ops::{ContrastShape, InfoNceImpl, MocoHead, Queue};
use moco::optim::Sgd;
use moco::train::export::{export_run, ExportOptions};
use moco::train::{Moco, TrainConfig, Trainer};

fn cfg(symmetric: bool) -> TrainConfig {
    TrainConfig {
        arch: moco::model::Arch::Resnet8,
        image_size: 8,
        batch_size: 6,
        moco_k: 20, // not a multiple of the batch: the enqueue wraps
        dim: 8,
        bn_splits: 2,
        symmetric,
        train_limit: 24,
        test_limit: 12,
        epochs: 1,
        workers: 1,
        ..TrainConfig::default()
    }
}

/// The pieces of a MoCo step, owned by the test.
struct Manual<B: Backend> {
    be: B,
    ctx: B::Ctx,
    enc_q: Encoder<B>,
    enc_k: Encoder<B>,
    opt: Sgd<B>,
    queue: Queue<B>,
}

impl<B: Backend> Manual<B> {
    fn new(c: &TrainConfig, be: B, in_ch: usize) -> Self {
        let ec = EncoderConfig {
            arch: c.arch,
            in_channels: in_ch,
            dim: c.dim,
            mlp: c.mlp,
        };
        let enc_q = Encoder::new(be.clone(), ec, c.seed).unwrap();
        let enc_k = Encoder::new(be.clone(), ec, c.seed).unwrap();
        let opt = Sgd::new(
            be.clone(),
            enc_q.table().num_params(),
            c.sgd_momentum,
            c.weight_decay,
        )
        .unwrap();
        let queue = Queue::new(&be, c.moco_k, c.dim, c.seed).unwrap();
        Manual {
            ctx: be.contrast_ctx().unwrap(),
            be,
            enc_q,
            enc_k,
            opt,
            queue,
        }
    }

    /// Keys of `x` through the shuffle `perm`, unshuffled and normalized.
    fn keys(&mut self, c: &TrainConfig, x: &[f32], s: InputShape, perm: &[usize]) -> B::Buf {
        let img = s.c * s.h * s.w;
        let mut xs = vec![0.0f32; x.len()];
        for (dst, &src) in perm.iter().enumerate() {
            xs[dst * img..(dst + 1) * img].copy_from_slice(&x[src * img..(src + 1) * img]);
        }
        let xd = self.be.upload_f32(&xs).unwrap();
        let k = self
            .enc_k
            .forward_no_grad(&xd, s, true, c.bn_splits)
            .unwrap();
        let mut inv = vec![0; s.n];
        for (dst, &src) in perm.iter().enumerate() {
            inv[src] = dst;
        }
        let ku = self.be.gather_rows(&k, &inv, c.dim).unwrap();
        self.be.normalize(&mut self.ctx, &ku, s.n, c.dim).unwrap()
    }

    /// One plain (not symmetric) step with learning rate `lr`; returns the loss.
    fn step(
        &mut self,
        c: &TrainConfig,
        xq: &[f32],
        xk: &[f32],
        s: InputShape,
        perm: &[usize],
        lr: f64,
    ) -> f64 {
        self.be
            .momentum(self.enc_k.params_mut(), self.enc_q.params(), c.moco_m)
            .unwrap();
        self.enc_q.zero_grad().unwrap();
        let k = self.keys(c, xk, s, perm);
        let xd = self.be.upload_f32(xq).unwrap();
        let q = self.enc_q.forward(&xd, s, true, c.bn_splits).unwrap();
        let cs = ContrastShape::new(s.n, c.dim, c.moco_k, c.moco_t).unwrap();
        let (st, g) = self
            .be
            .infonce(
                &mut self.ctx,
                &q,
                &k,
                self.queue.keys(),
                cs,
                InfoNceImpl::Fused,
            )
            .unwrap();
        self.enc_q.backward(&g).unwrap();
        let (p, gr) = self.enc_q.params_and_grads();
        self.opt.step(p, gr, lr).unwrap();
        self.queue.enqueue(&k).unwrap();
        st.loss
    }
}

fn max_rel<S: Scalar>(a: &[S], b: &[S]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b
        .iter()
        .map(|v| v.to_f64().abs())
        .fold(0.0, f64::max)
        .max(1e-300);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x.to_f64() - y.to_f64()).abs() / scale)
        .fold(0.0, f64::max)
}

fn views(s: InputShape, seed: u64) -> (Vec<f32>, Vec<f32>) {
    (
        moco::rng::uniform(s.len(), seed),
        moco::rng::uniform(s.len(), seed + 1),
    )
}

#[test]
fn f64_step_equals_the_step_built_from_public_ops() {
    let c = cfg(false);
    let s = InputShape::new(c.batch_size, 1, 8, 8);
    let mut moco = Moco::new(&c, Cpu::<f64>::new(), 1, 4).unwrap();
    let mut man = Manual::new(&c, Cpu::<f64>::new(), 1);
    for step in 0..3u64 {
        let (xq, xk) = views(s, 10 * step);
        // An injected permutation, not the default one.
        let perm: Vec<usize> = (0..s.n).map(|i| (i * 5 + step as usize) % s.n).collect();
        let lr = moco.lr();
        let st = moco
            .step_with_permutations(&xq, &xk, s, std::slice::from_ref(&perm))
            .unwrap();
        let loss = man.step(&c, &xq, &xk, s, &perm, lr);
        assert!(
            (st.loss - loss).abs() <= 1e-12 * loss.abs(),
            "step {step}: loss {} vs {loss}",
            st.loss
        );
        for (what, a, b) in [
            ("encoder_q", moco.encoder_q().params(), man.enc_q.params()),
            ("encoder_k", moco.encoder_k().params(), man.enc_k.params()),
            (
                "running_q",
                moco.encoder_q().running_stats(),
                man.enc_q.running_stats(),
            ),
            (
                "running_k",
                moco.encoder_k().running_stats(),
                man.enc_k.running_stats(),
            ),
            (
                "momentum",
                moco.optimizer().momentum_buffer(),
                man.opt.momentum_buffer(),
            ),
            ("queue", moco.queue().keys(), man.queue.keys()),
        ] {
            let r = max_rel(a, b);
            assert!(r <= 1e-12, "step {step} {what}: max rel {r:e}");
        }
        assert_eq!(moco.queue().ptr(), man.queue.ptr());
    }
    assert_eq!(moco.global_step(), 3);
}

#[test]
fn the_permutation_is_used_and_checked() {
    let c = cfg(false);
    let s = InputShape::new(c.batch_size, 1, 8, 8);
    let (xq, xk) = views(s, 1);
    let run = |perm: Vec<usize>| {
        let mut m = Moco::new(&c, Cpu::<f64>::new(), 1, 4).unwrap();
        m.step_with_permutations(&xq, &xk, s, &[perm]).unwrap();
        m.encoder_q().params().clone()
    };
    let id: Vec<usize> = (0..s.n).collect();
    // Swapping images 0 and 1 moves each to the other BatchNorm group (sample i is in
    // group i % 2): the statistics, and so the step, change.
    let mut swap = id.clone();
    swap.swap(0, 1);
    assert!(max_rel(&run(id.clone()), &run(swap)) > 1e-9);
    // The default permutation is the public one.
    let mut m = Moco::new(&c, Cpu::<f64>::new(), 1, 4).unwrap();
    let p = m.permutations(s.n);
    assert_eq!(p, vec![moco::rng::shuffle_permutation(c.seed, 0, 0, s.n)]);
    m.step(&xq, &xk, s).unwrap();
    assert_eq!(m.encoder_q().params(), &run(p[0].clone()));
    // Bad permutations are refused before anything changes.
    let before = m.encoder_k().params().clone();
    for bad in [vec![0; s.n], (1..=s.n).collect(), id[..s.n - 1].to_vec()] {
        assert!(m.step_with_permutations(&xq, &xk, s, &[bad]).is_err());
    }
    assert!(m
        .step_with_permutations(&xq, &xk, s, &[id.clone(), id])
        .is_err());
    assert_eq!(m.encoder_k().params(), &before);
    assert_eq!(m.global_step(), 1);
}

#[test]
fn f64_is_really_f64() {
    // The same step in f32 and f64 agrees to f32 rounding, and not to f64's.
    let c = cfg(true);
    let s = InputShape::new(c.batch_size, 1, 8, 8);
    let (xq, xk) = views(s, 3);
    let mut a = Moco::new(&c, Cpu::<f32>::new(), 1, 4).unwrap();
    let mut b = Moco::new(&c, Cpu::<f64>::new(), 1, 4).unwrap();
    let sa = a.step(&xq, &xk, s).unwrap();
    let sb = b.step(&xq, &xk, s).unwrap();
    let d = (sa.loss - sb.loss).abs() / sb.loss;
    assert!(d < 1e-5, "f32 vs f64 loss {d:e}");
    let pa: Vec<f64> = a.encoder_q().params().iter().map(|&v| v as f64).collect();
    let r = max_rel(&pa, b.encoder_q().params());
    assert!(r > 1e-12 && r < 1e-4, "f32 vs f64 params {r:e}");
}

#[test]
fn head_with_the_crates_resnet_gives_the_moco_step() {
    // The bring-your-own-encoder path: the caller owns two encoders and an optimizer, the
    // head owns queue and T. On the crate's ResNet it must give the crate's step exactly.
    let c = cfg(false);
    let be = Cpu::<f32>::new();
    let s = InputShape::new(c.batch_size, 1, 8, 8);
    let mut moco = Moco::new(&c, be, 1, 4).unwrap();
    let mut man = Manual::new(&c, be, 1);
    let mut head = MocoHead::new(be, c.moco_k, c.dim, c.moco_t, c.seed).unwrap();
    for step in 0..3u64 {
        let (xq, xk) = views(s, 100 + step);
        let perm = moco.permutations(s.n).remove(0);
        let lr = moco.lr();
        let st = moco.step(&xq, &xk, s).unwrap();
        // The caller's step, with the head.
        head.momentum_update(
            &mut [(man.enc_k.params_mut(), man.enc_q.params())],
            c.moco_m,
        )
        .unwrap();
        man.enc_q.zero_grad().unwrap();
        let img = s.c * s.h * s.w;
        let mut xs = vec![0.0f32; xk.len()];
        for (dst, &src) in perm.iter().enumerate() {
            xs[dst * img..(dst + 1) * img].copy_from_slice(&xk[src * img..(src + 1) * img]);
        }
        let kraw = man
            .enc_k
            .forward_no_grad(&xs, s, true, c.bn_splits)
            .unwrap();
        let mut k = vec![0.0f32; kraw.len()];
        for (dst, &src) in perm.iter().enumerate() {
            k[src * c.dim..(src + 1) * c.dim]
                .copy_from_slice(&kraw[dst * c.dim..(dst + 1) * c.dim]);
        }
        let q = man.enc_q.forward(&xq, s, true, c.bn_splits).unwrap();
        let out = head.forward_backward(&q, &k, s.n).unwrap();
        man.enc_q.backward(&out.grad_q).unwrap();
        let (p, g) = man.enc_q.params_and_grads();
        man.opt.step(p, g, lr).unwrap();
        head.enqueue(&out.keys).unwrap();
        assert_eq!(st.loss, out.stats.loss, "step {step}");
        assert_eq!(st.accuracy, out.stats.accuracy, "step {step}");
        assert_eq!(moco.encoder_q().params(), man.enc_q.params(), "step {step}");
        assert_eq!(moco.encoder_k().params(), man.enc_k.params(), "step {step}");
        assert_eq!(moco.queue().keys(), head.queue().keys(), "step {step}");
        assert_eq!(moco.queue().ptr(), head.queue().ptr());
    }
    // Mismatched pairs are refused before any is written.
    let (mut a, b) = (vec![1.0f32; 4], vec![0.0f32; 4]);
    let (mut c2, d) = (vec![1.0f32; 4], vec![0.0f32; 3]);
    assert!(head
        .momentum_update(&mut [(&mut a, &b), (&mut c2, &d)], 0.5)
        .is_err());
    assert_eq!(a, vec![1.0; 4]);
    assert!(head.momentum_update(&mut [(&mut a, &b)], 1.5).is_err());
    assert!(MocoHead::new(be, 4, 2, 0.0, 0).is_err());
}

#[test]
fn state_round_trips_through_tensors() {
    let c = cfg(false);
    let s = InputShape::new(c.batch_size, 1, 8, 8);
    let mut a = Moco::new(&c, Cpu::<f32>::new(), 1, 4).unwrap();
    for step in 0..2 {
        let (xq, xk) = views(s, step);
        a.step(&xq, &xk, s).unwrap();
    }
    let b = Moco::from_tensors(
        &c,
        Cpu::<f32>::new(),
        1,
        4,
        &a.tensors().unwrap(),
        a.counters(),
    )
    .unwrap();
    let (xq, xk) = views(s, 9);
    let (mut a, mut b) = (a, b);
    assert_eq!(a.step(&xq, &xk, s).unwrap(), b.step(&xq, &xk, s).unwrap());
    assert_eq!(a.tensors().unwrap(), b.tensors().unwrap());
    assert_eq!(a.counters(), b.counters());
    // A tensor of the wrong size is refused and changes nothing.
    let mut t = a.tensors().unwrap();
    t[0].data.pop();
    let before = b.tensors().unwrap();
    assert!(b.load_tensors(&t, a.counters()).is_err());
    assert_eq!(b.tensors().unwrap(), before);
}

#[test]
fn library_export_equals_the_cli_files_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(cfg(false), Cpu::<f32>::new()).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    t.train_epoch(&stop, &mut |_| {}).unwrap();
    t.finish_epoch();
    t.save_checkpoint(dir.path()).unwrap();
    let lib = ExportOptions {
        out: Some(dir.path().join("lib.safetensors")),
        head: true,
        queue: Some(dir.path().join("lib_queue.safetensors")),
        force: false,
    };
    export_run(dir.path(), &lib).unwrap();
    // MOCO_BIN: the staged CLI where the build path does not exist (a GPU machine).
    let bin = std::env::var("MOCO_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_moco").to_string());
    let out = Command::new(bin)
        .args(["export", "--checkpoint"])
        .arg(dir.path())
        .arg("--head")
        .arg("--out")
        .arg(dir.path().join("cli.safetensors"))
        .arg("--queue")
        .arg(dir.path().join("cli_queue.safetensors"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (a, b) in [
        ("lib.safetensors", "cli.safetensors"),
        ("lib_queue.safetensors", "cli_queue.safetensors"),
    ] {
        let (x, y) = (
            std::fs::read(dir.path().join(a)).unwrap(),
            std::fs::read(dir.path().join(b)).unwrap(),
        );
        assert!(!x.is_empty());
        assert_eq!(x, y, "{a} vs {b}");
    }
}

// ---- On a GPU: the same calls on `Cuda` buffers against the CPU reference ----

fn worst(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn head_on_cuda_matches_the_cpu_head() {
    use moco::backend::Cuda;
    let gpu = Cuda::new(moco::testing::test_gpu()).unwrap();
    let cpu = Cpu::<f32>::new();
    let (n, c, k) = (24, 16, 100); // 100 keys: the enqueue wraps on the fifth step
    let mut hg = MocoHead::new(gpu.clone(), k, c, 0.2, 3).unwrap();
    let mut hc = MocoHead::new(cpu, k, c, 0.2, 3).unwrap();
    let (mut wk_g, wq_g) = (
        gpu.upload_f32(&[0.0; 7]).unwrap(),
        gpu.upload_f32(&[1.0; 7]).unwrap(),
    );
    let (mut wk_c, wq_c) = (vec![0.0f32; 7], vec![1.0f32; 7]);
    for step in 0..6 {
        let q = moco::rng::normal(n * c, 10 + step);
        let kk = moco::rng::normal(n * c, 20 + step);
        let og = hg
            .forward_backward(
                &gpu.upload_f32(&q).unwrap(),
                &gpu.upload_f32(&kk).unwrap(),
                n,
            )
            .unwrap();
        let oc = hc.forward_backward(&q, &kk, n).unwrap();
        assert!((og.stats.loss - oc.stats.loss).abs() < 1e-5 * oc.stats.loss.abs().max(1.0));
        assert_eq!(og.stats.accuracy, oc.stats.accuracy);
        assert!(worst(&gpu.download_f32(&og.grad_q).unwrap(), &oc.grad_q) < 1e-5);
        assert!(worst(&gpu.download_f32(&og.keys).unwrap(), &oc.keys) < 1e-6);
        hg.enqueue(&og.keys).unwrap();
        hc.enqueue(&oc.keys).unwrap();
        assert_eq!(hg.queue().ptr(), hc.queue().ptr());
        assert!(
            worst(
                &hg.queue().to_host().unwrap(),
                &hc.queue().to_host().unwrap()
            ) < 1e-6
        );
        hg.momentum_update(&mut [(&mut wk_g, &wq_g)], 0.9).unwrap();
        hc.momentum_update(&mut [(&mut wk_c, &wq_c)], 0.9).unwrap();
        assert!(worst(&gpu.download_f32(&wk_g).unwrap(), &wk_c) < 1e-6);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn moco_step_on_cuda_matches_the_cpu_step() {
    use moco::backend::Cuda;
    let c = cfg(false);
    let gpu = Cuda::new(moco::testing::test_gpu()).unwrap();
    let mut mg = Moco::new(&c, gpu.clone(), 3, 100).unwrap();
    let mut mc = Moco::new(&c, Cpu::<f32>::new(), 3, 100).unwrap();
    let s = InputShape::new(c.batch_size, 3, 8, 8);
    for step in 0..3 {
        let (xq, xk) = (
            moco::rng::uniform(s.len(), 40 + step),
            moco::rng::uniform(s.len(), 50 + step),
        );
        let a = mg.step(&xq, &xk, s).unwrap();
        let b = mc.step(&xq, &xk, s).unwrap();
        assert!(
            (a.loss - b.loss).abs() < 1e-4 * b.loss.abs().max(1.0),
            "{a:?} vs {b:?}"
        );
    }
    // Loss (above), queue, key encoder and running statistics: tight. The key encoder is
    // the EMA of the query encoder, moved by (1 - m) of a query update per step, and the
    // queue holds its normalized outputs; a ReLU flip in the query encoder's backward
    // reaches them only through that factor. The query encoder's update (parameters minus
    // their common initialization) and the SGD momentum are gradients: flip-aware
    // (moco::testing::FLIP_REL_TOL), per parameter tensor.
    let tg = mg.tensors().unwrap();
    let tc = mc.tensors().unwrap();
    let init = Moco::new(&c, Cpu::<f32>::new(), 3, 100)
        .unwrap()
        .tensors()
        .unwrap();
    let table = mc.encoder_q().table().clone();
    for ((g, h), i) in tg.iter().zip(&tc).zip(&init) {
        assert_eq!(g.name, h.name);
        match g.name.as_str() {
            "encoder_q.params" | "optimizer.momentum" => {
                let from = |t: &[f32]| -> Vec<f32> {
                    if g.name == "encoder_q.params" {
                        t.iter().zip(&i.data).map(|(a, b)| a - b).collect()
                    } else {
                        t.to_vec()
                    }
                };
                let (dg, dc) = (from(&g.data), from(&h.data));
                assert!(dc.iter().any(|&v| v != 0.0), "{}: nothing moved", g.name);
                for e in table.params() {
                    let r = e.offset..e.offset + e.len;
                    moco::testing::assert_close_flip_aware(
                        &format!("{} {}", g.name, e.name),
                        &dg[r.clone()],
                        &dc[r],
                    );
                }
            }
            _ => {
                let scale = h.data.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                let w = worst(&g.data, &h.data);
                assert!(w < 1e-4 * scale, "{}: GPU and CPU differ by {w}", g.name);
            }
        }
    }
    assert_eq!(mg.counters(), mc.counters());
}
