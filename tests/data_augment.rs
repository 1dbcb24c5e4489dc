//! Invariants of the augmentations.
use moco::data::augment::{self, Augment, Crop, Op, Preset};
use moco::testing::rng;
use rand::Rng;

fn random_image(c: usize, h: usize, w: usize, seed: u64) -> Vec<u8> {
    let mut r = rng(seed);
    (0..c * h * w).map(|_| r.random()).collect()
}

fn to_f32(img: &[u8]) -> Vec<f32> {
    img.iter().map(|&v| v as f32 / 255.0).collect()
}

#[test]
fn presets_give_finite_views_of_the_right_shape() {
    for preset in [Preset::V1, Preset::V2, Preset::Cifar, Preset::Eval] {
        for (c, h, w, size) in [
            (3, 32, 32, 32),
            (1, 28, 28, 32),
            (3, 50, 20, 24),
            (1, 1, 1, 4),
        ] {
            let aug = Augment::preset(preset, size, &vec![0.4; c], &vec![0.2; c]).unwrap();
            let img = random_image(c, h, w, 7);
            for seed in 0..20 {
                let mut out = vec![f32::NAN; c * size * size];
                aug.apply(&img, c, h, w, &mut rng(seed), &mut out).unwrap();
                assert!(out.iter().all(|v| v.is_finite()), "{preset:?} {c}x{h}x{w}");
                // Normalized values of [0, 1] pixels lie in [-2, 3].
                assert!(out.iter().all(|&v| (-2.0 - 1e-5..=3.0 + 1e-5).contains(&v)));
            }
        }
    }
}

#[test]
fn augmentation_is_deterministic_from_the_seed() {
    let aug = Augment::v2(32, &[0.5; 3], &[0.5; 3]).unwrap();
    let img = random_image(3, 32, 32, 1);
    let run = |seed| {
        let mut out = vec![0.0; 3 * 32 * 32];
        aug.apply(&img, 3, 32, 32, &mut rng(seed), &mut out)
            .unwrap();
        out
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));
}

#[test]
fn flip_twice_is_identity_and_flip_mirrors() {
    let mut img = to_f32(&random_image(3, 5, 7, 2));
    let orig = img.clone();
    augment::hflip(&mut img, 3, 5, 7);
    assert_ne!(img, orig);
    assert_eq!(img[0], orig[6]);
    assert_eq!(img[7 * 4 + 2 + 35], orig[7 * 4 + 4 + 35]);
    augment::hflip(&mut img, 3, 5, 7);
    assert_eq!(img, orig);
}

#[test]
fn grayscale_makes_channels_equal_with_601_luma() {
    let mut img = to_f32(&random_image(3, 4, 4, 3));
    let orig = img.clone();
    augment::grayscale(&mut img, 3, 4, 4);
    for i in 0..16 {
        assert_eq!(img[i], img[16 + i]);
        assert_eq!(img[i], img[32 + i]);
        // torchvision tensor coefficients (0.2989, not 0.299).
        let l = 0.2989 * orig[i] + 0.587 * orig[16 + i] + 0.114 * orig[32 + i];
        assert!((img[i] - l).abs() < 1e-6);
    }
    // Through the pipeline: p = 1 grayscale gives equal (pre-normalization) channels.
    let aug = Augment {
        size: 8,
        crop: Crop::RandomResized {
            scale: (0.2, 1.0),
            ratio: (0.75, 4.0 / 3.0),
        },
        ops: vec![Op::Grayscale { p: 1.0 }],
        mean: vec![0.0; 3],
        std: vec![1.0; 3],
    };
    let mut out = vec![0.0; 3 * 64];
    aug.apply(
        &random_image(3, 16, 16, 4),
        3,
        16,
        16,
        &mut rng(1),
        &mut out,
    )
    .unwrap();
    assert_eq!(out[..64], out[64..128]);
    assert_eq!(out[..64], out[128..]);
    // One channel: a no-op.
    let mut g = to_f32(&random_image(1, 4, 4, 5));
    let g0 = g.clone();
    augment::grayscale(&mut g, 1, 4, 4);
    assert_eq!(g, g0);
}

#[test]
fn jitter_with_zero_factors_is_identity() {
    let img = to_f32(&random_image(3, 6, 6, 6));
    for seed in 0..10 {
        let mut x = img.clone();
        augment::color_jitter(&mut x, 3, 6, 6, [0.0; 4], &mut rng(seed));
        assert_eq!(x, img);
    }
    // Factor 1 of every adjustment and hue 0 are identities too (up to rounding).
    let mut x = img.clone();
    augment::adjust_brightness(&mut x, 1.0);
    augment::adjust_contrast(&mut x, 3, 6, 6, 1.0);
    augment::adjust_saturation(&mut x, 3, 6, 6, 1.0);
    augment::adjust_hue(&mut x, 3, 6, 6, 0.0);
    moco::testing::assert_close("identity adjustments", &x, &img, 1e-6, 1e-6);
}

