//! moco's augmentations against torchvision's v2 transforms.
//!
//! `tests/goldens/augment.json` is written by `tests/goldens/make_augment_goldens.py`
//! (PyTorch + torchvision; CI has neither, so the file is committed):
//!
//! * pixel cases: torchvision's recipe (`RandomResizedCrop` with `antialias=True`,
//!   `RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), 0.8)`, `RandomGrayscale(0.2)`,
//!   `RandomHorizontalFlip()`, `Normalize`; or `CenterCrop` + `Resize` for eval) on float
//!   tensors, with the parameters it drew; moco applies the same parameters
//!   ([`Augment::apply_params`]) and must give the same pixels to [`PIXEL_TOL`];
//! * statistics: histograms of what torchvision draws (crop area, log aspect ratio, crop
//!   centre, rates, jitter factors, jitter order) against moco's own draws
//!   ([`Augment::sample`], seeded), each bin within [`SIGMAS`] standard errors.
use moco::data::augment::{self, Augment, Crop, JitterParams, Op, OpParams, ViewParams};
use moco::testing::rng;
use serde_json::Value;

/// Largest absolute difference allowed between a normalized moco pixel and torchvision's.
/// Both compute in f32; the differences are a few f32 ulps of values of magnitude up to
/// about 3: 1e-6 typically, 3.9e-6 at most (after a hue shift's HSV round trip). One grey level after normalization is 1 / 255 / std > 1e-2, and
/// the smallest real difference the test must see (the 0.299 vs 0.2989 luma weight)
/// moves pixels by about 1e-4.
const PIXEL_TOL: f32 = 5e-6;

/// Two-sample tolerance of every histogram bin and rate, in standard errors of the
/// difference of two binomial proportions. The draws are seeded, so the test is
/// deterministic; 5 sigma makes a false alarm on any of the ~300 comparisons a
/// 1-in-10^4 event for a correct implementation.
const SIGMAS: f64 = 5.0;

fn goldens() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/goldens/augment.json");
    let text = std::fs::read_to_string(path).expect("tests/goldens/augment.json");
    serde_json::from_str(&text).expect("valid JSON")
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// torchvision's recipe as an [`Augment`]: crop, jitter, grayscale, flip.
fn recipe(size: usize, scale: (f32, f32), mean: &[f32], std: &[f32]) -> Augment {
    Augment {
        size,
        crop: Crop::RandomResized {
            scale,
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        },
        ops: vec![
            Op::ColorJitter {
                brightness: 0.4,
                contrast: 0.4,
                saturation: 0.4,
                hue: 0.1,
                p: 0.8,
            },
            Op::Grayscale { p: 0.2 },
            Op::HorizontalFlip { p: 0.5 },
        ],
        mean: mean.to_vec(),
        std: std.to_vec(),
    }
}

fn opt(v: &Value) -> Option<f32> {
    v.as_f64().map(|x| x as f32)
}

#[test]
fn pixels_match_torchvision_v2() {
    let g = goldens();
    let mut worst = 0.0f32;
    let mut n_views = 0;
    for case in g["pixel_cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (c, h, w, size) = (
            case["c"].as_u64().unwrap() as usize,
            case["h"].as_u64().unwrap() as usize,
            case["w"].as_u64().unwrap() as usize,
            case["size"].as_u64().unwrap() as usize,
        );
        let (mean, std) = (f32s(&case["mean"]), f32s(&case["std"]));
        let img: Vec<u8> = usizes(&case["image"]).iter().map(|&v| v as u8).collect();
        let eval = case["kind"] == "eval";
        let aug = if eval {
            Augment::eval(size, &mean, &std).unwrap()
        } else {
            let s = f32s(&case["scale"]);
            recipe(size, (s[0], s[1]), &mean, &std)
        };
        for (vi, view) in case["views"].as_array().unwrap().iter().enumerate() {
            let r = usizes(&view["region"]);
            let region = (r[0], r[1], r[2], r[3]);
            let params = if eval {
                // The eval crop is deterministic: moco must find torchvision's region.
                let drawn = aug.sample(c, h, w, &mut rng(0)).unwrap();
                assert_eq!(drawn.region, region, "{name}: center crop region");
                drawn
            } else {
                let j = &view["jitter"];
                let jitter = (!j.is_null()).then(|| JitterParams {
                    order: usizes(&j["order"]).try_into().unwrap(),
                    brightness: opt(&j["b"]),
                    contrast: opt(&j["c"]),
                    saturation: opt(&j["s"]),
                    hue: opt(&j["h"]),
                });
                ViewParams {
                    region,
                    ops: vec![
                        OpParams::ColorJitter(jitter),
                        OpParams::Grayscale(view["gray"].as_bool().unwrap()),
                        OpParams::HorizontalFlip(view["flip"].as_bool().unwrap()),
                    ],
                    resize: None,
                }
            };
            let want = f32s(&view["out"]);
            let mut got = vec![f32::NAN; c * size * size];
            aug.apply_params(&img, c, h, w, &params, &mut got).unwrap();
            assert_eq!(got.len(), want.len(), "{name} view {vi}");
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                let d = (a - b).abs();
                assert!(
                    d <= PIXEL_TOL,
                    "{name} view {vi} ({params:?}): value {i} is {a}, torchvision {b}"
                );
                worst = worst.max(d);
            }
            n_views += 1;
        }
    }
    assert!(n_views >= 20);
    eprintln!("{n_views} views, largest difference {worst:e}");
}

