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
//! | [`Augment::cifar`] | RandomResizedCrop(0.08-1, as the MoCo CIFAR-10 demo; `with_crop_scale` / `--crop-scale` changes the 0.08), flip, ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, RandomGrayscale(0.2); no blur |
//! | [`Augment::eval`] | center crop + resize, normalize                                                            |
//!
//! The reference is torchvision's v2 transforms on float tensors (`ToDtype(float32,
//! scale=True)` first, `Normalize` last); `tests/augment_goldens.rs` replays torchvision's
//! drawn parameters and compares pixels (to 5e-6; 1.5e-5 on the non-square HWC photo
//! cases, whose larger resizes torchvision computes less exactly in float32) and compares
//! the distributions of the drawn parameters (also of the crops of non-square photos);
//! `docs/augmentations.md` has the step-by-step comparison and the
//! deliberate differences. Details that match torchvision: `RandomResizedCrop` draws area
//! and log-ratio for up to 10 attempts, rounds the sides half to even (Python's `round`) and
//! falls back to a center crop clamped to the ratio range; resizing is torchvision's
//! antialiased bilinear (`antialias=True`, PIL's triangle filter whose support widens with
//! the downscale factor, see [`resize_taps`]), which upscaling is plain bilinear with
//! half-pixel centres; the center crop's offsets are rounded half to even;
//! `ColorJitter` draws a fresh order (as `torch.randperm(4)`) and the brightness / contrast /
//! saturation factors from `[max(0, 1 - x), 1 + x]` and hue from `[-h, h]` on every call, a
//! parameter of 0 disabling that adjustment, and clamps to [0, 1] after each adjustment;
//! contrast blends with the mean of the grayscale image; hue goes through HSV exactly as
//! torchvision's tensor code; grayscale is `0.2989 R + 0.587 G + 0.114 B` (torchvision's
//! tensor coefficients) copied to every channel; normalization subtracts, then divides. The
//! blur kernel is Gaussian with reflect padding and an odd size of about 10% of the image
//! (23 px at 224, as MoCo v2 and SimCLR; 3 px at 32). One-channel images get what
//! torchvision v2 does to them: grayscale, saturation and hue leave them unchanged (the
//! factors are still drawn); brightness, contrast, blur, flip and crop apply.
//!
//! Unlike the classic PIL recipe, nothing is rounded to `u8` between steps (PIL rounds after
//! the resize and after every jitter step): a deliberate choice, see `docs/augmentations.md`.
//! [`Augment::sample`] draws a view's parameters ([`ViewParams`]) without touching pixels;
//! [`Augment::apply_params`] applies them.
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

use super::source::{Image, Layout};
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
    /// torchvision `Resize(resize)` then `CenterCrop(size)`, the evaluation transform for
    /// photos (`resize` 256 for 224 px views): the whole image resized so its shorter side
    /// is `resize` (the longer side `int(resize * long / short)`, as torchvision), and the
    /// centred `size x size` window of that kept. `resize` must be at least the view size.
    ResizeCenter {
        /// Target of the shorter side before the center crop.
        resize: usize,
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

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Preset::V1 => "v1",
            Preset::V2 => "v2",
            Preset::Cifar => "cifar",
            Preset::Eval => "eval",
        })
    }
}

