//! Circular enqueue and the Queue type.
use moco::backend::{Cpu, Cuda};
use moco::ops::{enqueue, enqueue_cpu, Queue};
use moco::testing::{normal, POISON};

#[test]
fn enqueue_wraps_around() {
    // K = 5 rows of C = 2; N = 3 keys, pointer walks 0 -> 3 -> 1 -> 4.
    let (k, c) = (5, 2);
    let mut q = vec![0.0f32; k * c];
    let mut ptr = 0;
    let mut expect = vec![0.0f32; k * c];
    for step in 0..3 {
        let keys: Vec<f32> = (0..3 * c).map(|i| (step * 100 + i) as f32).collect();
        for i in 0..3 {
            let row = (ptr + i) % k;
            expect[row * c..row * c + c].copy_from_slice(&keys[i * c..i * c + c]);
        }
        ptr = enqueue_cpu(&mut q, &keys, k, c, ptr).unwrap();
        assert_eq!(q, expect, "step {step}");
    }
    assert_eq!(ptr, 4);
}

#[test]
fn enqueue_rejects_bad_input_and_changes_nothing() {
    let mut q = vec![1.0f32; 8];
    assert!(enqueue_cpu(&mut q, &[0.0; 10], 4, 2, 0)
        .unwrap_err()
        .to_string()
        .contains("does not fit"));
    assert!(
        enqueue_cpu(&mut q, &[0.0; 3], 4, 2, 0).is_err(),
        "not a multiple of C"
    );
    assert!(
        enqueue_cpu(&mut q, &[0.0; 2], 4, 2, 4).is_err(),
        "pointer out of range"
    );
    assert!(
        enqueue_cpu(&mut q, &[0.0; 2], 3, 2, 0).is_err(),
        "queue size mismatch"
    );
    assert_eq!(q, vec![1.0; 8]);
}

#[test]
fn queue_init_is_unit_rows_and_seeded() {
    let be = Cpu::<f32>::new();
    let a = Queue::new(&be, 16, 8, 3).unwrap();
    let b = Queue::new(&be, 16, 8, 3).unwrap();
    let c = Queue::new(&be, 16, 8, 4).unwrap();
    assert_eq!(a.keys(), b.keys());
    assert_ne!(a.keys(), c.keys());
    for row in a.keys().chunks(8) {
        let n: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5);
    }
    assert!(Queue::new(&be, 0, 8, 0).is_err());
    // The public initial keys are what the queue starts from.
    assert_eq!(a.keys(), &moco::ops::initial_keys(16, 8, 3).unwrap());
}

#[test]
fn f64_queue_keeps_f64_keys_and_matches_the_f32_queue() {
    let q64 = Queue::new(&Cpu::<f64>::new(), 16, 8, 3).unwrap();
    let q32 = Queue::new(&Cpu::<f32>::new(), 16, 8, 3).unwrap();
    // Unit rows to f64 rounding, not f32's.
    for row in q64.keys().chunks(8) {
        let n: f64 = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((n - 1.0).abs() < 1e-14, "norm {n}");
    }
    let rounded: Vec<f32> = q64.keys().iter().map(|&v| v as f32).collect();
    assert_eq!(&rounded, q32.keys());
    // An enqueue keeps every bit of an f64 key.
    let mut q = q64;
    let key: Vec<f64> = (0..8).map(|i| 1.0 / 3.0 + i as f64 * 1e-12).collect();
    q.enqueue(&key).unwrap();
    assert_eq!(&q.keys()[..8], &key[..]);
    assert_eq!(q.to_host_f64().unwrap()[..8], key[..]);
    // Wrong sizes are refused and change nothing.
    let before = q.keys().clone();
    assert!(q.enqueue(&vec![0.0f64; 7]).is_err());
    assert!(q.enqueue(&vec![0.0f64; 17 * 8]).is_err());
    assert_eq!(q.keys(), &before);
    assert_eq!(q.ptr(), 1);
}