/// Whether counts `a` and `b` out of `na` and `nb` draws are the same proportion to
/// [`SIGMAS`] standard errors.
fn same_rate(what: &str, a: usize, na: usize, b: usize, nb: usize) {
    let (pa, pb) = (a as f64 / na as f64, b as f64 / nb as f64);
    let p = (a + b) as f64 / (na + nb) as f64;
    let se = (p * (1.0 - p) * (1.0 / na as f64 + 1.0 / nb as f64)).sqrt();
    // A bin both sides leave empty (or full) agrees exactly.
    assert!(
        (pa - pb).abs() <= SIGMAS * se,
        "{what}: torchvision {pa:.4} ({a}/{na}), moco {pb:.4} ({b}/{nb}), {:.1} sigma",
        (pa - pb).abs() / se
    );
}

fn hist(values: &[f64], lo: f64, hi: f64, bins: usize) -> Vec<usize> {
    let mut h = vec![0; bins];
    for &v in values {
        let k = ((v - lo) / (hi - lo) * bins as f64).floor() as isize;
        h[k.clamp(0, bins as isize - 1) as usize] += 1;
    }
    h
}

fn same_hist(what: &str, torch: &[usize], moco: &[usize]) {
    let (nt, nm) = (torch.iter().sum::<usize>(), moco.iter().sum::<usize>());
    assert_eq!(torch.len(), moco.len());
    for (k, (&a, &b)) in torch.iter().zip(moco).enumerate() {
        same_rate(&format!("{what} bin {k}"), a, nt, b, nm);
    }
}

#[test]
fn parameter_distributions_match_torchvision_v2() {
    let g = goldens();
    for (si, st) in g["stats"].as_array().unwrap().iter().enumerate() {
        let name = st["name"].as_str().unwrap();
        let (h, w, n) = (
            st["h"].as_u64().unwrap() as usize,
            st["w"].as_u64().unwrap() as usize,
            st["n"].as_u64().unwrap() as usize,
        );
        let scale = f32s(&st["scale"]);
        // What `moco train --augment cifar --crop-scale MIN` runs (its flip comes first;
        // the draws per step are the same).
        let aug = Augment::cifar(8, &[0.5], &[0.5])
            .unwrap()
            .with_crop_scale(scale[0] as f64)
            .unwrap();
        let mut r = rng(1000 + si as u64);
        let (mut area, mut logr, mut cy, mut cx) = (vec![], vec![], vec![], vec![]);
        let (mut jit, mut gray, mut flip) = (0, 0, 0);
        let mut factors: [Vec<f64>; 4] = Default::default();
        let mut pos = [[0usize; 4]; 4];
        for _ in 0..n {
            let p = aug.sample(1, h, w, &mut r).unwrap();
            let (top, left, ch, cw) = p.region;
            assert!(top + ch <= h && left + cw <= w && ch > 0 && cw > 0);
            area.push((ch * cw) as f64 / (h * w) as f64);
            logr.push((cw as f64 / ch as f64).ln());
            cy.push((top as f64 + ch as f64 / 2.0) / h as f64);
            cx.push((left as f64 + cw as f64 / 2.0) / w as f64);
            for op in &p.ops {
                match op {
                    OpParams::ColorJitter(Some(j)) => {
                        jit += 1;
                        for (position, &k) in j.order.iter().enumerate() {
                            pos[k][position] += 1;
                        }
                        for (f, v) in
                            factors
                                .iter_mut()
                                .zip([j.brightness, j.contrast, j.saturation, j.hue])
                        {
                            f.push(v.expect("all four jitter ranges are > 0") as f64);
                        }
                    }
                    OpParams::Grayscale(true) => gray += 1,
                    OpParams::HorizontalFlip(true) => flip += 1,
                    _ => {}
                }
            }
        }
        let lr = (4.0f64 / 3.0).ln();
        same_hist(
            &format!("{name} crop area"),
            &usizes(&st["area_hist"]),
            &hist(&area, 0.0, 1.0, 10),
        );
        same_hist(
            &format!("{name} log aspect ratio"),
            &usizes(&st["logratio_hist"]),
            &hist(&logr, -lr - 0.15, lr + 0.15, 10),
        );
        same_hist(
            &format!("{name} crop centre y"),
            &usizes(&st["cy_hist"]),
            &hist(&cy, 0.0, 1.0, 10),
        );
        same_hist(
            &format!("{name} crop centre x"),
            &usizes(&st["cx_hist"]),
            &hist(&cx, 0.0, 1.0, 10),
        );
        let count = |k: &str| st[k].as_u64().unwrap() as usize;
        same_rate(&format!("{name} jitter rate"), count("jitter"), n, jit, n);
        same_rate(&format!("{name} grayscale rate"), count("gray"), n, gray, n);
        same_rate(&format!("{name} flip rate"), count("flip"), n, flip, n);
        for (k, key) in ["b", "c", "s", "h"].iter().enumerate() {
            let (lo, hi) = if *key == "h" { (-0.1, 0.1) } else { (0.6, 1.4) };
            same_hist(
                &format!("{name} jitter factor {key}"),
                &usizes(&st["factor_hist"][key]),
                &hist(&factors[k], lo, hi, 10),
            );
        }
        let tpos = st["order_pos"].as_array().unwrap();
        for op in 0..4 {
            let t = usizes(&tpos[op]);
            for position in 0..4 {
                same_rate(
                    &format!("{name} jitter op {op} at position {position}"),
                    t[position],
                    count("jitter"),
                    pos[op][position],
                    jit,
                );
            }
        }
    }
}