#[test]
fn jitter_adjustments_do_what_they_say() {
    let img = to_f32(&random_image(3, 6, 6, 8));
    // Brightness 0 is black; saturation 0 is grayscale; contrast 0 is the mean luma.
    let mut b = img.clone();
    augment::adjust_brightness(&mut b, 0.0);
    assert!(b.iter().all(|&v| v == 0.0));
    let mut s = img.clone();
    augment::adjust_saturation(&mut s, 3, 6, 6, 0.0);
    let mut g = img.clone();
    augment::grayscale(&mut g, 3, 6, 6);
    moco::testing::assert_close("saturation 0", &s, &g, 1e-6, 1e-6);
    let mut c = img.clone();
    augment::adjust_contrast(&mut c, 3, 6, 6, 0.0);
    let mean: f32 = g[..36].iter().sum::<f32>() / 36.0;
    assert!(c.iter().all(|&v| (v - mean).abs() < 1e-5));
    // Hue: a full turn is the identity; pure red shifted by 1/3 turn is pure green.
    let mut h = img.clone();
    augment::adjust_hue(&mut h, 3, 6, 6, 0.5);
    assert!(moco::testing::rel_err(&h, &img).0 > 0.05);
    augment::adjust_hue(&mut h, 3, 6, 6, -0.5);
    moco::testing::assert_close("hue +0.5 -0.5", &h, &img, 1e-5, 1e-5);
    let mut red = vec![1.0, 0.0, 0.0];
    augment::adjust_hue(&mut red, 3, 1, 1, 1.0 / 3.0);
    moco::testing::assert_close("red -> green", &red, &[0.0, 1.0, 0.0], 1e-5, 1e-5);
    // Grey pixels keep their value under any hue shift.
    let mut grey = vec![0.3, 0.3, 0.3];
    augment::adjust_hue(&mut grey, 3, 1, 1, 0.27);
    assert_eq!(grey, vec![0.3, 0.3, 0.3]);
}

#[test]
fn full_crop_is_a_resize_and_same_size_is_identity() {
    let src = random_image(3, 9, 9, 9);
    // scale 1, ratio 1 on a square image: the crop is the whole image.
    let mut r = rng(0);
    assert_eq!(
        augment::random_resized_crop_params(9, 9, (1.0, 1.0), (1.0, 1.0), &mut r),
        (0, 0, 9, 9)
    );
    let aug = Augment {
        size: 9,
        crop: Crop::RandomResized {
            scale: (1.0, 1.0),
            ratio: (1.0, 1.0),
        },
        ops: vec![],
        mean: vec![0.0; 3],
        std: vec![1.0; 3],
    };
    let mut out = vec![0.0; 3 * 81];
    aug.apply(&src, 3, 9, 9, &mut rng(3), &mut out).unwrap();
    moco::testing::assert_close("crop at full size", &out, &to_f32(&src), 1e-6, 1e-6);
    // The eval transform equals the full crop for any output size.
    let ev = Augment::eval(5, &[0.0; 3], &[1.0; 3]).unwrap();
    let aug5 = Augment {
        size: 5,
        ..aug.clone()
    };
    let (mut a, mut b) = (vec![0.0; 75], vec![0.0; 75]);
    ev.apply(&src, 3, 9, 9, &mut rng(1), &mut a).unwrap();
    aug5.apply(&src, 3, 9, 9, &mut rng(2), &mut b).unwrap();
    assert_eq!(a, b);
    // Upscaling a constant image stays constant; a 2x upscale of a 1x2 ramp interpolates.
    let mut up = vec![0.0; 4];
    augment::resized_crop(&[0, 255], 1, 1, 2, (0, 0, 1, 2), 1, 4, &mut up);
    moco::testing::assert_close("bilinear", &up, &[0.0, 0.25, 0.75, 1.0], 1e-6, 1e-6);
}

#[test]
fn random_resized_crop_respects_scale_and_ratio() {
    let mut r = rng(11);
    for _ in 0..500 {
        let (i, j, h, w) =
            augment::random_resized_crop_params(60, 80, (0.2, 1.0), (0.75, 4.0 / 3.0), &mut r);
        assert!(i + h <= 60 && j + w <= 80 && h > 0 && w > 0);
        let area = (h * w) as f64 / 4800.0;
        assert!(area > 0.18 && area < 1.02, "area {area}");
    }
    // Impossible request: falls back to the center crop with the ratio clamped.
    let (i, j, h, w) = augment::random_resized_crop_params(10, 100, (0.9, 1.0), (1.0, 1.0), &mut r);
    assert_eq!((i, j, h, w), (0, 45, 10, 10));
}

