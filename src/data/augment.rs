//! Image augmentations with torchvision semantics, on `f32` CHW images in [0, 1].
//!
//! An [`Augment`] is a crop ([`Crop`]: torchvision's `RandomResizedCrop`, or a center crop
//! for evaluation) from the stored `u8` image to `size x size`, then a list of [`Op`]s in
//! order, then per-channel normalization `(x - mean) / std`. The presets follow the
//! reference implementations:
//!
//! | preset          | pipeline                                                                                     |
//! |-----------------|----------------------------------------------------------------------------------------------|
//! | [`Augment::v1`] | RandomResizedCrop(0.2-1), RandomGrayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4), flip     |
//! | [`Augment::v2`] | RandomResizedCrop(0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, RandomGrayscale(0.2), GaussianBlur(sigma 0.1-2) p 0.5, flip |
//! | [`Augment::cifar`] | RandomResizedCrop(0.08-1, as the MoCo CIFAR-10 demo), flip, ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, RandomGrayscale(0.2); no blur |
//! | [`Augment::eval`] | center crop + resize, normalize                                                            |
//!
//! Details that match torchvision: `RandomResizedCrop` draws area and log-ratio for up to
//! 10 attempts and falls back to a center crop clamped to the ratio range; resizing is
//! bilinear with half-pixel centres (`align_corners = False`), sampling clamped to the crop
//! (no antialiasing: the crops are upscaled, or at most mildly downscaled, in every preset);
//! `ColorJitter` draws brightness/contrast/saturation factors from `[max(0, 1 - x), 1 + x]`
//! and hue from `[-h, h]` and applies them in a random order, a parameter of 0 disabling
//! that adjustment; contrast blends with the mean of the grayscale image; hue goes through
//! HSV exactly as torchvision's tensor code; grayscale is ITU-R 601-2 luma
//! (0.299 R + 0.587 G + 0.114 B) copied to every channel; the blur kernel is Gaussian with
//! reflect padding and an odd size of about 10% of the image (23 px at 224, as MoCo v2 and
//! SimCLR; 3 px at 32). One-channel images get the applicable subset: grayscale, saturation
//! and hue are skipped (brightness, contrast, blur, flip and crop apply).
//!
//! ```
//! use moco::data::augment::Augment;
//! use moco::testing::rng;
//! let aug = Augment::v2(16, &[0.5; 3], &[0.25; 3]).unwrap();
//! let img = vec![128u8; 3 * 20 * 20]; // CHW
//! let mut out = vec![0.0f32; 3 * 16 * 16];
//! aug.apply(&img, 3, 20, 20, &mut rng(1), &mut out).unwrap();
//! assert!(out.iter().all(|v| v.is_finite()));
//! ```
use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::Rng;

use crate::{Error, Result};

/// How the `size x size` view is cut from the stored image.
#[derive(Clone, Debug, PartialEq)]
pub enum Crop {
    /// torchvision `RandomResizedCrop(size, scale, ratio)`: a random region of area fraction
    /// in `scale` and aspect ratio (w/h) in `ratio`, resized to `size x size`.
    RandomResized {
        /// Range of the area fraction.
        scale: (f32, f32),
        /// Range of the aspect ratio w / h (drawn log-uniformly).
        ratio: (f32, f32),
    },
    /// Centered square of side `fraction * min(h, w)` resized to `size x size`
    /// (`fraction` 0.875 is torchvision's Resize(256) + CenterCrop(224); 1 keeps all).
    Center {
        /// Side of the square as a fraction of the shorter side, in (0, 1].
        fraction: f32,
    },
}

/// One augmentation step after the crop.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// With probability `p`, torchvision `ColorJitter(brightness, contrast, saturation, hue)`.
    ColorJitter {
        /// Brightness factor range `[max(0, 1 - b), 1 + b]`; 0 disables.
        brightness: f32,
        /// Contrast factor range, as brightness.
        contrast: f32,
        /// Saturation factor range, as brightness.
        saturation: f32,
        /// Hue shift range `[-h, h]` (in turns), `h <= 0.5`; 0 disables.
        hue: f32,
        /// Probability of applying the jitter.
        p: f32,
    },
    /// With probability `p`, replace every channel by the luma.
    Grayscale {
        /// Probability.
        p: f32,
    },
    /// With probability `p`, Gaussian blur with sigma uniform in `sigma`.
    GaussianBlur {
        /// Range of sigma, in pixels of the output view.
        sigma: (f32, f32),
        /// Probability.
        p: f32,
    },
    /// With probability `p`, mirror left-right.
    HorizontalFlip {
        /// Probability.
        p: f32,
    },
}

