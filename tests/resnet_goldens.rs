//! Whole encoders against PyTorch (float64): forward, backward (input and every parameter
//! gradient), BatchNorm running statistics, two SGD steps, inference-mode forward.
//!
//! The goldens are written by `tests/goldens/make_resnet_goldens.py` (needs PyTorch and
//! torchvision). While `tests/goldens/resnet_goldens.txt` has not been generated and
//! committed, this test prints that it is skipped and passes; once it exists, it is checked.
use std::collections::HashMap;

use moco::backend::Cpu;
use moco::model::{Encoder, EncoderConfig, InputShape, Storage};
use moco::optim::Sgd;

const GOLDENS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/goldens/resnet_goldens.txt"
);

/// Same hash as `u(t, i)` in the script: a value in [-0.5, 0.5).
fn hash_u(t: u64, i: u64) -> f64 {
    let seed = ((t * 40503 + 12345) & 0xFFFF_FFFF) as u32;
    let mut h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
    h ^= h >> 15;
    h = h.wrapping_mul(2_246_822_519);
    h ^= h >> 13;
    h = h.wrapping_mul(3_266_489_917);
    h ^= h >> 16;
    h as f64 / 4_294_967_296.0 - 0.5
}

fn u(t: u64, n: usize) -> Vec<f64> {
    (0..n as u64).map(|i| hash_u(t, i)).collect()
}

fn init_values(k: usize, name: &str, shape: &[usize]) -> Vec<f64> {
    let n = shape.iter().product::<usize>().max(1);
    let v = u(k as u64, n);
    if name.ends_with("num_batches_tracked") {
        vec![0.0]
    } else if name.ends_with("running_mean") {
        v.iter().map(|x| 0.1 * x).collect()
    } else if name.ends_with("running_var") {
        v.iter().map(|x| 1.0 + 0.5 * (x + 0.5)).collect()
    } else if shape.len() == 1 && !name.starts_with("fc") {
        if name.ends_with("weight") {
            v.iter().map(|x| 1.0 + 0.2 * x).collect()
        } else {
            v.iter().map(|x| 0.1 * x).collect()
        }
    } else if shape.len() == 1 {
        v.iter().map(|x| 0.1 * x).collect()
    } else {
        let fan_in: usize = shape[1..].iter().product();
        let s = 2.0 * (3.0 / fan_in as f64).sqrt();
        v.iter().map(|x| x * s).collect()
    }
}

fn summary(v: &[f64], k: u64) -> [f64; 2] {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let proj = v.iter().zip(u(3000 + k, v.len())).map(|(a, b)| a * b).sum();
    [norm, proj]
}

#[track_caller]
fn close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let den: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt().max(1e-12);
    assert!(
        num / den <= tol && got.iter().all(|v| v.is_finite()),
        "{what}: relative error {:.3e} (tol {tol:.0e})\n got  {:?}\n want {:?}",
        num / den,
        &got[..got.len().min(6)],
        &want[..want.len().min(6)]
    );
}

struct Case {
    header: Vec<String>,
    lines: Vec<Vec<String>>,
}

fn parse(text: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut cur: Option<Case> = None;
    for line in text.lines() {
        let toks: Vec<String> = line.split_whitespace().map(String::from).collect();
        match toks.first().map(String::as_str) {
            Some("case") => {
                cur = Some(Case {
                    header: toks,
                    lines: Vec::new(),
                })
            }
            Some("end") => cases.extend(cur.take()),
            Some(t) if !t.starts_with('#') => {
                if let Some(c) = cur.as_mut() {
                    c.lines.push(toks)
                }
            }
            _ => {}
        }
    }
    cases
}

fn nums(t: &[String]) -> Vec<f64> {
    t.iter().map(|s| s.parse().expect("number")).collect()
}

