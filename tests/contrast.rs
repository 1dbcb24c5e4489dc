//! Logits and InfoNCE: CPU reference against formulas and finite differences; CUDA (fused
//! and unfused) against the CPU reference over seeded random inputs and edge shapes.
use moco::ops::{
    infonce_cpu, infonce_f64, infonce_symmetric_cpu, l2_normalize_cpu, logits_cpu, Contrast,
    ContrastShape, InfoNceImpl,
};
use moco::testing::{assert_close, normal, POISON};

fn shape(n: usize, c: usize, k: usize, t: f32) -> ContrastShape {
    ContrastShape::new(n, c, k, t as f64).unwrap()
}

fn unit_queue(k: usize, c: usize, seed: u64) -> Vec<f32> {
    l2_normalize_cpu(&normal(k * c, seed), k, c).unwrap().0
}

#[test]
fn normalize_matches_definition() {
    let x = normal(7 * 5, 1);
    let (y, norms) = l2_normalize_cpu(&x, 7, 5).unwrap();
    for r in 0..7 {
        let nrm = x[r * 5..r * 5 + 5]
            .iter()
            .map(|v| (*v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((norms[r] as f64 - nrm).abs() < 1e-6 * nrm);
        let yn = y[r * 5..r * 5 + 5]
            .iter()
            .map(|v| (*v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((yn - 1.0).abs() < 1e-6, "row {r} has norm {yn}");
    }
    // A zero row stays zero (norm clamped to eps), as F.normalize.
    let (z, _) = l2_normalize_cpu(&[0.0; 3], 1, 3).unwrap();
    assert_eq!(z, vec![0.0; 3]);
    assert!(l2_normalize_cpu(&[1.0; 5], 2, 3).is_err());
}

#[test]
fn logits_match_naive_formula() {
    let s = shape(3, 4, 5, 0.07);
    let q = normal(12, 1);
    let k = normal(12, 2);
    let queue = unit_queue(5, 4, 3);
    let l = logits_cpu(&q, &k, &queue, s).unwrap();
    let (qn, _) = l2_normalize_cpu(&q, 3, 4).unwrap();
    let (kn, _) = l2_normalize_cpu(&k, 3, 4).unwrap();
    for i in 0..3 {
        let pos: f32 = (0..4).map(|c| qn[i * 4 + c] * kn[i * 4 + c]).sum::<f32>() / 0.07;
        assert!((l[i * 6] - pos).abs() < 1e-4, "positive {i}");
        for j in 0..5 {
            let neg: f32 = (0..4)
                .map(|c| qn[i * 4 + c] * queue[j * 4 + c])
                .sum::<f32>()
                / 0.07;
            assert!((l[i * 6 + 1 + j] - neg).abs() < 1e-4, "negative {i},{j}");
        }
    }
}

/// Loss from logits by the textbook formula, to pin the reference's loss independently.
#[test]
fn loss_matches_cross_entropy_of_logits() {
    let s = shape(4, 8, 16, 0.2);
    let q = normal(32, 4);
    let k = normal(32, 5);
    let queue = unit_queue(16, 8, 6);
    let l = logits_cpu(&q, &k, &queue, s).unwrap();
    let mut want = 0.0f64;
    let mut correct = 0;
    for i in 0..4 {
        let row = &l[i * 17..(i + 1) * 17];
        let lse = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        want += lse - row[0] as f64;
        correct += (row[1..].iter().all(|&v| row[0] >= v)) as usize;
    }
    let out = infonce_cpu(&q, &k, &queue, s).unwrap();
    assert!(
        (out.loss - want / 4.0).abs() < 1e-5,
        "{} vs {}",
        out.loss,
        want / 4.0
    );
    assert_eq!(out.accuracy, correct as f64 / 4.0);
}

/// Central finite differences of the f64 loss with respect to every element of q.
#[test]
fn gradient_matches_finite_differences() {
    for &(n, c, k, t) in &[
        (3usize, 5usize, 7usize, 0.2f32),
        (2, 3, 4, 0.07),
        (1, 1, 1, 0.5),
    ] {
        let s = shape(n, c, k, t);
        let q: Vec<f64> = normal(n * c, 10).iter().map(|&v| v as f64).collect();
        let kk: Vec<f64> = normal(n * c, 11).iter().map(|&v| v as f64).collect();
        let queue: Vec<f64> = unit_queue(k, c, 12).iter().map(|&v| v as f64).collect();
        let (_, grad, _) = infonce_f64(&q, &kk, &queue, s).unwrap();
        let h = 1e-6;
        for i in 0..n * c {
            let mut qp = q.clone();
            qp[i] += h;
            let mut qm = q.clone();
            qm[i] -= h;
            let fd = (infonce_f64(&qp, &kk, &queue, s).unwrap().0
                - infonce_f64(&qm, &kk, &queue, s).unwrap().0)
                / (2.0 * h);
            let err = (fd - grad[i]).abs();
            assert!(
                err <= 1e-6 * (1.0 + fd.abs()),
                "shape {s:?} elem {i}: analytic {} vs fd {fd}",
                grad[i]
            );
        }
    }
}

#[test]
fn symmetric_is_sum_of_halves() {
    let s = shape(3, 4, 6, 0.1);
    let (q1, k1, q2, k2) = (normal(12, 1), normal(12, 2), normal(12, 3), normal(12, 4));
    let queue = unit_queue(6, 4, 5);
    let (loss, acc, g1, g2) = infonce_symmetric_cpu(&q1, &k1, &q2, &k2, &queue, s).unwrap();
    let a = infonce_cpu(&q1, &k2, &queue, s).unwrap();
    let b = infonce_cpu(&q2, &k1, &queue, s).unwrap();
    assert_eq!(loss, a.loss + b.loss);
    assert_eq!(acc, 0.5 * (a.accuracy + b.accuracy));
    assert_eq!(g1, a.grad_q);
    assert_eq!(g2, b.grad_q);
}

#[test]
fn invalid_shapes_are_errors() {
    assert!(ContrastShape::new(2, 2, 2, 0.0).is_err());
    assert!(ContrastShape::new(2, 2, 2, -1.0).is_err());
    assert!(ContrastShape::new(2, 2, 2, f64::NAN).is_err());
    assert!(ContrastShape::new(2, 0, 2, 0.1).is_err());
    assert!(ContrastShape::new(2, 2, 0, 0.1).is_err());
    let s = shape(2, 3, 4, 0.1);
    let e = infonce_cpu(&[0.0; 5], &[0.0; 6], &[0.0; 12], s).unwrap_err();
    assert!(e.to_string().contains("q has 5 elements"), "{e}");
    assert!(logits_cpu(&[0.0; 6], &[0.0; 6], &[0.0; 11], s).is_err());
}

// ------------------------------------------------------------------------------------------
// GPU vs CPU.

/// Rows whose positive logit is within fp32 rounding of their best negative.
fn ambiguous_rows(q: &[f32], k: &[f32], queue: &[f32], s: ContrastShape) -> usize {
    let l = logits_cpu(q, k, queue, s).unwrap();
    l.chunks(1 + s.k)
        .filter(|row| {
            let best = row[1..].iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            (row[0] - best).abs() <= 1e-5 * (1.0 / s.t32())
        })
        .count()
}

fn check_gpu_case(
    contrast: &mut Contrast,
    n: usize,
    c: usize,
    k: usize,
    t: f32,
    seed: u64,
    imps: &[InfoNceImpl],
) {
    let gpu = contrast.gpu().clone();
    let s = shape(n, c, k, t);
    let q = normal(n * c, seed);
    let kk = normal(n * c, seed + 1);
    let queue = unit_queue(k, c, seed + 2);
    let want = infonce_cpu(&q, &kk, &queue, s).unwrap();
    let (qd, kd, ud) = (
        gpu.upload(&q).unwrap(),
        gpu.upload(&kk).unwrap(),
        gpu.upload(&queue).unwrap(),
    );
    for &imp in imps {
        let mut grad = gpu.upload(&vec![POISON; n * c]).unwrap();
        let stats = contrast.infonce(&qd, &kd, &ud, s, &mut grad, imp).unwrap();
        let got = gpu.download(&grad).unwrap();
        let what = format!("{imp:?} N={n} C={c} K={k} T={t}");
        assert!(
            (stats.loss - want.loss).abs() <= 1e-5 * want.loss.abs().max(1.0),
            "{what}: loss {} vs {}",
            stats.loss,
            want.loss
        );
        // Accuracy can differ only on rows where the positive ties the best negative within
        // fp32 rounding (with C = 1 every logit is +-1/T, so most rows tie).
        let ties = ambiguous_rows(&q, &kk, &queue, s);
        assert!(
            (stats.accuracy - want.accuracy).abs() * n as f64 <= ties as f64 + 1e-9,
            "{what}: acc {} vs {} with {ties} tied rows",
            stats.accuracy,
            want.accuracy
        );
        // fp32 error in dL/dqn is relative to its scale 1/(N T); the normalization backward
        // divides it by ||q||. That is the absolute floor; above it, 1e-4 relative.
        let (_, norms) = l2_normalize_cpu(&q, n, c).unwrap();
        let min_norm = norms.iter().fold(f32::INFINITY, |a, &b| a.min(b)).max(1e-6) as f64;
        let abs_tol = 1e-5 / (n as f64 * t as f64) / min_norm;
        let (rel, max_abs) = moco::testing::rel_err(&got, &want.grad_q);
        let ref_norm = want
            .grad_q
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            max_abs <= abs_tol,
            "{what}: grad max abs err {max_abs:.3e} > {abs_tol:.3e}"
        );
        if ref_norm > 1e3 * abs_tol {
            assert!(rel <= 1e-4, "{what}: grad rel err {rel:.3e}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_infonce_matches_cpu_edge_shapes() {
    let gpu = moco::testing::test_gpu();
    let mut contrast = Contrast::new(&gpu);
    let both = [InfoNceImpl::Fused, InfoNceImpl::Unfused];
    let mut seed = 100;
    for &n in &[1usize, 7, 256, 257] {
        for &c in &[1usize, 3, 128, 256] {
            for &k in &[1usize, 33, 4096] {
                for &t in &[0.07f32, 0.2] {
                    seed += 3;
                    check_gpu_case(&mut contrast, n, c, k, t, seed, &both);
                }
            }
        }
    }
    for &(n, c) in &[(256usize, 128usize), (7, 3), (257, 256), (1, 1)] {
        seed += 3;
        check_gpu_case(&mut contrast, n, c, 65536, 0.07, seed, &both);
    }
    // Above the fused kernel's C limit the fused request falls back to the unfused path.
    check_gpu_case(&mut contrast, 9, 300, 100, 0.2, 7, &both);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_logits_match_cpu() {
    let gpu = moco::testing::test_gpu();
    let mut contrast = Contrast::new(&gpu);
    for &(n, c, k, t) in &[
        (1usize, 1usize, 1usize, 0.07f32),
        (7, 3, 33, 0.2),
        (257, 128, 4096, 0.07),
        (256, 256, 65536, 0.2),
    ] {
        let s = shape(n, c, k, t);
        let q = normal(n * c, 1);
        let kk = normal(n * c, 2);
        let queue = unit_queue(k, c, 3);
        let want = logits_cpu(&q, &kk, &queue, s).unwrap();
        let mut out = gpu.upload(&vec![POISON; n * (1 + k)]).unwrap();
        contrast
            .logits(
                &gpu.upload(&q).unwrap(),
                &gpu.upload(&kk).unwrap(),
                &gpu.upload(&queue).unwrap(),
                s,
                &mut out,
            )
            .unwrap();
        assert_close(
            &format!("logits {s:?}"),
            &gpu.download(&out).unwrap(),
            &want,
            1e-5,
            1e-4,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_normalize_matches_cpu() {
    let gpu = moco::testing::test_gpu();
    let mut contrast = Contrast::new(&gpu);
    for &(n, c) in &[(1usize, 1usize), (7, 3), (257, 128), (3, 1000)] {
        let mut x = normal(n * c, 5);
        x[..c].iter_mut().for_each(|v| *v = 0.0); // a zero row
        let (want, _) = l2_normalize_cpu(&x, n, c).unwrap();
        let mut out = gpu.upload(&vec![POISON; n * c]).unwrap();
        contrast
            .normalize(&gpu.upload(&x).unwrap(), &mut out, n, c)
            .unwrap();
        assert_close(
            &format!("normalize {n}x{c}"),
            &gpu.download(&out).unwrap(),
            &want,
            1e-6,
            1e-6,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_symmetric_matches_cpu() {
    let gpu = moco::testing::test_gpu();
    let mut contrast = Contrast::new(&gpu);
    let s = shape(64, 128, 4096, 0.1);
    let v: Vec<Vec<f32>> = (0..4).map(|i| normal(64 * 128, 40 + i)).collect();
    let queue = unit_queue(4096, 128, 44);
    let (loss, _, g1, g2) = infonce_symmetric_cpu(&v[0], &v[1], &v[2], &v[3], &queue, s).unwrap();
    let d: Vec<_> = v.iter().map(|x| gpu.upload(x).unwrap()).collect();
    let ud = gpu.upload(&queue).unwrap();
    let mut gd1 = gpu.upload(&vec![POISON; 64 * 128]).unwrap();
    let mut gd2 = gpu.upload(&vec![POISON; 64 * 128]).unwrap();
    let st = contrast
        .infonce_symmetric(
            &d[0],
            &d[1],
            &d[2],
            &d[3],
            &ud,
            s,
            &mut gd1,
            &mut gd2,
            InfoNceImpl::Fused,
        )
        .unwrap();
    assert!((st.loss - loss).abs() < 1e-5 * loss);
    assert_close("sym g1", &gpu.download(&gd1).unwrap(), &g1, 1e-4, 1e-6);
    assert_close("sym g2", &gpu.download(&gd2).unwrap(), &g2, 1e-4, 1e-6);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_rejects_bad_input_without_launching() {
    let gpu = moco::testing::test_gpu();
    let mut contrast = Contrast::new(&gpu);
    let s = shape(2, 4, 8, 0.1);
    let q = gpu.upload(&[1.0f32; 8]).unwrap();
    let short = gpu.upload(&[1.0f32; 7]).unwrap();
    let queue = gpu.upload(&[1.0f32; 32]).unwrap();
    let mut grad = gpu.upload(&[POISON; 8]).unwrap();
    assert!(contrast
        .infonce(&q, &short, &queue, s, &mut grad, InfoNceImpl::Fused)
        .is_err());
    assert!(contrast
        .infonce(&q, &q, &short, s, &mut grad, InfoNceImpl::Unfused)
        .is_err());
    let mut small = gpu.upload(&[POISON; 7]).unwrap();
    assert!(contrast
        .infonce(&q, &q, &queue, s, &mut small, InfoNceImpl::Fused)
        .is_err());
    let mut logits = gpu.upload(&[POISON; 17]).unwrap();
    assert!(contrast.logits(&q, &q, &queue, s, &mut logits).is_err());
    assert!(
        gpu.download(&grad).unwrap().iter().all(|v| v.is_nan()),
        "nothing written"
    );
}