/// The augmentation presets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// MoCo v1.
    V1,
    /// MoCo v2.
    V2,
    /// The MoCo CIFAR-10 demo recipe (v2 without blur).
    Cifar,
    /// No augmentation: center crop, resize, normalize.
    Eval,
}

impl FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "v1" => Preset::V1,
            "v2" => Preset::V2,
            "cifar" => Preset::Cifar,
            "eval" | "none" => Preset::Eval,
            _ => {
                return Err(Error::invalid(format!(
                    "unknown augmentation {s:?}; use v1, v2, cifar or eval"
                )))
            }
        })
    }
}

/// A full transform: crop to `size x size`, [`Op`]s in order, normalize.
#[derive(Clone, Debug, PartialEq)]
pub struct Augment {
    /// Side of the output view.
    pub size: usize,
    /// The crop.
    pub crop: Crop,
    /// Steps after the crop, in order.
    pub ops: Vec<Op>,
    /// Per-channel mean subtracted at the end (one per channel of the data).
    pub mean: Vec<f32>,
    /// Per-channel std divided by at the end.
    pub std: Vec<f32>,
}

const FLIP: Op = Op::HorizontalFlip { p: 0.5 };
const GRAY: Op = Op::Grayscale { p: 0.2 };
const JITTER_V2: Op = Op::ColorJitter {
    brightness: 0.4,
    contrast: 0.4,
    saturation: 0.4,
    hue: 0.1,
    p: 0.8,
};

