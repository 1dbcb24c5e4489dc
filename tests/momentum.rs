//! Momentum (EMA) update: CPU reference and CUDA against it.
use moco::ops::{momentum_update, momentum_update_cpu};
use moco::testing::{assert_close, uniform};

/// Plain scalar f64 formula, independent of the chunked implementation.
fn naive(key: &[f32], query: &[f32], m: f32) -> Vec<f32> {
    key.iter()
        .zip(query)
        .map(|(&k, &q)| (m as f64 * k as f64 + (1.0 - m as f64) * q as f64) as f32)
        .collect()
}

#[test]
fn cpu_matches_formula() {
    for &n in &[0usize, 1, 3, 4, 5, 1000, 65_537, 200_001] {
        for &m in &[0.0f32, 0.5, 0.99, 0.999, 1.0] {
            let q = uniform(n, 1);
            let k0 = uniform(n, 2);
            let mut k = k0.clone();
            momentum_update_cpu(&mut k, &q, m).unwrap();
            assert_eq!(k, naive(&k0, &q, m), "n={n} m={m}");
        }
    }
}

#[test]
fn cpu_edge_momenta() {
    let q = uniform(100, 3);
    let k0 = uniform(100, 4);
    let mut k = k0.clone();
    momentum_update_cpu(&mut k, &q, 1.0).unwrap();
    assert_eq!(k, k0, "m = 1 keeps the key");
    momentum_update_cpu(&mut k, &q, 0.0).unwrap();
    assert_eq!(k, q, "m = 0 copies the query");
}

