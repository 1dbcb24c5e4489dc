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
use moco::data::source::Image;
use moco::testing::rng;
use serde_json::Value;

/// Largest absolute difference allowed between a normalized moco pixel and torchvision's.
/// Both compute in f32; the differences are a few f32 ulps of values of magnitude up to
/// about 3: 1e-6 typically, 3.9e-6 at most (after a hue shift's HSV round trip). One grey level after normalization is 1 / 255 / std > 1e-2, and
/// the smallest real difference the test must see (the 0.299 vs 0.2989 luma weight)
/// moves pixels by about 1e-4.
const PIXEL_TOL: f32 = 5e-6;

/// [`PIXEL_TOL`] for the photo cases. Their resizes are larger (up to 8x down, output
/// centres up to 500 source pixels from the origin), and there torchvision's float32
/// resize is itself off: compared with the same resize in float64 it is up to 7.4e-6 away
/// after normalization (the eval of the 300x500 photo: 0.3771545 where float64 gives
/// 0.37714824 and moco 0.3771485), so moco (weights in f64, rounded to f32) is held to
/// twice that. Still far below what the test must see: one grey level is > 1e-2 and the
/// luma weights' 0.299 vs 0.2989 about 1e-4.
const PHOTO_PIXEL_TOL: f32 = 1.5e-5;

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

/// The photo stand-in of `photo` in `make_augment_goldens.py`: `h x w x 3` `u8` in HWC
/// order (as a JPEG decoder gives it), integer arithmetic only: a smooth gradient that
/// wraps once or twice, a sawtooth texture and hashed noise.
fn photo(h: usize, w: usize, seed: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(h * w * 3);
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let g = (256 * y / h + (c + 1) * 96 * x / w) % 256;
                let t = (31 * y + 17 * x + 7 * c + seed) % 256;
                let hh = (y as u32).wrapping_mul(73_856_093)
                    ^ (x as u32).wrapping_mul(19_349_663)
                    ^ (c as u32).wrapping_mul(83_492_791)
                    ^ (seed as u32).wrapping_mul(2_654_435_761);
                let n = (hh >> 11) as usize % 32;
                out.push(((2 * g + t + n) * 255 / (3 * 255 + 31)) as u8);
            }
        }
    }
    out
}