serde_via_str!(Preset);

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

    /// The evaluation transform for photos of any size, torchvision's `Resize(256)` +
    /// `CenterCrop(224)` scaled to `size` as `Resize(int(size * 256 / 224))` +
    /// `CenterCrop(size)` (the shorter side resized to `size * 256 / 224` rounded down,
    /// 256 for 224, 36 for 32, as timm's `floor(size / 0.875)`; then the centred
    /// `size x size` window), normalized.
    ///
    /// ```
    /// use moco::data::augment::{Augment, Crop};
    /// let a = Augment::eval_photo(224, &[0.5; 3], &[0.25; 3]).unwrap();
    /// assert_eq!(a.crop, Crop::ResizeCenter { resize: 256 });
    /// ```
    pub fn eval_photo(size: usize, mean: &[f32], std: &[f32]) -> Result<Augment> {
        let mut a = Self::preset(Preset::Eval, size, mean, std)?;
        a.crop = Crop::ResizeCenter {
            resize: size * 256 / 224,
        };
        a.validate()?;
        Ok(a)
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
            Crop::ResizeCenter { resize } => {
                if resize < self.size || resize > 4 * 4096 {
                    return bad(format!(
                        "resize {resize} before the center crop must be in {}..={}",
                        self.size,
                        4 * 4096
                    ));
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
    /// `c x size x size` view. All randomness comes from `rng`: this is
    /// [`Augment::sample`] followed by [`Augment::apply_params`].
    pub fn apply<R: Rng + ?Sized>(
        &self,
        src: &[u8],
        c: usize,
        h: usize,
        w: usize,
        rng: &mut R,
        out: &mut [f32],
    ) -> Result<()> {
        self.apply_image(&Image::chw(c, h, w, src)?, rng, out)
    }

    /// Augments one [`Image`] of any size and layout (a decoded photo, HWC, or a CHW
    /// image of an in-memory set): [`Augment::sample`] for its size, then
    /// [`Augment::apply_params_image`]. Draw twice from one image for MoCo's two views.
    pub fn apply_image<R: Rng + ?Sized>(
        &self,
        img: &Image<'_>,
        rng: &mut R,
        out: &mut [f32],
    ) -> Result<()> {
        let params = self.sample(img.channels, img.height, img.width, rng)?;
        self.apply_params_image(img, &params, out)
    }

    /// Checks the shapes of one call (an image of `c` channels, `out` of `c x size x size`).
    fn check_shapes(&self, c: usize, out_len: usize) -> Result<()> {
        self.validate()?;
        if self.mean.len() != c {
            return Err(Error::invalid(format!(
                "augment: {} normalization means for {c}-channel images",
                self.mean.len()
            )));
        }
        let s = self.size;
        if out_len != c * s * s {
            return Err(Error::invalid(format!(
                "augment: output of {out_len} floats is not {c}x{s}x{s}"
            )));
        }
        Ok(())
    }

    /// Draws the random parameters of one view of a `c x h x w` image, in the order the
    /// steps run (as torchvision's `make_params`), without touching any pixel. Every
    /// [`Op`] yields one [`OpParams`], also when it is not applied.
    pub fn sample<R: Rng + ?Sized>(
        &self,
        c: usize,
        h: usize,
        w: usize,
        rng: &mut R,
    ) -> Result<ViewParams> {
        self.validate()?;
        if c == 0 || h == 0 || w == 0 || c.checked_mul(h).and_then(|v| v.checked_mul(w)).is_none() {
            return Err(Error::invalid(format!(
                "augment: empty or oversized image {c}x{h}x{w}"
            )));
        }
        let (region, resize) = match self.crop {
            Crop::RandomResized { scale, ratio } => {
                (random_resized_crop_params(h, w, scale, ratio, rng), None)
            }
            Crop::Center { fraction } => (center_crop_params(h, w, fraction), None),
            Crop::ResizeCenter { resize } => {
                ((0, 0, h, w), Some(resize_shorter_side(h, w, resize)))
            }
        };
        let mut ops = Vec::with_capacity(self.ops.len());
        for op in &self.ops {
            ops.push(match *op {
                Op::ColorJitter {
                    brightness,
                    contrast,
                    saturation,
                    hue,
                    p,
                } => {
                    OpParams::ColorJitter((rng.random::<f32>() < p).then(|| {
                        JitterParams::sample([brightness, contrast, saturation, hue], rng)
                    }))
                }
                Op::Grayscale { p } => OpParams::Grayscale(rng.random::<f32>() < p),
                Op::GaussianBlur { sigma, p } => OpParams::GaussianBlur(
                    (rng.random::<f32>() < p).then(|| rng.random_range(sigma.0..=sigma.1)),
                ),
                Op::HorizontalFlip { p } => OpParams::HorizontalFlip(rng.random::<f32>() < p),
            });
        }
        Ok(ViewParams {
            region,
            resize,
            ops,
        })
    }

    /// Applies drawn parameters (from [`Augment::sample`], or built by hand, for example
    /// from torchvision's) to `src` (`c x h x w` `u8`, CHW), writing the normalized
    /// `c x size x size` view to `out`. Deterministic: no randomness.
    pub fn apply_params(
        &self,
        src: &[u8],
        c: usize,
        h: usize,
        w: usize,
        params: &ViewParams,
        out: &mut [f32],
    ) -> Result<()> {
        self.apply_params_image(&Image::chw(c, h, w, src)?, params, out)
    }

    /// [`Augment::apply_params`] on an [`Image`] of any layout.
    pub fn apply_params_image(
        &self,
        img: &Image<'_>,
        params: &ViewParams,
        out: &mut [f32],
    ) -> Result<()> {
        let (c, h, w) = (img.channels, img.height, img.width);
        self.check_shapes(c, out.len())?;
        let (top, left, rh, rw) = params.region;
        if rh == 0
            || rw == 0
            || top.checked_add(rh).is_none_or(|b| b > h)
            || left.checked_add(rw).is_none_or(|r| r > w)
        {
            return Err(Error::invalid(format!(
                "augment: crop region {:?} (top, left, height, width) leaves the {h}x{w} image",
                params.region
            )));
        }
        let s = self.size;
        let (full, window) = match params.resize {
            None => ((s, s), (0, 0)),
            Some((fh, fw)) => {
                if fh < s || fw < s || fh > MAX_RESIZE_SIDE || fw > MAX_RESIZE_SIDE {
                    return Err(Error::invalid(format!(
                        "augment: resize to {fh}x{fw} before a center crop of {s} (each side must be in {s}..={MAX_RESIZE_SIDE})"
                    )));
                }
                let off = |n: usize| round_half_even((n - s) as f64 / 2.0);
                ((fh, fw), (off(fh), off(fw)))
            }
        };
        if params.ops.len() != self.ops.len() {
            return Err(Error::invalid(format!(
                "augment: {} drawn parameters for {} steps",
                params.ops.len(),
                self.ops.len()
            )));
        }
        resample(img, params.region, full, window, (s, s), out);
        let mut scratch = Vec::new();
        for (op, drawn) in self.ops.iter().zip(&params.ops) {
            match (op, drawn) {
                (Op::ColorJitter { .. }, OpParams::ColorJitter(j)) => {
                    if let Some(j) = j {
                        j.check()?;
                        j.apply(out, c, s, s);
                    }
                }
                (Op::Grayscale { .. }, OpParams::Grayscale(on)) => {
                    if *on {
                        grayscale(out, c, s, s);
                    }
                }
                (Op::GaussianBlur { .. }, OpParams::GaussianBlur(sg)) => {
                    if let Some(sg) = *sg {
                        if !(sg.is_finite() && sg > 0.0) {
                            return Err(Error::invalid(format!(
                                "augment: blur sigma {sg} must be > 0"
                            )));
                        }
                        gaussian_blur(out, c, s, s, sg, blur_kernel_size(s), &mut scratch);
                    }
                }
                (Op::HorizontalFlip { .. }, OpParams::HorizontalFlip(on)) => {
                    if *on {
                        hflip(out, c, s, s);
                    }
                }
                _ => {
                    return Err(Error::invalid(format!(
                        "augment: drawn parameters {drawn:?} do not belong to step {op:?}"
                    )))
                }
            }
        }
        normalize(out, c, s, s, &self.mean, &self.std);
        Ok(())
    }

    /// The same transform with the random crop's smallest area fraction set to `min`
    /// (torchvision's `RandomResizedCrop(scale=(min, 1))`); `min` must be finite and in
    /// `(0, 1]`. A center crop (the eval preset) is left as it is.
    pub fn with_crop_scale(mut self, min: f64) -> Result<Augment> {
        if !(min.is_finite() && min > 0.0 && min <= 1.0) {
            return Err(Error::invalid(format!(
                "crop scale {min} must be a finite number in (0, 1]"
            )));
        }
        if let Crop::RandomResized { scale, .. } = &mut self.crop {
            *scale = (min as f32, scale.1.max(min as f32));
        }
        self.validate()?;
        Ok(self)
    }
}

/// The random parameters of one view, as [`Augment::sample`] draws them.
#[derive(Clone, Debug, PartialEq)]
pub struct ViewParams {
    /// Crop region `(top, left, height, width)` in source pixels.
    pub region: (usize, usize, usize, usize),
    /// `None`: the region is resized to the view. `Some((height, width))` (for
    /// [`Crop::ResizeCenter`]): the region is resized to `height x width` and the centred
    /// view-sized window of that is kept.
    pub resize: Option<(usize, usize)>,
    /// One entry per [`Op`] of the transform, in order.
    pub ops: Vec<OpParams>,
}

/// What one [`Op`] drew.
#[derive(Clone, Debug, PartialEq)]
pub enum OpParams {
    /// The jitter's factors and order, or `None` when it was not applied.
    ColorJitter(Option<JitterParams>),
    /// Whether the image was turned gray.
    Grayscale(bool),
    /// Blur sigma, or `None` when it was not applied.
    GaussianBlur(Option<f32>),
    /// Whether the image was mirrored.
    HorizontalFlip(bool),
}

/// torchvision `ColorJitter.make_params`: the order of the four adjustments (a permutation
/// of `0..4`: 0 brightness, 1 contrast, 2 saturation, 3 hue, as `torch.randperm(4)`) and
/// each factor (`None`: that adjustment is disabled).
#[derive(Clone, Debug, PartialEq)]
pub struct JitterParams {
    /// Order in which the adjustments run.
    pub order: [usize; 4],
    /// Brightness factor.
    pub brightness: Option<f32>,
    /// Contrast factor.
    pub contrast: Option<f32>,
    /// Saturation factor.
    pub saturation: Option<f32>,
    /// Hue shift in turns.
    pub hue: Option<f32>,
}

impl JitterParams {
    /// Draws the order, then brightness, contrast, saturation and hue (each only when its
    /// range is > 0) from `ranges = [brightness, contrast, saturation, hue]`.
    pub fn sample<R: Rng + ?Sized>(ranges: [f32; 4], rng: &mut R) -> JitterParams {
        let mut order = [0usize, 1, 2, 3];
        order.shuffle(rng);
        let mut factor = |x: f32| -> Option<f32> {
            (x > 0.0).then(|| rng.random_range((1.0 - x).max(0.0)..=1.0 + x))
        };
        let brightness = factor(ranges[0]);
        let contrast = factor(ranges[1]);
        let saturation = factor(ranges[2]);
        let hue = (ranges[3] > 0.0).then(|| rng.random_range(-ranges[3]..=ranges[3]));
        JitterParams {
            order,
            brightness,
            contrast,
            saturation,
            hue,
        }
    }

    /// Checks that `order` is a permutation of `0..4`, factors are finite and >= 0 and the
    /// hue shift is in `[-0.5, 0.5]`.
    pub fn check(&self) -> Result<()> {
        let mut seen = [false; 4];
        for &k in &self.order {
            if k >= 4 || seen[k] {
                return Err(Error::invalid(format!(
                    "augment: jitter order {:?} is not a permutation of 0..4",
                    self.order
                )));
            }
            seen[k] = true;
        }
        let ok = |f: Option<f32>| f.is_none_or(|f| f.is_finite() && f >= 0.0);
        let hue_ok = self.hue.is_none_or(|h| (-0.5..=0.5).contains(&h));
        if !(ok(self.brightness) && ok(self.contrast) && ok(self.saturation) && hue_ok) {
            return Err(Error::invalid(format!(
                "augment: invalid jitter factors {self:?} (factors >= 0, hue in [-0.5, 0.5])"
            )));
        }
        Ok(())
    }

    /// Runs the adjustments on the `c x h x w` image in `order`.
    pub fn apply(&self, img: &mut [f32], c: usize, h: usize, w: usize) {
        for k in self.order {
            match (k, self.brightness, self.contrast, self.saturation, self.hue) {
                (0, Some(f), ..) => adjust_brightness(&mut img[..c * h * w], f),
                (1, _, Some(f), ..) => adjust_contrast(img, c, h, w, f),
                (2, _, _, Some(f), _) => adjust_saturation(img, c, h, w, f),
                (3, .., Some(f)) => adjust_hue(img, c, h, w, f),
                _ => {}
            }
        }
    }
}

/// Python's `int(round(x))` for `x >= 0`: rounds half to even.
#[inline]
fn round_half_even(x: f64) -> usize {
    x.round_ties_even().max(0.0) as usize
}

/// torchvision `CenterCrop` of a square of side `round(fraction * min(h, w))` (at least
/// 1): `(top, left, side, side)` with the offsets rounded as torchvision's
/// `int(round((h - side) / 2.0))` (half to even).
pub fn center_crop_params(h: usize, w: usize, fraction: f32) -> (usize, usize, usize, usize) {
    let side = round_half_even(h.min(w) as f64 * fraction as f64).clamp(1, h.min(w));
    (
        round_half_even((h - side) as f64 / 2.0),
        round_half_even((w - side) as f64 / 2.0),
        side,
        side,
    )
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
        // Python's round: half to even.
        let cw = round_half_even((target * ar).sqrt());
        let ch = round_half_even((target / ar).sqrt());
        if cw > 0 && cw <= w && ch > 0 && ch <= h {
            let i = rng.random_range(0..=h - ch);
            let j = rng.random_range(0..=w - cw);
            return (i, j, ch, cw);
        }
    }
    // Fallback: center crop, aspect clamped to the ratio range.
    let in_ratio = w as f64 / h as f64;
    let (ch, cw) = if in_ratio < ratio.0 as f64 {
        (round_half_even(w as f64 / ratio.0 as f64).clamp(1, h), w)
    } else if in_ratio > ratio.1 as f64 {
        (h, round_half_even(h as f64 * ratio.1 as f64).clamp(1, w))
    } else {
        (h, w)
    };
    ((h - ch) / 2, (w - cw) / 2, ch, cw)
}

/// Resampling taps of one axis: for each output index, the first source index and the
/// normalized weights of the consecutive source samples from there.
///
/// This is torchvision's / PIL's antialiased bilinear resize (`antialias=True`, the default
/// of the v2 transforms; PyTorch's `_upsample_bilinear2d_aa`): output sample `i` is centred
/// at `center = (i + 0.5) * scale` with `scale = n_in / n_out`, and source sample `j`
/// (centred at `j + 0.5`) weighs `tri((j + 0.5 - center) / max(scale, 1))` with the triangle
/// `tri(x) = max(0, 1 - |x|)`, over the window `[center - support, center + support)`
/// clipped to the image, `support = max(scale, 1)`; the weights are renormalized to sum
/// to one. Upscaling (`scale <= 1`) this is plain bilinear with half-pixel centres and edge
/// clamping (`align_corners=False`); downscaling, the filter widens with the factor, so
/// every source pixel contributes (no aliasing).
pub fn resize_taps(n_in: usize, n_out: usize) -> Vec<(usize, Vec<f32>)> {
    resize_taps_range(n_in, n_out, 0..n_out)
}

/// The taps of [`resize_taps`] for the outputs in `range` only (a window of a larger
/// resize, as `Resize` followed by `CenterCrop`).
pub fn resize_taps_range(
    n_in: usize,
    n_out: usize,
    range: std::ops::Range<usize>,
) -> Vec<(usize, Vec<f32>)> {
    let scale = n_in as f64 / n_out as f64;
    let (support, inv) = if scale >= 1.0 {
        (scale, 1.0 / scale)
    } else {
        (1.0, 1.0)
    };
    range
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            // C++ `(int64_t)` truncation, as PyTorch; both bounds are >= -0.5 here.
            let lo = ((center - support + 0.5).trunc().max(0.0) as usize).min(n_in - 1);
            let hi = ((center + support + 0.5).trunc() as usize).clamp(lo + 1, n_in);
            let mut wts: Vec<f64> = (lo..hi)
                .map(|j| (1.0 - ((j as f64 + 0.5 - center) * inv).abs()).max(0.0))
                .collect();
            let total: f64 = wts.iter().sum();
            if total > 0.0 {
                wts.iter_mut().for_each(|v| *v /= total);
            } else {
                wts.iter_mut().for_each(|v| *v = 0.0);
                wts[0] = 1.0;
            }
            // Trailing zero weights cost time only.
            while wts.len() > 1 && wts[wts.len() - 1] == 0.0 {
                wts.pop();
            }
            let first = wts.iter().position(|&v| v != 0.0).unwrap_or(0);
            (lo + first, wts[first..].iter().map(|&v| v as f32).collect())
        })
        .collect()
}