#[test]
fn crop_sides_and_center_offsets_round_half_to_even_as_python() {
    // Every attempt fails (the crop is wider than the image), so the fallback runs:
    // h = round(5 / 0.4) = round(12.5) = 12 in Python (not 13), top = (100 - 12) // 2.
    let mut r = rng(3);
    assert_eq!(
        augment::random_resized_crop_params(100, 5, (0.9, 1.0), (0.4, 0.4), &mut r),
        (44, 0, 12, 5)
    );
    assert_eq!(
        augment::random_resized_crop_params(5, 100, (0.9, 1.0), (2.5, 2.5), &mut r),
        (0, 44, 5, 12)
    );
    // CenterCrop offsets: int(round(7 / 2.0)) = 4 (floor would give 3),
    // int(round(5 / 2.0)) = 2, int(round(3 / 2.0)) = 2.
    assert_eq!(augment::center_crop_params(31, 38, 1.0), (0, 4, 31, 31));
    assert_eq!(augment::center_crop_params(36, 31, 1.0), (2, 0, 31, 31));
    assert_eq!(augment::center_crop_params(31, 34, 1.0), (0, 2, 31, 31));
}

#[test]
fn downscaling_is_antialiased() {
    // A 1-pixel checkerboard shrunk by 4 is flat grey with an antialiasing filter; plain
    // bilinear (two taps per axis) would keep stripes of 0 and 1.
    let (h, w) = (32, 32);
    let src: Vec<u8> = (0..h * w)
        .map(|i| if (i / w + i % w) % 2 == 0 { 255 } else { 0 })
        .collect();
    let mut out = vec![0.0f32; 64];
    augment::resized_crop(&src, 1, h, w, (0, 0, h, w), 8, 8, &mut out);
    for v in &out[9..15] {
        assert!((v - 0.5).abs() < 0.02, "{v}");
    }
    // The taps of a 4x downscale: 8 source samples (support 4 on each side of the centre).
    let taps = augment::resize_taps(32, 8);
    assert_eq!(taps[3].0, 10);
    assert_eq!(taps[3].1.len(), 8);
    assert!((taps[3].1.iter().sum::<f32>() - 1.0).abs() < 1e-6);
}

#[test]
fn crop_scale_override_is_checked() {
    let a = Augment::cifar(8, &[0.5], &[0.5]).unwrap();
    let b = a.clone().with_crop_scale(0.2).unwrap();
    assert_eq!(
        b.crop,
        Crop::RandomResized {
            scale: (0.2, 1.0),
            ratio: (0.75, 4.0 / 3.0)
        }
    );
    for bad in [0.0, -0.1, 1.5, f64::NAN, f64::INFINITY] {
        let e = a.clone().with_crop_scale(bad).unwrap_err().to_string();
        assert!(e.contains("crop scale"), "{e}");
    }
    // Parameters that do not fit the transform or the image are errors, not panics.
    let img = vec![0u8; 64];
    let mut out = vec![0.0; 64];
    let mut p = a.sample(1, 8, 8, &mut rng(0)).unwrap();
    p.region = (4, 0, 8, 8);
    assert!(a.apply_params(&img, 1, 8, 8, &p, &mut out).is_err());
    let mut p = a.sample(1, 8, 8, &mut rng(0)).unwrap();
    p.ops.pop();
    assert!(a.apply_params(&img, 1, 8, 8, &p, &mut out).is_err());
    let mut p = a.sample(1, 8, 8, &mut rng(0)).unwrap();
    p.ops.swap(0, 1);
    assert!(a.apply_params(&img, 1, 8, 8, &p, &mut out).is_err());
}

#[test]
fn config_crop_scale_is_validated() {
    use moco::train::TrainConfig;
    let ok = TrainConfig {
        crop_scale: Some(0.2),
        ..TrainConfig::default()
    };
    ok.validate().unwrap();
    for bad in [0.0, -0.5, 1.01, f64::NAN, f64::INFINITY] {
        let c = TrainConfig {
            crop_scale: Some(bad),
            ..TrainConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--crop-scale"), "{e}");
    }
    // Absent from an older config.json: the preset's scale.
    assert_eq!(TrainConfig::default().crop_scale, None);
}