/// Little-endian `f32`s from base64 (how the photo cases store torchvision's outputs).
fn f32s_b64(v: &Value) -> Vec<f32> {
    let s = v.as_str().unwrap().as_bytes();
    let val = |b: u8| -> u32 {
        match b {
            b'A'..=b'Z' => (b - b'A') as u32,
            b'a'..=b'z' => (b - b'a') as u32 + 26,
            b'0'..=b'9' => (b - b'0') as u32 + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {b}"),
        }
    };
    let mut bytes = Vec::with_capacity(s.len() / 4 * 3);
    for chunk in s.chunks(4) {
        let pad = chunk.iter().filter(|&&b| b == b'=').count();
        let n = chunk
            .iter()
            .map(|&b| if b == b'=' { 0 } else { val(b) })
            .fold(0u32, |a, v| a << 6 | v);
        bytes.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    assert_eq!(bytes.len() % 4, 0);
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn jitter_params(j: &Value) -> Option<JitterParams> {
    (!j.is_null()).then(|| JitterParams {
        order: usizes(&j["order"]).try_into().unwrap(),
        brightness: opt(&j["b"]),
        contrast: opt(&j["c"]),
        saturation: opt(&j["s"]),
        hue: opt(&j["h"]),
    })
}

/// Runs `params` on the photo in both layouts (HWC as decoded, and CHW) and compares with
/// torchvision's output; returns the largest difference.
fn check_photo_view(
    what: &str,
    aug: &Augment,
    hwc: &Image<'_>,
    params: &ViewParams,
    want: &[f32],
) -> f32 {
    let s = aug.size;
    let mut got = vec![f32::NAN; 3 * s * s];
    aug.apply_params_image(hwc, params, &mut got).unwrap();
    assert_eq!(got.len(), want.len(), "{what}");
    let mut worst = 0.0f32;
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let d = (a - b).abs();
        assert!(
            d <= PHOTO_PIXEL_TOL,
            "{what} ({params:?}): value {i} is {a}, torchvision {b}"
        );
        worst = worst.max(d);
    }
    // The planar copy of the same photo gives the same view, bit for bit.
    let chw = Image::chw(3, hwc.height, hwc.width, hwc.to_chw().into_owned()).unwrap();
    let mut planar = vec![f32::NAN; 3 * s * s];
    aug.apply_params_image(&chw, params, &mut planar).unwrap();
    assert!(
        got.iter()
            .zip(&planar)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{what}: HWC and CHW layouts differ"
    );
    worst
}

#[test]
fn photo_pixels_match_torchvision_v2() {
    let g = goldens();
    let (mut worst, mut worst_eval, mut n_views, mut n_blur) = (0.0f32, 0.0f32, 0, 0);
    for case in g["photo_cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let num = |k: &str| case[k].as_u64().unwrap() as usize;
        let (h, w, size, seed) = (num("h"), num("w"), num("size"), num("seed"));
        let (mean, std) = (f32s(&case["mean"]), f32s(&case["std"]));
        let pixels = photo(h, w, seed);
        let sum: u64 = pixels
            .iter()
            .enumerate()
            .map(|(i, &v)| v as u64 * (i as u64 % 251 + 1))
            .sum();
        assert_eq!(
            sum,
            case["image_sum"].as_u64().unwrap(),
            "{name}: photo bytes"
        );
        let img = Image::hwc(3, h, w, pixels).unwrap();
        // Training: the v2 preset itself, with torchvision's draws.
        let aug = Augment::v2(size, &mean, &std).unwrap();
        for (vi, view) in case["views"].as_array().unwrap().iter().enumerate() {
            let r = usizes(&view["region"]);
            let blur = opt(&view["blur"]);
            n_blur += blur.is_some() as usize;
            let params = ViewParams {
                region: (r[0], r[1], r[2], r[3]),
                ops: vec![
                    OpParams::ColorJitter(jitter_params(&view["jitter"])),
                    OpParams::Grayscale(view["gray"].as_bool().unwrap()),
                    OpParams::GaussianBlur(blur),
                    OpParams::HorizontalFlip(view["flip"].as_bool().unwrap()),
                ],
                resize: None,
            };
            let want = f32s_b64(&view["out_f32"]);
            let d = check_photo_view(&format!("{name} view {vi}"), &aug, &img, &params, &want);
            worst = worst.max(d);
            n_views += 1;
        }
        // Evaluation: Resize(int(size * 256 / 224)) + CenterCrop(size), found by moco.
        let ev = &case["eval"];
        let aug = Augment::eval_photo(size, &mean, &std).unwrap();
        let resize = ev["resize"].as_u64().unwrap() as usize;
        assert_eq!(
            aug.crop,
            Crop::ResizeCenter { resize },
            "{name}: eval resize"
        );
        let params = aug.sample(3, h, w, &mut rng(0)).unwrap();
        let rs = usizes(&ev["resized"]);
        assert_eq!(params.region, (0, 0, h, w), "{name}");
        assert_eq!(params.resize, Some((rs[0], rs[1])), "{name}: resized size");
        let want = f32s_b64(&ev["out_f32"]);
        let d = check_photo_view(&format!("{name} eval"), &aug, &img, &params, &want);
        worst_eval = worst_eval.max(d);
        n_views += 1;
    }
    assert!(
        n_views >= 15 && n_blur >= 3,
        "{n_views} views, {n_blur} blurred"
    );
    eprintln!(
        "{n_views} photo views ({n_blur} blurred), largest difference {worst:e} (train), {worst_eval:e} (eval)"
    );
}

#[test]
fn photo_crop_distributions_match_torchvision() {
    let g = goldens();
    // The v2 preset's crop, as the photo pipeline runs it (v1's is the same).
    let aug = Augment::v2(224, &[0.5; 3], &[0.25; 3]).unwrap();
    let Crop::RandomResized { scale, ratio } = aug.crop else {
        panic!("v2 crops with RandomResizedCrop")
    };
    assert_eq!(scale, (0.2, 1.0));
    for (si, st) in g["photo_stats"].as_array().unwrap().iter().enumerate() {
        let name = st["name"].as_str().unwrap();
        let num = |k: &str| st[k].as_u64().unwrap() as usize;
        let (h, w, n) = (num("h"), num("w"), num("n"));
        // The fallback itself: an area of twice the image never fits, so all 10 tries fail.
        let fr = usizes(&st["fallback_region"]);
        let fallback = (fr[0], fr[1], fr[2], fr[3]);
        assert_eq!(
            augment::random_resized_crop_params(h, w, (2.0, 2.0), ratio, &mut rng(0)),
            fallback,
            "{name}: fallback region"
        );
        let mut r = rng(2000 + si as u64);
        let mut v: [Vec<f64>; 6] = Default::default();
        let mut fell_back = 0;
        for _ in 0..n {
            let region = aug.sample(3, h, w, &mut r).unwrap().region;
            let (top, left, ch, cw) = region;
            assert!(top + ch <= h && left + cw <= w && ch > 0 && cw > 0);
            fell_back += (region == fallback) as usize;
            let (ch, cw) = (ch as f64, cw as f64);
            v[0].push(ch * cw / (h * w) as f64);
            v[1].push((cw / ch).ln());
            v[2].push((top as f64 + ch / 2.0) / h as f64);
            v[3].push((left as f64 + cw / 2.0) / w as f64);
            v[4].push(ch / h as f64);
            v[5].push(cw / w as f64);
        }
        let lr = (4.0f64 / 3.0).ln();
        for (k, (key, what, lo, hi)) in [
            ("area_hist", "crop area", 0.0, 1.0),
            ("logratio_hist", "log aspect ratio", -lr - 0.15, lr + 0.15),
            ("cy_hist", "crop centre y", 0.0, 1.0),
            ("cx_hist", "crop centre x", 0.0, 1.0),
            ("height_hist", "crop height", 0.0, 1.0),
            ("width_hist", "crop width", 0.0, 1.0),
        ]
        .into_iter()
        .enumerate()
        {
            same_hist(
                &format!("{name} {what}"),
                &usizes(&st[key]),
                &hist(&v[k], lo, hi, 10),
            );
        }
        same_rate(
            &format!("{name} fallback rate"),
            num("fallback"),
            n,
            fell_back,
            n,
        );
    }
}
