//! The CPU reference (and, on a GPU, the CUDA paths) against PyTorch goldens.
//!
//! `tests/goldens/ops.json` was written by `tests/goldens/make_ops_goldens.py` (PyTorch 2.11,
//! float64 on the CPU); see that script for what each field is.
use moco::ops::{
    enqueue_cpu, infonce_cpu, l2_normalize_cpu, logits_cpu, momentum_update_cpu, ContrastShape,
};
use serde_json::Value;

fn goldens() -> Value {
    serde_json::from_str(include_str!("goldens/ops.json")).expect("valid goldens JSON")
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn close(what: &str, got: &[f32], want: &[f32], rel: f64) {
    let (r, a) = moco::testing::rel_err(got, want);
    assert!(
        r <= rel,
        "{what}: rel err {r:.3e} > {rel:.1e} (max abs {a:.3e})"
    );
}

struct Case {
    s: ContrastShape,
    q: Vec<f32>,
    k: Vec<f32>,
    queue: Vec<f32>,
    case: Value,
}

fn cases() -> Vec<Case> {
    goldens()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let g = |k: &str| c[k].as_u64().unwrap() as usize;
            Case {
                s: ContrastShape::new(g("n"), g("c"), g("k"), c["t"].as_f64().unwrap()).unwrap(),
                q: f32s(&c["q"]),
                k: f32s(&c["k_raw"]),
                queue: f32s(&c["queue_rows"]),
                case: c.clone(),
            }
        })
        .collect()
}

#[test]
fn cpu_matches_pytorch() {
    let cs = cases();
    assert!(cs.len() >= 4);
    for c in cs {
        let s = c.s;
        let what = format!("{s:?}");
        let (qn, _) = l2_normalize_cpu(&c.q, s.n, s.c).unwrap();
        close(
            &format!("normalize {what}"),
            &qn,
            &f32s(&c.case["q_normalized"]),
            1e-6,
        );
        let l = logits_cpu(&c.q, &c.k, &c.queue, s).unwrap();
        close(
            &format!("logits {what}"),
            &l,
            &f32s(&c.case["logits"]),
            1e-6,
        );
        let out = infonce_cpu(&c.q, &c.k, &c.queue, s).unwrap();
        let loss = c.case["loss"].as_f64().unwrap();
        assert!(
            (out.loss - loss).abs() <= 1e-6 * loss.abs().max(1.0),
            "loss {what}: {} vs {loss}",
            out.loss
        );
        assert_eq!(
            out.accuracy,
            c.case["accuracy"].as_f64().unwrap(),
            "accuracy {what}"
        );
        close(
            &format!("grad {what}"),
            &out.grad_q,
            &f32s(&c.case["grad_q"]),
            1e-5,
        );
    }
}

#[test]
fn momentum_matches_pytorch() {
    let g = goldens();
    let m = &g["momentum"];
    let mut key = f32s(&m["key"]);
    momentum_update_cpu(
        &mut key,
        &f32s(&m["query"]),
        m["m"].as_f64().unwrap() as f32,
    )
    .unwrap();
    // PyTorch computes k*m + q*(1-m) in f32; we round an f64 result: within an ulp or two.
    close("momentum", &key, &f32s(&m["out"]), 1e-6);
}

#[test]
fn enqueue_matches_pytorch_layout_with_wraparound() {
    let g = goldens();
    let e = &g["enqueue"];
    let (k, c) = (
        e["k"].as_u64().unwrap() as usize,
        e["c"].as_u64().unwrap() as usize,
    );
    let mut queue = vec![0.0f32; k * c];
    let mut ptr = 0;
    for step in e["steps"].as_array().unwrap() {
        ptr = enqueue_cpu(&mut queue, &f32s(&step["keys"]), k, c, ptr).unwrap();
        assert_eq!(ptr as u64, step["ptr"].as_u64().unwrap());
        let q = moco::ops::Queue::from_host(&moco::backend::Cpu::<f32>::new(), &queue, k, c, ptr)
            .unwrap();
        assert_eq!(q.to_pytorch_layout().unwrap(), f32s(&step["queue_ck"]));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_matches_pytorch() {
    use moco::ops::{Contrast, InfoNceImpl};
    let gpu = moco::testing::test_gpu();
    let mut contrast = Contrast::new(&gpu);
    for c in cases() {
        let s = c.s;
        let (qd, kd, ud) = (
            gpu.upload(&c.q).unwrap(),
            gpu.upload(&c.k).unwrap(),
            gpu.upload(&c.queue).unwrap(),
        );
        for imp in [InfoNceImpl::Fused, InfoNceImpl::Unfused] {
            let mut grad = gpu.upload(&vec![moco::testing::POISON; s.n * s.c]).unwrap();
            let st = contrast.infonce(&qd, &kd, &ud, s, &mut grad, imp).unwrap();
            let loss = c.case["loss"].as_f64().unwrap();
            assert!(
                (st.loss - loss).abs() <= 1e-5 * loss.abs().max(1.0),
                "{imp:?} {s:?}: {} vs {loss}",
                st.loss
            );
            // With C = 1 the exact gradient is 0 (normalizing a scalar gives its sign), so
            // compare against fp32's absolute floor 1e-5 / (N T ||q||) there.
            let got = gpu.download(&grad).unwrap();
            if s.c == 1 {
                for (i, g) in got.iter().enumerate() {
                    let floor = 1e-5 / (s.n as f32 * s.t32() * c.q[i].abs().max(1e-6));
                    assert!(g.abs() <= floor, "{imp:?} {s:?}: grad {g} for C = 1");
                }
            } else {
                close(
                    &format!("{imp:?} grad {s:?}"),
                    &got,
                    &f32s(&c.case["grad_q"]),
                    1e-4,
                );
            }
        }
        let mut logits = gpu.zeros::<f32>(s.n * (1 + s.k)).unwrap();
        contrast.logits(&qd, &kd, &ud, s, &mut logits).unwrap();
        close(
            &format!("logits {s:?}"),
            &gpu.download(&logits).unwrap(),
            &f32s(&c.case["logits"]),
            1e-5,
        );
    }
}