impl Augment {
    /// The preset `preset` at output size `size`, normalizing with `mean`/`std`.
    pub fn preset(preset: Preset, size: usize, mean: &[f32], std: &[f32]) -> Result<Augment> {
        let rrc = |lo: f32| Crop::RandomResized {
            scale: (lo, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        };
        let (crop, ops) = match preset {
            Preset::V1 => (
                rrc(0.2),
                vec![
                    GRAY,
                    Op::ColorJitter {
                        brightness: 0.4,
                        contrast: 0.4,
                        saturation: 0.4,
                        hue: 0.4,
                        p: 1.0,
                    },
                    FLIP,
                ],
            ),
            Preset::V2 => (
                rrc(0.2),
                vec![
                    JITTER_V2,
                    GRAY,
                    Op::GaussianBlur {
                        sigma: (0.1, 2.0),
                        p: 0.5,
                    },
                    FLIP,
                ],
            ),
            Preset::Cifar => (rrc(0.08), vec![FLIP, JITTER_V2, GRAY]),
            Preset::Eval => (Crop::Center { fraction: 1.0 }, vec![]),
        };
        let a = Augment {
            size,
            crop,
            ops,
            mean: mean.to_vec(),
            std: std.to_vec(),
        };
        a.validate()?;
        Ok(a)
    }

    /// MoCo v1 augmentation.
    pub fn v1(size: usize, mean: &[f32], std: &[f32]) -> Result<Augment> {
        Self::preset(Preset::V1, size, mean, std)
    }

    /// MoCo v2 augmentation.
    pub fn v2(size: usize, mean: &[f32], std: &[f32]) -> Result<Augment> {
        Self::preset(Preset::V2, size, mean, std)
    }

    /// The MoCo CIFAR-10 demo's augmentation.
    pub fn cifar(size: usize, mean: &[f32], std: &[f32]) -> Result<Augment> {
        Self::preset(Preset::Cifar, size, mean, std)
    }

    /// The evaluation transform: whole image (center square) resized to `size`, normalized.
    pub fn eval(size: usize, mean: &[f32], std: &[f32]) -> Result<Augment> {
        Self::preset(Preset::Eval, size, mean, std)
    }

    /// Checks every parameter; the constructors call it, [`Augment::apply`] too.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(format!("augmentation: {m}")));
        if !(1..=4096).contains(&self.size) {
            return bad(format!("output size {} not in 1..=4096", self.size));
        }
        if self.mean.is_empty() || self.mean.len() != self.std.len() {
            return bad(format!(
                "{} means for {} stds",
                self.mean.len(),
                self.std.len()
            ));
        }
        if self.mean.iter().any(|m| !m.is_finite())
            || self.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
        {
            return bad(format!(
                "mean {:?} / std {:?} must be finite, std > 0",
                self.mean, self.std
            ));
        }
        let prob = |p: f32| (0.0..=1.0).contains(&p);
        match self.crop {
            Crop::RandomResized { scale, ratio } => {
                if !(scale.0 > 0.0 && scale.0 <= scale.1 && scale.1.is_finite()) {
                    return bad(format!("crop scale {scale:?} must satisfy 0 < lo <= hi"));
                }
                if !(ratio.0 > 0.0 && ratio.0 <= ratio.1 && ratio.1.is_finite()) {
                    return bad(format!("crop ratio {ratio:?} must satisfy 0 < lo <= hi"));
                }
            }
            Crop::Center { fraction } => {
                if !(fraction > 0.0 && fraction <= 1.0) {
                    return bad(format!("center-crop fraction {fraction} not in (0, 1]"));
                }
            }
        }
        for op in &self.ops {
            match *op {
                Op::ColorJitter {
                    brightness,
                    contrast,
                    saturation,
                    hue,
                    p,
                } => {
                    if ![brightness, contrast, saturation]
                        .iter()
                        .all(|x| x.is_finite() && *x >= 0.0)
                        || !(0.0..=0.5).contains(&hue)
                        || !prob(p)
                    {
                        return bad(format!(
                            "invalid {op:?} (factors >= 0, hue in [0, 0.5], p in [0, 1])"
                        ));
                    }
                }
                Op::Grayscale { p } | Op::HorizontalFlip { p } => {
                    if !prob(p) {
                        return bad(format!("probability {p} not in [0, 1] in {op:?}"));
                    }
                }
                Op::GaussianBlur { sigma, p } => {
                    if !(sigma.0 > 0.0 && sigma.0 <= sigma.1 && sigma.1.is_finite() && prob(p)) {
                        return bad(format!("invalid {op:?} (0 < sigma lo <= hi, p in [0, 1])"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Augments one image: `src` is `c x h x w` `u8` (CHW); `out` receives the normalized
    /// `c x size x size` view. All randomness comes from `rng`.
    pub fn apply<R: Rng + ?Sized>(
        &self,
        src: &[u8],
        c: usize,
        h: usize,
        w: usize,
        rng: &mut R,
        out: &mut [f32],
    ) -> Result<()> {
        self.validate()?;
        let expect = c.checked_mul(h).and_then(|v| v.checked_mul(w));
        if c == 0 || h == 0 || w == 0 || expect != Some(src.len()) {
            return Err(Error::invalid(format!(
                "augment: source of {} bytes is not {c}x{h}x{w}",
                src.len()
            )));
        }
        if self.mean.len() != c {
            return Err(Error::invalid(format!(
                "augment: {} normalization means for {c}-channel images",
                self.mean.len()
            )));
        }
        let s = self.size;
        if out.len() != c * s * s {
            return Err(Error::invalid(format!(
                "augment: output of {} floats is not {c}x{s}x{s}",
                out.len()
            )));
        }
        let region = match self.crop {
            Crop::RandomResized { scale, ratio } => {
                random_resized_crop_params(h, w, scale, ratio, rng)
            }
            Crop::Center { fraction } => {
                let side = ((h.min(w) as f32 * fraction).round() as usize).clamp(1, h.min(w));
                ((h - side) / 2, (w - side) / 2, side, side)
            }
        };
        resized_crop(src, c, h, w, region, s, s, out);
        let mut scratch = Vec::new();
        for op in &self.ops {
            match *op {
                Op::ColorJitter {
                    brightness,
                    contrast,
                    saturation,
                    hue,
                    p,
                } => {
                    if rng.random::<f32>() < p {
                        color_jitter(out, c, s, s, [brightness, contrast, saturation, hue], rng);
                    }
                }
                Op::Grayscale { p } => {
                    if rng.random::<f32>() < p {
                        grayscale(out, c, s, s);
                    }
                }
                Op::GaussianBlur { sigma, p } => {
                    if rng.random::<f32>() < p {
                        let sg = rng.random_range(sigma.0..=sigma.1);
                        gaussian_blur(out, c, s, s, sg, blur_kernel_size(s), &mut scratch);
                    }
                }
                Op::HorizontalFlip { p } => {
                    if rng.random::<f32>() < p {
                        hflip(out, c, s, s);
                    }
                }
            }
        }
        normalize(out, c, s, s, &self.mean, &self.std);
        Ok(())
    }
}

/// torchvision `RandomResizedCrop.get_params`: `(top, left, height, width)` of the region.
pub fn random_resized_crop_params<R: Rng + ?Sized>(
    h: usize,
    w: usize,
    scale: (f32, f32),
    ratio: (f32, f32),
    rng: &mut R,
) -> (usize, usize, usize, usize) {
    let area = (h * w) as f64;
    let (lr0, lr1) = ((ratio.0 as f64).ln(), (ratio.1 as f64).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0 as f64..=scale.1 as f64);
        let ar = rng.random_range(lr0..=lr1).exp();
        let cw = (target * ar).sqrt().round() as usize;
        let ch = (target / ar).sqrt().round() as usize;
        if cw > 0 && cw <= w && ch > 0 && ch <= h {
            let i = rng.random_range(0..=h - ch);
            let j = rng.random_range(0..=w - cw);
            return (i, j, ch, cw);
        }
    }
    // Fallback: center crop, aspect clamped to the ratio range.
    let in_ratio = w as f64 / h as f64;
    let (ch, cw) = if in_ratio < ratio.0 as f64 {
        (
            ((w as f64 / ratio.0 as f64).round() as usize).clamp(1, h),
            w,
        )
    } else if in_ratio > ratio.1 as f64 {
        (
            h,
            ((h as f64 * ratio.1 as f64).round() as usize).clamp(1, w),
        )
    } else {
        (h, w)
    };
    ((h - ch) / 2, (w - cw) / 2, ch, cw)
}

/// Cuts `region = (top, left, height, width)` out of the `u8` CHW image `src` (`c x h x w`)
/// and resizes it bilinearly (half-pixel centres, clamped to the region) to `oh x ow`,
/// writing values in [0, 1] to `out` (`c x oh x ow`).
///
/// A low-level step: panics if the region is empty or leaves the image, or a buffer is too
/// short ([`Augment::apply`] checks everything before calling it).
#[allow(clippy::too_many_arguments)]
pub fn resized_crop(
    src: &[u8],
    c: usize,
    h: usize,
    w: usize,
    region: (usize, usize, usize, usize),
    oh: usize,
    ow: usize,
    out: &mut [f32],
) {
    let (top, left, rh, rw) = region;
    debug_assert!(top + rh <= h && left + rw <= w && rh > 0 && rw > 0);
    // Per output column: the two source columns and the weight of the second.
    let taps = |o: usize, n_out: usize, n_in: usize| -> (usize, usize, f32) {
        let s = ((o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).clamp(0.0, (n_in - 1) as f64);
        let i0 = s.floor() as usize;
        let i1 = (i0 + 1).min(n_in - 1);
        (i0, i1, (s - i0 as f64) as f32)
    };
    let xs: Vec<(usize, usize, f32)> = (0..ow).map(|x| taps(x, ow, rw)).collect();
    const INV: f32 = 1.0 / 255.0;
    for ch in 0..c {
        let plane = &src[ch * h * w..(ch + 1) * h * w];
        for y in 0..oh {
            let (y0, y1, wy) = taps(y, oh, rh);
            let r0 = &plane[(top + y0) * w + left..(top + y0) * w + left + rw];
            let r1 = &plane[(top + y1) * w + left..(top + y1) * w + left + rw];
            let o = &mut out[ch * oh * ow + y * ow..ch * oh * ow + (y + 1) * ow];
            for (ov, &(x0, x1, wx)) in o.iter_mut().zip(&xs) {
                let a = r0[x0] as f32 * (1.0 - wx) + r0[x1] as f32 * wx;
                let b = r1[x0] as f32 * (1.0 - wx) + r1[x1] as f32 * wx;
                *ov = (a * (1.0 - wy) + b * wy) * INV;
            }
        }
    }
}

/// Mirrors every row of the CHW image left-right.
pub fn hflip(img: &mut [f32], c: usize, h: usize, w: usize) {
    for row in img[..c * h * w].chunks_exact_mut(w) {
        row.reverse();
    }
}

/// Writes the ITU-R 601-2 luma of RGB pixel `i` of the plane.
#[inline]
fn luma(img: &[f32], plane: usize, i: usize) -> f32 {
    0.299 * img[i] + 0.587 * img[plane + i] + 0.114 * img[2 * plane + i]
}

/// Replaces every channel of an RGB image by its luma (no-op for other channel counts).
pub fn grayscale(img: &mut [f32], c: usize, h: usize, w: usize) {
    if c != 3 {
        return;
    }
    let plane = h * w;
    for i in 0..plane {
        let l = luma(img, plane, i);
        img[i] = l;
        img[plane + i] = l;
        img[2 * plane + i] = l;
    }
}

/// Brightness: `clamp(x * f, 0, 1)`.
pub fn adjust_brightness(img: &mut [f32], f: f32) {
    for v in img {
        *v = (*v * f).clamp(0.0, 1.0);
    }
}

/// Contrast: blend with the mean of the grayscale image, `clamp(f x + (1 - f) mean, 0, 1)`.
pub fn adjust_contrast(img: &mut [f32], c: usize, h: usize, w: usize, f: f32) {
    let plane = h * w;
    let mean = if c == 3 {
        (0..plane).map(|i| luma(img, plane, i) as f64).sum::<f64>() / plane as f64
    } else {
        img[..c * plane].iter().map(|&v| v as f64).sum::<f64>() / (c * plane) as f64
    } as f32;
    for v in &mut img[..c * plane] {
        *v = (f * *v + (1.0 - f) * mean).clamp(0.0, 1.0);
    }
}

/// Saturation: per pixel, blend with its luma (RGB only).
pub fn adjust_saturation(img: &mut [f32], c: usize, h: usize, w: usize, f: f32) {
    if c != 3 {
        return;
    }
    let plane = h * w;
    for i in 0..plane {
        let l = luma(img, plane, i);
        for ch in 0..3 {
            let v = &mut img[ch * plane + i];
            *v = (f * *v + (1.0 - f) * l).clamp(0.0, 1.0);
        }
    }
}

/// Hue: rotate the hue by `shift` turns (`[-0.5, 0.5]`) through HSV, as torchvision's
/// tensor `adjust_hue` (RGB only).
pub fn adjust_hue(img: &mut [f32], c: usize, h: usize, w: usize, shift: f32) {
    if c != 3 {
        return;
    }
    let plane = h * w;
    for i in 0..plane {
        let (r, g, b) = (img[i], img[plane + i], img[2 * plane + i]);
        let maxc = r.max(g).max(b);
        let minc = r.min(g).min(b);
        let eq = maxc == minc;
        let cr = maxc - minc;
        let s = cr / if eq { 1.0 } else { maxc };
        let div = if eq { 1.0 } else { cr };
        let (rc, gc, bc) = ((maxc - r) / div, (maxc - g) / div, (maxc - b) / div);
        let hh = if maxc == r {
            bc - gc
        } else if maxc == g {
            2.0 + rc - bc
        } else {
            4.0 + gc - rc
        };
        let hue = ((hh / 6.0 + 1.0) % 1.0 + shift).rem_euclid(1.0);
        let v = maxc;
        let h6 = hue * 6.0;
        let fi = h6.floor();
        let f = h6 - fi;
        let sector = (fi as i32).rem_euclid(6);
        let p = (v * (1.0 - s)).clamp(0.0, 1.0);
        let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
        let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
        let (nr, ng, nb) = match sector {
            0 => (v, t, p),
            1 => (q, v, p),
            2 => (p, v, t),
            3 => (p, q, v),
            4 => (t, p, v),
            _ => (v, p, q),
        };
        img[i] = nr;
        img[plane + i] = ng;
        img[2 * plane + i] = nb;
    }
}

/// torchvision `ColorJitter` with ranges `[brightness, contrast, saturation, hue]`: factors
/// drawn first, then applied in a random order. A range of 0 disables its adjustment.
pub fn color_jitter<R: Rng + ?Sized>(
    img: &mut [f32],
    c: usize,
    h: usize,
    w: usize,
    ranges: [f32; 4],
    rng: &mut R,
) {
    let mut order = [0usize, 1, 2, 3];
    order.shuffle(rng);
    let factor = |x: f32, rng: &mut R| -> Option<f32> {
        (x > 0.0).then(|| rng.random_range((1.0 - x).max(0.0)..=1.0 + x))
    };
    let b = factor(ranges[0], rng);
    let ct = factor(ranges[1], rng);
    let s = factor(ranges[2], rng);
    let hu = (ranges[3] > 0.0).then(|| rng.random_range(-ranges[3]..=ranges[3]));
    for k in order {
        match (k, b, ct, s, hu) {
            (0, Some(f), ..) => adjust_brightness(&mut img[..c * h * w], f),
            (1, _, Some(f), ..) => adjust_contrast(img, c, h, w, f),
            (2, _, _, Some(f), _) => adjust_saturation(img, c, h, w, f),
            (3, .., Some(f)) => adjust_hue(img, c, h, w, f),
            _ => {}
        }
    }
}

/// Odd blur kernel size of about 10% of the image side (23 at 224, 3 at 32), at least 3.
pub fn blur_kernel_size(side: usize) -> usize {
    let k = ((side as f64) * 0.1).round() as usize;
    (if k.is_multiple_of(2) { k + 1 } else { k }).max(3)
}

/// Index into `0..n` with reflect padding (`-1 -> 1`, `n -> n - 2`), for any overshoot.
#[inline]
fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m < n as isize { m } else { period - m }) as usize
}

/// Separable Gaussian blur of every channel (torchvision `gaussian_blur`: kernel
/// `exp(-x^2 / (2 sigma^2))` over `x = -(k-1)/2 ..= (k-1)/2`, normalized, reflect padding).
/// `sigma` must be > 0; an even `ksize` acts as `ksize + 1`. `scratch` is reused between calls.
pub fn gaussian_blur(
    img: &mut [f32],
    c: usize,
    h: usize,
    w: usize,
    sigma: f32,
    ksize: usize,
    scratch: &mut Vec<f32>,
) {
    let half = (ksize / 2) as isize;
    let mut kern: Vec<f32> = (-half..=half)
        .map(|x| (-0.5 * (x as f32 / sigma).powi(2)).exp())
        .collect();
    let sum: f32 = kern.iter().sum();
    kern.iter_mut().for_each(|k| *k /= sum);
    let hu = half as usize;
    // scratch = [horizontal result h*w | padded row w + 2 half]
    scratch.clear();
    scratch.resize(h * w + w + 2 * hu, 0.0);
    let (tmp, padded) = scratch.split_at_mut(h * w);
    let mut acc = vec![0.0f32; w];
    for ch in 0..c {
        let plane = &mut img[ch * h * w..(ch + 1) * h * w];
        // Horizontal pass: plane -> tmp, through a reflect-padded copy of each row.
        for y in 0..h {
            let row = &plane[y * w..(y + 1) * w];
            padded[hu..hu + w].copy_from_slice(row);
            for p in (0..hu).chain(hu + w..w + 2 * hu) {
                padded[p] = row[reflect(p as isize - half, w)];
            }
            let out = &mut tmp[y * w..(y + 1) * w];
            out.iter_mut().for_each(|v| *v = 0.0);
            for (t, &kv) in kern.iter().enumerate() {
                for (o, &pv) in out.iter_mut().zip(&padded[t..t + w]) {
                    *o += kv * pv;
                }
            }
        }
        // Vertical pass: tmp -> plane, whole rows at a time.
        for y in 0..h {
            acc.iter_mut().for_each(|v| *v = 0.0);
            for (t, &kv) in kern.iter().enumerate() {
                let src = reflect(y as isize + t as isize - half, h);
                for (a, &v) in acc.iter_mut().zip(&tmp[src * w..(src + 1) * w]) {
                    *a += kv * v;
                }
            }
            plane[y * w..(y + 1) * w].copy_from_slice(&acc);
        }
    }
}

/// `(x - mean[c]) / std[c]` per channel.
pub fn normalize(img: &mut [f32], c: usize, h: usize, w: usize, mean: &[f32], std: &[f32]) {
    for ch in 0..c {
        let (m, inv) = (mean[ch], 1.0 / std[ch]);
        for v in &mut img[ch * h * w..(ch + 1) * h * w] {
            *v = (*v - m) * inv;
        }
    }
}