#[test]
fn blur_keeps_constants_and_mass_and_smooths() {
    assert_eq!(augment::blur_kernel_size(224), 23);
    assert_eq!(augment::blur_kernel_size(32), 3);
    assert_eq!(augment::blur_kernel_size(4), 3);
    let mut scratch = Vec::new();
    let mut flat = vec![0.7f32; 2 * 25];
    augment::gaussian_blur(&mut flat, 2, 5, 5, 1.5, 23, &mut scratch);
    assert!(flat.iter().all(|&v| (v - 0.7).abs() < 1e-5));
    // An impulse spreads symmetrically and the peak drops.
    let mut imp = vec![0.0f32; 49];
    imp[24] = 1.0;
    augment::gaussian_blur(&mut imp, 1, 7, 7, 1.0, 3, &mut scratch);
    assert!(imp[24] < 0.5 && imp[24] > 0.1);
    assert_eq!(imp[23], imp[25]);
    assert_eq!(imp[17], imp[31]);
    assert!((imp.iter().sum::<f32>() - 1.0).abs() < 1e-5);
}

#[test]
fn invalid_configs_and_shapes_are_errors() {
    assert!(Augment::v2(0, &[0.5; 3], &[0.5; 3]).is_err());
    assert!(Augment::v2(32, &[0.5; 3], &[0.0; 3]).is_err());
    assert!(Augment::v2(32, &[0.5; 3], &[0.5; 2]).is_err());
    let mut a = Augment::v1(8, &[0.5; 3], &[0.5; 3]).unwrap();
    let img = random_image(3, 8, 8, 1);
    let mut out = vec![0.0; 3 * 64];
    // Wrong source length, wrong output length, wrong channel count.
    assert!(a.apply(&img[1..], 3, 8, 8, &mut rng(0), &mut out).is_err());
    assert!(a.apply(&img, 3, 8, 8, &mut rng(0), &mut out[1..]).is_err());
    assert!(a
        .apply(&img[..64], 1, 8, 8, &mut rng(0), &mut out[..64])
        .is_err());
    a.ops.push(Op::HorizontalFlip { p: 1.5 });
    assert!(a.apply(&img, 3, 8, 8, &mut rng(0), &mut out).is_err());
    assert!("v3".parse::<Preset>().is_err());
    assert_eq!("V2".parse::<Preset>().unwrap(), Preset::V2);
}

/// Direct 2-D convolution with the torchvision kernel and reflect padding, in f64.
fn blur_reference(img: &[f32], c: usize, h: usize, w: usize, sigma: f64, k: usize) -> Vec<f32> {
    let half = (k / 2) as isize;
    let g: Vec<f64> = (-half..=half)
        .map(|x| (-0.5 * (x as f64 / sigma).powi(2)).exp())
        .collect();
    let sum: f64 = g.iter().sum();
    let refl = |i: isize, n: usize| -> usize {
        // Mirror without repeating the edge, as many times as needed.
        let mut i = i;
        loop {
            if i < 0 {
                i = -i;
            } else if i >= n as isize {
                i = 2 * (n as isize - 1) - i;
            } else {
                return i as usize;
            }
            if n == 1 {
                return 0;
            }
        }
    };
    let mut out = vec![0.0f32; img.len()];
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                let mut acc = 0.0f64;
                for (a, ga) in g.iter().enumerate() {
                    for (b, gb) in g.iter().enumerate() {
                        let yy = refl(y as isize + a as isize - half, h);
                        let xx = refl(x as isize + b as isize - half, w);
                        acc += ga * gb / (sum * sum) * img[ch * h * w + yy * w + xx] as f64;
                    }
                }
                out[ch * h * w + y * w + x] = acc as f32;
            }
        }
    }
    out
}

#[test]
fn blur_matches_direct_convolution() {
    let mut scratch = Vec::new();
    for (c, h, w, sigma, k) in [
        (3, 9, 7, 1.3f32, 3),
        (1, 12, 16, 0.4, 5),
        (2, 5, 6, 2.0, 9),
        (3, 24, 24, 1.7, 23),
    ] {
        let img = to_f32(&random_image(c, h, w, 21));
        let mut got = img.clone();
        augment::gaussian_blur(&mut got, c, h, w, sigma, k, &mut scratch);
        let want = blur_reference(&img, c, h, w, sigma as f64, k);
        moco::testing::assert_close(&format!("blur {c}x{h}x{w} k{k}"), &got, &want, 1e-5, 1e-5);
    }
}