#[test]
fn cpu_rejects_bad_input() {
    let mut k = vec![1.0f32; 4];
    for m in [-0.1f32, 1.0001, f32::NAN, f32::INFINITY] {
        let e = momentum_update_cpu(&mut k, &[0.0; 4], m).unwrap_err();
        assert!(e.to_string().contains("[0, 1]"), "{e}");
    }
    let e = momentum_update_cpu(&mut k, &[0.0; 3], 0.5).unwrap_err();
    assert!(e.to_string().contains("equal length"), "{e}");
    assert_eq!(k, vec![1.0; 4], "nothing changed on error");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_matches_cpu_all_lengths_and_alignments() {
    let gpu = moco::testing::test_gpu();
    for &n in &[
        1usize, 2, 3, 4, 5, 7, 8, 255, 256, 1023, 4097, 65_536, 1_000_003, 11_200_000,
    ] {
        for &(ko, qo) in &[
            (0usize, 0usize),
            (1, 1),
            (2, 2),
            (3, 3),
            (1, 0),
            (0, 3),
            (2, 1),
        ] {
            let q_all = uniform(n + qo, n as u64);
            let k_all = uniform(n + ko, n as u64 + 7);
            let m = 0.999f32;
            let mut want = k_all.clone();
            momentum_update_cpu(&mut want[ko..], &q_all[qo..], m).unwrap();
            // Offsets into larger buffers exercise every relative alignment.
            let mut kd = gpu.upload(&k_all).unwrap();
            let qd = gpu.upload(&q_all).unwrap();
            {
                let mut kv = kd.slice_mut(ko..);
                let qv = qd.slice(qo..);
                momentum_update(&gpu, &mut kv, &qv, m).unwrap();
            }
            let got = gpu.download(&kd).unwrap();
            assert_close(
                &format!("ema n={n} ko={ko} qo={qo}"),
                &got,
                &want,
                1e-6,
                1e-6,
            );
            assert_eq!(
                &got[..ko],
                &k_all[..ko],
                "elements before the view untouched"
            );
        }
    }
    // Whole-slice entry point.
    let q = uniform(12_345, 9);
    let k = uniform(12_345, 10);
    let mut want = k.clone();
    momentum_update_cpu(&mut want, &q, 0.9).unwrap();
    let mut kd = gpu.upload(&k).unwrap();
    momentum_update(&gpu, &mut kd, &gpu.upload(&q).unwrap(), 0.9).unwrap();
    assert_close("ema slice", &gpu.download(&kd).unwrap(), &want, 1e-6, 1e-6);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_rejects_bad_input_without_launching() {
    let gpu = moco::testing::test_gpu();
    let mut k = gpu.upload(&[1.0f32; 8]).unwrap();
    let q = gpu.upload(&[0.0f32; 7]).unwrap();
    assert!(momentum_update(&gpu, &mut k, &q, 0.5).is_err());
    let q = gpu.upload(&[0.0f32; 8]).unwrap();
    assert!(momentum_update(&gpu, &mut k, &q, 1.5).is_err());
    assert!(momentum_update(&gpu, &mut k, &q, f32::NAN).is_err());
    assert_eq!(
        gpu.download(&k).unwrap(),
        vec![1.0; 8],
        "nothing written on error"
    );
}

#[test]
fn multi_cpu_matches_single() {
    let qs: Vec<Vec<f32>> = [0usize, 1, 5, 70_000]
        .iter()
        .map(|&n| uniform(n, n as u64))
        .collect();
    let ks0: Vec<Vec<f32>> = [0usize, 1, 5, 70_000]
        .iter()
        .map(|&n| uniform(n, n as u64 + 1))
        .collect();
    let mut ks = ks0.clone();
    {
        let mut pairs: Vec<(&mut [f32], &[f32])> = ks
            .iter_mut()
            .zip(&qs)
            .map(|(k, q)| (k.as_mut_slice(), q.as_slice()))
            .collect();
        moco::ops::momentum_update_multi_cpu(&mut pairs, 0.99).unwrap();
    }
    for i in 0..4 {
        assert_eq!(ks[i], naive(&ks0[i], &qs[i], 0.99));
    }
    // A bad pair anywhere rejects the whole call before anything changes.
    let mut a = vec![1.0f32; 3];
    let mut b = vec![1.0f32; 3];
    let res = {
        let mut pairs: Vec<(&mut [f32], &[f32])> = vec![(&mut a, &[0.0; 3]), (&mut b, &[0.0; 2])];
        moco::ops::momentum_update_multi_cpu(&mut pairs, 0.5)
    };
    assert!(res.is_err());
    assert_eq!(a, vec![1.0; 3]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_multi_tensor_matches_cpu() {
    let gpu = moco::testing::test_gpu();
    let lens = [1usize, 3, 4, 1000, 65_536, 65_537, 300_001, 0, 17];
    let qs: Vec<Vec<f32>> = lens.iter().map(|&n| uniform(n, n as u64 + 50)).collect();
    let ks: Vec<Vec<f32>> = lens.iter().map(|&n| uniform(n, n as u64 + 51)).collect();
    let mut kd: Vec<_> = ks.iter().map(|k| gpu.upload(k).unwrap()).collect();
    let qd: Vec<_> = qs.iter().map(|q| gpu.upload(q).unwrap()).collect();
    {
        let mut pairs: Vec<_> = kd.iter_mut().zip(&qd).collect();
        moco::ops::momentum_update_multi(&gpu, &mut pairs, 0.999).unwrap();
    }
    for i in 0..lens.len() {
        let want = naive(&ks[i], &qs[i], 0.999);
        assert_close(
            &format!("multi pair {i}"),
            &gpu.download(&kd[i]).unwrap(),
            &want,
            1e-6,
            1e-6,
        );
    }
    // Misaligned views in the same launch.
    let big_k = uniform(10_003, 1);
    let big_q = uniform(10_003, 2);
    let mut bk = gpu.upload(&big_k).unwrap();
    let bq = gpu.upload(&big_q).unwrap();
    {
        let (mut a, mut b) = bk.split_at_mut(5001);
        let (qa, qb) = (bq.slice(1..5002), bq.slice(5001..10_003));
        let mut va = a.slice_mut(..);
        let mut vb = b.slice_mut(..);
        let mut pairs = vec![(&mut va, &qa), (&mut vb, &qb)];
        moco::ops::momentum_update_multi(&gpu, &mut pairs, 0.9).unwrap();
    }
    let mut want = big_k.clone();
    momentum_update_cpu(&mut want[..5001], &big_q[1..5002], 0.9).unwrap();
    momentum_update_cpu(&mut want[5001..], &big_q[5001..], 0.9).unwrap();
    assert_close(
        "multi views",
        &gpu.download(&bk).unwrap(),
        &want,
        1e-6,
        1e-6,
    );
}

/// The bf16-copy reference: the f32 key exactly as the plain update, and its copy the
/// round-to-nearest-even bf16 of each new key (checked bit by bit against `half`, and on a
/// tie, where truncation would differ); nothing changes on a length error.
#[test]
fn bf16_copy_reference_rounds_the_updated_key() {
    use half::bf16;
    let q = uniform(1000, 5);
    let k0 = uniform(1000, 6);
    let mut k = k0.clone();
    let mut copy = vec![bf16::ZERO; 1000];
    moco::ops::momentum_update_bf16_copy_cpu(&mut k, &q, &mut copy, 0.99).unwrap();
    assert_eq!(k, naive(&k0, &q, 0.99));
    for (c, &v) in copy.iter().zip(&k) {
        assert_eq!(c.to_bits(), bf16::from_f32(v).to_bits());
    }
    // m = 1 keeps the key: 1 + 2^-8 + 2^-16 rounds up (above the tie), 1 + 2^-8 to even.
    let mut k = vec![1.0 + 2f32.powi(-8) + 2f32.powi(-16), 1.0 + 2f32.powi(-8)];
    let mut copy = vec![bf16::ZERO; 2];
    moco::ops::momentum_update_bf16_copy_cpu(&mut k, &[0.0, 0.0], &mut copy, 1.0).unwrap();
    assert_eq!(copy, vec![bf16::from_f32(1.0 + 2f32.powi(-7)), bf16::ONE]);
    let mut short = vec![bf16::ZERO; 1];
    let e =
        moco::ops::momentum_update_bf16_copy_cpu(&mut k, &[0.0, 0.0], &mut short, 0.5).unwrap_err();
    assert!(e.to_string().contains("equal length"), "{e}");
    assert_eq!(short, vec![bf16::ZERO], "nothing changed on error");
}

/// CUDA: the f32 key equals the f32-only kernel's result bit for bit, and the bf16 copy is
/// exactly the rounding of that key, at lengths and offsets that are not multiples of 4.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_bf16_copy_matches_the_f32_update_and_rounds_it() {
    use half::bf16;
    let gpu = moco::testing::test_gpu();
    for &n in &[1usize, 3, 255, 4097, 1_000_003] {
        let q = uniform(n + 1, 7);
        let k0 = uniform(n + 1, 8);
        let qd = gpu.upload(&q).unwrap();
        let mut plain = gpu.upload(&k0).unwrap();
        let mut fused = gpu.upload(&k0).unwrap();
        let mut copy = gpu.zeros::<bf16>(n).unwrap();
        momentum_update(&gpu, &mut plain.slice_mut(1..), &qd.slice(1..), 0.99).unwrap();
        moco::ops::momentum_update_bf16_copy(
            &gpu,
            &mut fused.slice_mut(1..),
            &qd.slice(1..),
            &mut copy,
            0.99,
        )
        .unwrap();
        let (plain, fused) = (gpu.download(&plain).unwrap(), gpu.download(&fused).unwrap());
        assert_eq!(plain, fused, "n={n}: the f32 key as the f32-only kernel");
        let copy = gpu.download(&copy).unwrap();
        for (i, (c, &v)) in copy.iter().zip(&fused[1..]).enumerate() {
            assert_eq!(c.to_bits(), bf16::from_f32(v).to_bits(), "n={n} [{i}]");
        }
        assert_close(
            "bf16 copy vs cpu",
            &fused[1..],
            &naive(&k0[1..], &q[1..], 0.99),
            1e-6,
            1e-6,
        );
    }
}