fn run_case(c: &Case) {
    let h = &c.header;
    let name = &h[1];
    let cfg = EncoderConfig {
        arch: h[2].parse().unwrap(),
        in_channels: h[3].parse().unwrap(),
        dim: h[6].parse().unwrap(),
        mlp: h[7] == "1",
    };
    let (size, n, splits): (usize, usize, usize) = (
        h[4].parse().unwrap(),
        h[5].parse().unwrap(),
        h[8].parse().unwrap(),
    );
    let mut enc = Encoder::new(Cpu::<f64>::new(), cfg, 0).unwrap();
    // The table must list PyTorch's state_dict, in order.
    let entries: Vec<_> = c.lines.iter().filter(|l| l[0] == "entry").collect();
    let table = enc.table().clone();
    assert_eq!(
        entries.len(),
        table.entries().len(),
        "{name}: number of entries"
    );
    for (k, (l, e)) in entries.iter().zip(table.entries()).enumerate() {
        let shape = if l[2] == "-" {
            vec![]
        } else {
            l[2].split('x')
                .map(|s| s.parse().unwrap())
                .collect::<Vec<usize>>()
        };
        assert_eq!((&l[1], &shape), (&e.name, &e.shape), "{name}: entry {k}");
        let v = init_values(k, &e.name, &e.shape);
        match e.storage {
            Storage::Param => enc.params_mut()[e.offset..e.offset + e.len].copy_from_slice(&v),
            Storage::RunningMean | Storage::RunningVar => {
                enc.running_stats_mut()[e.offset..e.offset + e.len].copy_from_slice(&v)
            }
            Storage::NumBatchesTracked => {}
        }
    }
    let shape = InputShape::new(n, cfg.in_channels, size, size);
    let x: Vec<f64> = u(1000, shape.len()).iter().map(|v| 2.0 * v).collect();
    let r: Vec<f64> = u(1001, n * cfg.dim).iter().map(|v| 2.0 * v).collect();
    let mut opt = Sgd::new(Cpu::<f64>::new(), table.num_params(), 0.9, 5e-4).unwrap();
    let find = |kind: &str, step: &str, key: Option<&str>| -> Vec<f64> {
        let l = c
            .lines
            .iter()
            .find(|l| l[0] == kind && l[1] == step && key.is_none_or(|k| l[2] == k))
            .unwrap_or_else(|| panic!("{name}: golden {kind} {step} {key:?} missing"));
        nums(&l[if key.is_some() { 3 } else { 2 }..])
    };
    // f64 on both sides.
    let tol0 = 1e-9;
    // The optimizer takes lr, momentum and weight decay as f64 on the f64 backend, so the
    // steps after SGD hold to f64 rounding too. (With f32 hyper-parameters, 0.1f32 =
    // 0.10000000149 had changed the update by 1.5e-8 relative, and the test needed 1e-6.)
    let tol_after_sgd = tol0;
    let index: HashMap<&str, usize> = table
        .entries()
        .iter()
        .enumerate()
        .map(|(k, e)| (e.name.as_str(), k))
        .collect();
    let mut tol = tol0;
    for step in 0..2 {
        let s = step.to_string();
        if step > 0 {
            tol = tol_after_sgd;
        }
        enc.zero_grad().unwrap();
        let y = enc.forward(&x, shape, true, splits).unwrap();
        close(
            &format!("{name} output {step}"),
            &y,
            &find("output", &s, None),
            tol,
        );
        let loss: f64 = y.iter().zip(&r).map(|(a, b)| a * b).sum();
        close(
            &format!("{name} loss {step}"),
            &[loss],
            &find("loss", &s, None),
            tol,
        );
        let dx = enc.backward(&r).unwrap();
        close(
            &format!("{name} input grad {step}"),
            &summary(&dx, 999),
            &find("input_grad", &s, None),
            tol,
        );
        for (k, e) in table.params().enumerate() {
            let g = &enc.grads()[e.offset..e.offset + e.len];
            let want = find("grad", &s, Some(&e.name));
            close(
                &format!("{name} grad {step} {}", e.name),
                &summary(g, k as u64),
                &want,
                tol,
            );
        }
        for e in table
            .entries()
            .iter()
            .filter(|e| matches!(e.storage, Storage::RunningMean | Storage::RunningVar))
        {
            let v = &enc.running_stats()[e.offset..e.offset + e.len];
            let want = find("buffer", &s, Some(&e.name));
            close(
                &format!("{name} {} after step {step}", e.name),
                &summary(v, index[e.name.as_str()] as u64),
                &want,
                tol,
            );
        }
        let (p, g) = enc.params_and_grads();
        opt.step(p, g, 0.1).unwrap();
        for (k, e) in table.params().enumerate() {
            let v = &enc.params()[e.offset..e.offset + e.len];
            let want = find("param", &s, Some(&e.name));
            close(
                &format!("{name} {} after SGD step {step}", e.name),
                &summary(v, k as u64),
                &want,
                tol_after_sgd,
            );
        }
    }
    let want: Vec<f64> = c
        .lines
        .iter()
        .find(|l| l[0] == "eval_output")
        .map(|l| nums(&l[1..]))
        .expect("eval_output");
    let y = enc.forward(&x, shape, false, 1).unwrap();
    close(&format!("{name} eval output"), &y, &want, tol);
}

#[test]
fn encoders_match_pytorch_goldens() {
    let Ok(text) = std::fs::read_to_string(GOLDENS) else {
        eprintln!(
            "resnet goldens: skipped ({GOLDENS} not generated yet; run tests/goldens/make_resnet_goldens.py where PyTorch is installed)"
        );
        return;
    };
    let cases = parse(&text);
    assert!(cases.len() >= 4, "goldens file has {} cases", cases.len());
    for c in &cases {
        run_case(c);
    }
}