/// Largest side of the intermediate image of [`Crop::ResizeCenter`] (only the window is
/// computed; this bounds the arithmetic of the window's position).
pub const MAX_RESIZE_SIDE: usize = 1 << 24;

/// torchvision `Resize(size)` of an `h x w` image: `(height, width)` with the shorter side
/// `size` and the longer side `int(size * long / short)` (truncated, as torchvision),
/// capped at [`MAX_RESIZE_SIDE`].
pub fn resize_shorter_side(h: usize, w: usize, size: usize) -> (usize, usize) {
    let long = |l: usize, s: usize| {
        ((size as u128 * l as u128 / s.max(1) as u128) as usize).clamp(size, MAX_RESIZE_SIDE)
    };
    if h <= w {
        (size, long(w, h))
    } else {
        (long(h, w), size)
    }
}

/// Cuts `region = (top, left, height, width)` out of the `u8` CHW image `src` (`c x h x w`)
/// and resizes it to `oh x ow` with torchvision's antialiased bilinear filter
/// ([`resize_taps`]; rows first, then columns), writing values in [0, 1] to `out`
/// (`c x oh x ow`). A region of the output size is copied unchanged.
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
    assert_eq!(src.len(), c * h * w, "source is not c x h x w");
    let img = Image {
        channels: c,
        height: h,
        width: w,
        layout: Layout::Chw,
        pixels: std::borrow::Cow::Borrowed(src),
    };
    resample(&img, region, (oh, ow), (0, 0), (oh, ow), out);
}