#[test]
fn pytorch_layout_is_transpose() {
    let q = Queue::new(&Cpu::<f32>::new(), 5, 3, 1).unwrap();
    let rows = q.to_host().unwrap();
    let t = q.to_pytorch_layout().unwrap();
    for i in 0..5 {
        for j in 0..3 {
            assert_eq!(t[j * 5 + i], rows[i * 3 + j]);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_enqueue_matches_cpu_with_wraparound() {
    let gpu = moco::testing::test_gpu();
    for &(k, c, n) in &[
        (1usize, 1usize, 1usize),
        (33, 3, 7),
        (4096, 128, 256),
        (4096, 128, 257),
        (65536, 128, 256),
        (10, 4, 10),
    ] {
        let mut host = Queue::new(&Cpu::<f32>::new(), k, c, 9).unwrap();
        let mut dev = Queue::new(&Cuda::new(gpu.clone()).unwrap(), k, c, 9).unwrap();
        assert_eq!(
            dev.to_host().unwrap(),
            host.to_host().unwrap(),
            "same init on both devices"
        );
        for step in 0..5u64 {
            let keys = normal(n * c, step);
            host.enqueue(&keys).unwrap();
            dev.enqueue(&gpu.upload(&keys).unwrap()).unwrap();
            assert_eq!(dev.ptr(), host.ptr());
            assert_eq!(
                dev.to_host().unwrap(),
                host.to_host().unwrap(),
                "K={k} C={c} N={n} step {step}"
            );
        }
    }
    // Free function on a poisoned queue: rows not written stay poisoned.
    let mut qd = gpu.upload(&[POISON; 6 * 2]).unwrap();
    let p = enqueue(
        &gpu,
        &mut qd,
        &gpu.upload(&[1.0f32, 2.0, 3.0, 4.0]).unwrap(),
        6,
        2,
        5,
    )
    .unwrap();
    assert_eq!(p, 1);
    let got = gpu.download(&qd).unwrap();
    assert_eq!(&got[10..12], &[1.0, 2.0]);
    assert_eq!(&got[0..2], &[3.0, 4.0]);
    assert!(got[2..10].iter().all(|v| v.is_nan()));
    // N > K is an error.
    assert!(enqueue(&gpu, &mut qd, &gpu.upload(&[0.0f32; 14]).unwrap(), 6, 2, 0).is_err());
}

/// The bf16 queue: the f32 queue's rows rounded to bf16, wrap-around included; bad input
/// is refused and changes nothing.
#[test]
fn bf16_enqueue_reference_rounds_each_key() {
    use half::bf16;
    let (k, c) = (5usize, 3usize);
    let mut q32 = vec![0.0f32; k * c];
    let mut q16 = vec![bf16::ZERO; k * c];
    let mut ptr = 3;
    for step in 0..4u64 {
        let keys = normal(3 * c, 40 + step);
        let p32 = moco::ops::enqueue_cpu(&mut q32, &keys, k, c, ptr).unwrap();
        let p16 = moco::ops::enqueue_bf16_cpu(&mut q16, &keys, k, c, ptr).unwrap();
        assert_eq!(p16, p32);
        ptr = p32;
        let want: Vec<bf16> = q32.iter().map(|&v| bf16::from_f32(v)).collect();
        assert_eq!(q16, want, "step {step}");
    }
    let before = q16.clone();
    assert!(moco::ops::enqueue_bf16_cpu(&mut q16, &[0.0; 6], k, c, 5).is_err());
    assert!(moco::ops::enqueue_bf16_cpu(&mut q16, &[0.0; 7], k, c, 0).is_err());
    assert_eq!(q16, before, "nothing changed on error");
}

/// CUDA: the bf16 enqueue equals the CPU reference bit for bit (the same f32 keys, the same
/// rounding), with wrap-around.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_bf16_enqueue_matches_cpu() {
    use half::bf16;
    let gpu = moco::testing::test_gpu();
    for &(k, c, n) in &[(1usize, 1usize, 1usize), (33, 3, 7), (4096, 128, 257)] {
        let mut host = vec![bf16::ZERO; k * c];
        let mut dev = gpu.zeros::<bf16>(k * c).unwrap();
        let (mut ph, mut pd) = (k - 1, k - 1);
        for step in 0..4u64 {
            let keys = normal(n * c, 50 + step);
            ph = moco::ops::enqueue_bf16_cpu(&mut host, &keys, k, c, ph).unwrap();
            pd = moco::ops::enqueue_bf16(&gpu, &mut dev, &gpu.upload(&keys).unwrap(), k, c, pd)
                .unwrap();
            assert_eq!(pd, ph);
            let got: Vec<u16> = gpu
                .download(&dev)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let want: Vec<u16> = host.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "K={k} C={c} N={n} step {step}");
        }
    }
}