#[test]
fn hash_matches_the_script() {
    // Values of u(0, i) computed by hand from the script's formula, i = 0 and 1.
    let h0 = {
        let mut h: u32 = 12345;
        h ^= h >> 15;
        h = h.wrapping_mul(2_246_822_519);
        h ^= h >> 13;
        h = h.wrapping_mul(3_266_489_917);
        h ^= h >> 16;
        h as f64 / 4_294_967_296.0 - 0.5
    };
    assert_eq!(hash_u(0, 0), h0);
    // Printed by the script's formula in plain Python integers.
    assert_eq!(hash_u(0, 0), -0.06187369185499847);
    assert_eq!(hash_u(5, 123), -0.1289290718268603);
    assert_eq!(hash_u(3001, 1_000_000), 0.47469366691075265);
    assert!((-0.5..0.5).contains(&hash_u(7, 123_456)));
    assert_ne!(hash_u(0, 1), hash_u(1, 0));
}

/// Writes a goldens file in the script's format from this crate's own f64 encoder, then
/// reads it back through the checker: proves the reader (parsing, keys, indices) against the
/// format, independently of PyTorch.
#[test]
fn checker_reads_the_script_format() {
    let cfg = EncoderConfig {
        arch: moco::model::Arch::Resnet8,
        in_channels: 1,
        dim: 4,
        mlp: true,
    };
    let (size, n, splits) = (8usize, 4usize, 2usize);
    let mut enc = Encoder::new(Cpu::<f64>::new(), cfg, 0).unwrap();
    let table = enc.table().clone();
    let mut out = String::from("case self resnet8 1 8 4 4 1 2\n");
    for (k, e) in table.entries().iter().enumerate() {
        let shape = if e.shape.is_empty() {
            "-".to_string()
        } else {
            e.shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("x")
        };
        out += &format!("entry {} {shape}\n", e.name);
        let v = init_values(k, &e.name, &e.shape);
        match e.storage {
            Storage::Param => enc.params_mut()[e.offset..e.offset + e.len].copy_from_slice(&v),
            Storage::RunningMean | Storage::RunningVar => {
                enc.running_stats_mut()[e.offset..e.offset + e.len].copy_from_slice(&v)
            }
            Storage::NumBatchesTracked => {}
        }
    }
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:?}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let shape = InputShape::new(n, 1, size, size);
    let x: Vec<f64> = u(1000, shape.len()).iter().map(|v| 2.0 * v).collect();
    let r: Vec<f64> = u(1001, n * 4).iter().map(|v| 2.0 * v).collect();
    let mut opt = Sgd::new(Cpu::<f64>::new(), table.num_params(), 0.9, 5e-4).unwrap();
    for step in 0..2 {
        enc.zero_grad().unwrap();
        let y = enc.forward(&x, shape, true, splits).unwrap();
        let loss: f64 = y.iter().zip(&r).map(|(a, b)| a * b).sum();
        let dx = enc.backward(&r).unwrap();
        out += &format!("output {step} {}\nloss {step} {loss:?}\n", fmt(&y));
        out += &format!("input_grad {step} {}\n", fmt(&summary(&dx, 999)));
        for (k, e) in table.params().enumerate() {
            let g = summary(&enc.grads()[e.offset..e.offset + e.len], k as u64);
            out += &format!("grad {step} {} {}\n", e.name, fmt(&g));
        }
        for (k, e) in table.entries().iter().enumerate() {
            if matches!(e.storage, Storage::RunningMean | Storage::RunningVar) {
                let b = summary(&enc.running_stats()[e.offset..e.offset + e.len], k as u64);
                out += &format!("buffer {step} {} {}\n", e.name, fmt(&b));
            }
        }
        let (p, g) = enc.params_and_grads();
        opt.step(p, g, 0.1).unwrap();
        for (k, e) in table.params().enumerate() {
            let v = summary(&enc.params()[e.offset..e.offset + e.len], k as u64);
            out += &format!("param {step} {} {}\n", e.name, fmt(&v));
        }
    }
    let y = enc.forward(&x, shape, false, 1).unwrap();
    out += &format!("eval_output {}\nend\n", fmt(&y));
    let cases = parse(&out);
    assert_eq!(cases.len(), 1);
    run_case(&cases[0]);
    // And a corrupted golden fails.
    let bad = out.replacen("loss 1 ", "loss 1 1", 1);
    let r = std::panic::catch_unwind(|| run_case(&parse(&bad)[0]));
    assert!(r.is_err(), "a wrong golden must fail the check");
}