/// The general crop-and-resize: `region = (top, left, height, width)` of `img` (any
/// layout) is resized to `full = (height, width)` with the antialiased bilinear filter of
/// [`resize_taps`], and the `view = (height, width)` window at `offset = (top, left)` of
/// that is written to `out` (`c x view.0 x view.1`, values in [0, 1]). Only the window is
/// computed. `full == view` with a zero offset is [`resized_crop`].
///
/// Panics if the region leaves the image, the window leaves `full`, or `out` is too short.
pub fn resample(
    img: &Image<'_>,
    region: (usize, usize, usize, usize),
    full: (usize, usize),
    offset: (usize, usize),
    view: (usize, usize),
    out: &mut [f32],
) {
    let (top, left, rh, rw) = region;
    let (c, h, w) = (img.channels, img.height, img.width);
    let (oh, ow) = view;
    assert!(
        top + rh <= h && left + rw <= w && rh > 0 && rw > 0,
        "crop region leaves the image"
    );
    assert!(
        offset.0 + oh <= full.0 && offset.1 + ow <= full.1,
        "window leaves the resized image"
    );
    let xs = resize_taps_range(rw, full.1, offset.1..offset.1 + ow);
    let ys = resize_taps_range(rh, full.0, offset.0..offset.0 + oh);
    // Columns of the region the horizontal taps read.
    let x_lo = xs.iter().map(|t| t.0).min().unwrap_or(0);
    let x_hi = xs.iter().map(|(x0, wx)| x0 + wx.len()).max().unwrap_or(0);
    let (cs, ystride, xstride) = img.strides();
    let src = &img.pixels[..];
    const INV: f32 = 1.0 / 255.0;
    // Rows are contiguous runs of `lanes` interleaved channels: one plane of `c` lanes
    // (HWC) or `c` planes of one lane (CHW).
    let (planes, lanes) = match img.layout {
        Layout::Hwc => (1, c),
        Layout::Chw => (c, 1),
    };
    let run = (x_hi - x_lo) * lanes;
    // Vertical pass first, over contiguous source rows (it vectorizes, and a downscale
    // does most of its work here), into one row of the region's columns; then the
    // horizontal pass of that row into each channel's output row.
    let mut tmp = vec![0.0f32; run];
    for p in 0..planes {
        for (y, (y0, wy)) in ys.iter().enumerate() {
            tmp.iter_mut().for_each(|v| *v = 0.0);
            for (k, &wk) in wy.iter().enumerate() {
                let start = p * cs + (top + y0 + k) * ystride + (left + x_lo) * xstride;
                let wk = wk * INV;
                for (t, &v) in tmp.iter_mut().zip(&src[start..start + run]) {
                    *t += wk * v as f32;
                }
            }
            if lanes == 3 {
                // Interleaved RGB: the three channels of a tap together.
                let (o0, rest) = out[y * ow..].split_at_mut(oh * ow);
                let (o1, o2) = rest.split_at_mut(oh * ow);
                for (x, (x0, wx)) in xs.iter().enumerate() {
                    let (mut a0, mut a1, mut a2) = (0.0f32, 0.0f32, 0.0f32);
                    let px = &tmp[(x0 - x_lo) * 3..(x0 - x_lo + wx.len()) * 3];
                    for (&wk, v) in wx.iter().zip(px.chunks_exact(3)) {
                        a0 += wk * v[0];
                        a1 += wk * v[1];
                        a2 += wk * v[2];
                    }
                    o0[x] = a0;
                    o1[x] = a1;
                    o2[x] = a2;
                }
                continue;
            }
            for l in 0..lanes {
                let ch = p + l;
                let orow = &mut out[(ch * oh + y) * ow..(ch * oh + y + 1) * ow];
                for (o, (x0, wx)) in orow.iter_mut().zip(&xs) {
                    let mut acc = 0.0f32;
                    let mut q = (x0 - x_lo) * lanes + l;
                    for &wk in wx {
                        acc += wk * tmp[q];
                        q += lanes;
                    }
                    *o = acc;
                }
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

/// The ITU-R 601-2 luma of RGB pixel `i` of the plane, with torchvision's tensor
/// coefficients `0.2989 R + 0.587 G + 0.114 B` (PIL uses 0.299 in integer arithmetic).
#[inline]
fn luma(img: &[f32], plane: usize, i: usize) -> f32 {
    0.2989 * img[i] + 0.587 * img[plane + i] + 0.114 * img[2 * plane + i]
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
    let (rp, rest) = img[..3 * plane].split_at_mut(plane);
    let (gp, bp) = rest.split_at_mut(plane);
    for ((r, g), b) in rp.iter_mut().zip(gp.iter_mut()).zip(bp.iter_mut()) {
        let l = (1.0 - f) * (0.2989 * *r + 0.587 * *g + 0.114 * *b);
        *r = (f * *r + l).clamp(0.0, 1.0);
        *g = (f * *g + l).clamp(0.0, 1.0);
        *b = (f * *b + l).clamp(0.0, 1.0);
    }
}

/// Hue: rotate the hue by `shift` turns (`[-0.5, 0.5]`) through HSV, as torchvision's
/// tensor `adjust_hue` (RGB only).
pub fn adjust_hue(img: &mut [f32], c: usize, h: usize, w: usize, shift: f32) {
    if c != 3 {
        return;
    }
    let plane = h * w;
    let (rp, rest) = img[..3 * plane].split_at_mut(plane);
    let (gp, bp) = rest.split_at_mut(plane);
    // Written with selects rather than branches, so that the loop vectorizes.
    #[inline(always)]
    fn sel(c: bool, a: f32, b: f32) -> f32 {
        if c {
            a
        } else {
            b
        }
    }
    for ((r, g), b) in rp.iter_mut().zip(gp.iter_mut()).zip(bp.iter_mut()) {
        let (rv, gv, bv) = (*r, *g, *b);
        let maxc = rv.max(gv).max(bv);
        let minc = rv.min(gv).min(bv);
        let eq = maxc == minc;
        let cr = maxc - minc;
        let s = cr / sel(eq, 1.0, maxc);
        let div = sel(eq, 1.0, cr);
        let (rc, gc, bc) = ((maxc - rv) / div, (maxc - gv) / div, (maxc - bv) / div);
        let hh = sel(
            maxc == rv,
            bc - gc,
            sel(maxc == gv, 2.0 + rc - bc, 4.0 + gc - rc),
        );
        // `((hh / 6 + 1) % 1 + shift) mod 1` without fmod: `hh / 6 + 1` is in [5/6, 11/6]
        // and the shifted hue in [-0.5, 1.5), so one exact subtraction or addition each
        // gives the same value as Python's `%`.
        let hue = hh / 6.0 + 1.0;
        let hue = sel(hue >= 1.0, hue - 1.0, hue) + shift;
        let hue = sel(hue < 0.0, hue + 1.0, sel(hue >= 1.0, hue - 1.0, hue));
        let h6 = hue * 6.0;
        // h6 is in [0, 6]: its floor by float arithmetic alone (adding and taking away
        // 2^23 rounds to an integer; step back one where that rounded up), which keeps
        // the loop vectorized; 6 (a hue rounded up to 1) is sector 0.
        const BIG: f32 = 8_388_608.0;
        let near = (h6 + BIG) - BIG;
        let fi = sel(near > h6, near - 1.0, near);
        let f = h6 - fi;
        let sector = sel(fi >= 6.0, fi - 6.0, fi);
        let v = maxc;
        let p = (v * (1.0 - s)).clamp(0.0, 1.0);
        let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
        let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
        // Sectors 0..=5: (v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q).
        *r = sel(
            (sector == 0.0) | (sector == 5.0),
            v,
            sel(sector == 1.0, q, sel(sector == 4.0, t, p)),
        );
        *g = sel(
            (sector == 1.0) | (sector == 2.0),
            v,
            sel(sector == 0.0, t, sel(sector == 3.0, q, p)),
        );
        *b = sel(
            (sector == 3.0) | (sector == 4.0),
            v,
            sel(sector == 2.0, t, sel(sector == 5.0, q, p)),
        );
    }
}

/// torchvision `ColorJitter` with ranges `[brightness, contrast, saturation, hue]`: the
/// order and the factors drawn first ([`JitterParams::sample`]), then the adjustments
/// applied in that order. A range of 0 disables its adjustment.
pub fn color_jitter<R: Rng + ?Sized>(
    img: &mut [f32],
    c: usize,
    h: usize,
    w: usize,
    ranges: [f32; 4],
    rng: &mut R,
) {
    JitterParams::sample(ranges, rng).apply(img, c, h, w);
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
    // Taps below 2^-26 (symmetric, at both ends) change no sum of values in [0, 1] by
    // more than a quarter of f32's rounding step at 1: drop them (a sigma of 0.1 leaves 1
    // tap of 23, 1.0 leaves 11, 2.0 all 23).
    let mut half = half;
    while half > 0 && kern[0] < 1.0 / (1u32 << 26) as f32 {
        kern.pop();
        kern.remove(0);
        half -= 1;
    }
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

/// `(x - mean[c]) / std[c]` per channel (a subtraction, then a division, as torchvision's
/// `normalize`).
pub fn normalize(img: &mut [f32], c: usize, h: usize, w: usize, mean: &[f32], std: &[f32]) {
    for ch in 0..c {
        let (m, sd) = (mean[ch], std[ch]);
        for v in &mut img[ch * h * w..(ch + 1) * h * w] {
            *v = (*v - m) / sd;
        }
    }
}
