//! The built-in synthetic data set: ten classes of procedurally drawn shapes.
//!
//! Every image is an RGB square (32x32 by default) holding one shape on a background:
//!
//! | label | class              | label | class                   |
//! |-------|--------------------|-------|-------------------------|
//! | 0     | horizontal stripes | 5     | filled disc             |
//! | 1     | vertical stripes   | 6     | plus (+)                |
//! | 2     | diagonal stripes   | 7     | filled triangle         |
//! | 3     | checkerboard       | 8     | square outline          |
//! | 4     | ring               | 9     | diagonal cross (x)      |
//!
//! Nuisances, drawn per image: shape centre (0.3 - 0.7 of the side), half-extent
//! (0.22 - 0.42 of the side), rotation (+-15 degrees, so orientation classes stay apart),
//! stripe frequency and phase, foreground and background colours (one of four palette pairs,
//! slightly perturbed, with a luma gap so the shape also shows after grayscale), a linear
//! background gradient (random direction, amplitude up to 0.15) and Gaussian pixel noise
//! (sigma 0.01 - 0.06). Edges are anti-aliased by 2x2 supersampling.
//!
//! Colour is random and independent of the class, so the classes differ by shape alone:
//! nearest neighbours on raw pixels do poorly, an encoder that learns shape does well.
//!
//! Image `i` of a split is drawn from its own ChaCha8 stream seeded from
//! `(seed, split, i)`, so generation runs in parallel and the result depends only on the
//! seed. Labels cycle through the classes (`i % 10`), so every class is equally frequent.
//!
//! ```
//! use moco::data::synthetic::SyntheticConfig;
//! let cfg = SyntheticConfig { train_len: 100, test_len: 20, ..Default::default() };
//! let train = cfg.generate(true).unwrap();
//! assert_eq!(train.len(), 100);
//! assert_eq!(train.images, cfg.generate(true).unwrap().images); // deterministic
//! ```
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use super::Dataset;
use crate::{Error, Result};

/// Number of classes of the synthetic set.
pub const NUM_CLASSES: usize = 10;

/// Class names, index = label.
pub const CLASS_NAMES: [&str; NUM_CLASSES] = [
    "hstripes", "vstripes", "dstripes", "checker", "ring", "disc", "plus", "triangle", "square",
    "cross",
];

/// Sizes and seed of the synthetic set.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticConfig {
    /// Side of the square images (>= 8).
    pub size: usize,
    /// Images in the training split.
    pub train_len: usize,
    /// Images in the test split.
    pub test_len: usize,
    /// Seed: the same seed gives the same images.
    pub seed: u64,
}

impl Default for SyntheticConfig {
    /// 32x32, 5000 train / 1000 test, seed 0.
    fn default() -> Self {
        SyntheticConfig {
            size: 32,
            train_len: 5000,
            test_len: 1000,
            seed: 0,
        }
    }
}

impl SyntheticConfig {
    /// Draws the training (`train = true`) or test split.
    pub fn generate(&self, train: bool) -> Result<Dataset> {
        if self.size < 8 || self.size > 1024 {
            return Err(Error::invalid(format!(
                "synthetic image size must be in 8..=1024, not {}",
                self.size
            )));
        }
        let n = if train { self.train_len } else { self.test_len };
        let s = self.size;
        let per = 3 * s * s;
        let split = if train {
            0x7472_6169_6e00u64
        } else {
            0x7465_7374u64
        };
        let mut images = vec![0u8; n * per];
        images.par_chunks_mut(per).enumerate().for_each(|(i, out)| {
            let mut rng = ChaCha8Rng::seed_from_u64(mix(self.seed, split, i as u64));
            draw(out, s, i % NUM_CLASSES, &mut rng);
        });
        let labels = (0..n).map(|i| (i % NUM_CLASSES) as u32).collect();
        let name = format!("synthetic {}", if train { "train" } else { "test" });
        let mut ds = Dataset::new(name, 3, s, s, images, labels, NUM_CLASSES)?;
        ds.class_names = CLASS_NAMES.iter().map(|c| c.to_string()).collect();
        Ok(ds)
    }
}

/// SplitMix64-style mixing of three words into one seed.
pub(crate) fn mix(a: u64, b: u64, c: u64) -> u64 {
    fn sm(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    sm(sm(sm(a) ^ b) ^ c)
}

fn luma(c: [f32; 3]) -> f32 {
    0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
}

/// (background, foreground) colour pairs of the synthetic images.
const PALETTE: [([f32; 3], [f32; 3]); 4] = [
    ([0.1, 0.1, 0.1], [0.9, 0.9, 0.9]),
    ([0.9, 0.9, 0.85], [0.15, 0.15, 0.2]),
    ([0.1, 0.15, 0.45], [0.95, 0.85, 0.3]),
    ([0.45, 0.1, 0.1], [0.5, 0.95, 0.9]),
];

/// Draws one image of class `class` into `out` (CHW, 3 x s x s).
fn draw(out: &mut [u8], s: usize, class: usize, rng: &mut ChaCha8Rng) {
    let sf = s as f32;
    // Colours from a small palette of (background, foreground) pairs, slightly perturbed.
    // Few palettes on purpose: if every image had its own colours, two views of an image
    // could be matched by colour alone and a contrastive encoder would learn colour (which
    // says nothing about the class) instead of shape. Every pair keeps a luma gap >= 0.3
    // so the shape survives grayscale.
    let (mut bg, mut fg) = PALETTE[rng.random_range(0..PALETTE.len())];
    for c in 0..3 {
        bg[c] = (bg[c] + rng.random_range(-0.05f32..0.05)).clamp(0.0, 1.0);
        fg[c] = (fg[c] + rng.random_range(-0.05f32..0.05)).clamp(0.0, 1.0);
    }
    debug_assert!((luma(fg) - luma(bg)).abs() >= 0.3);
    let grad_angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let grad_amp: f32 = rng.random_range(0.0..0.15);
    let (gx, gy) = (grad_angle.cos() * grad_amp, grad_angle.sin() * grad_amp);
    let cx = rng.random_range(0.3..0.7) * sf;
    let cy = rng.random_range(0.3..0.7) * sf;
    let half = rng.random_range(0.22..0.42) * sf;
    let theta: f32 = rng.random_range(-15.0f32..15.0).to_radians();
    let freq: f32 = rng.random_range(1.2..1.8); // stripe periods per unit of half-extent
    let phase: f32 = rng.random();
    let noise: f32 = rng.random_range(0.01..0.06);
    let (sin, cos) = theta.sin_cos();
    let plane = s * s;
    for y in 0..s {
        for x in 0..s {
            let mut cover = 0.0f32;
            for (ox, oy) in [(0.25f32, 0.25f32), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
                let dx = (x as f32 + ox - cx) / half;
                let dy = (y as f32 + oy - cy) / half;
                // Rotate into the shape's frame.
                let u = cos * dx + sin * dy;
                let v = -sin * dx + cos * dy;
                if inside(class, u, v, freq, phase) {
                    cover += 0.25;
                }
            }
            let g = gx * (x as f32 / sf - 0.5) + gy * (y as f32 / sf - 0.5);
            for c in 0..3 {
                let n: f32 = StandardNormal.sample(rng);
                let val = bg[c] * (1.0 - cover) + fg[c] * cover + g + noise * n;
                out[c * plane + y * s + x] = (val.clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
    }
}

/// Whether the point `(u, v)` of the shape's unit frame (shape within |u|, |v| <= 1) is
/// foreground for `class`.
fn inside(class: usize, u: f32, v: f32, freq: f32, phase: f32) -> bool {
    let in_square = u.abs() <= 1.0 && v.abs() <= 1.0;
    let r = (u * u + v * v).sqrt();
    let stripe = |t: f32| (t * freq + phase).rem_euclid(1.0) < 0.5;
    match class {
        0 => in_square && stripe(v),
        1 => in_square && stripe(u),
        2 => in_square && stripe((u + v) * std::f32::consts::FRAC_1_SQRT_2),
        3 => in_square && ((u * 2.0).floor() as i32 + (v * 2.0).floor() as i32).rem_euclid(2) == 0,
        4 => (0.6..=1.0).contains(&r),
        5 => r <= 1.0,
        6 => in_square && (u.abs() <= 0.25 || v.abs() <= 0.25),
        7 => {
            // Vertices (0, -1), (-1, 0.8), (1, 0.8).
            (-1.0..=0.8).contains(&v) && u.abs() <= (v + 1.0) / 1.8
        }
        8 => in_square && u.abs().max(v.abs()) >= 0.65,
        _ => {
            in_square
                && ((u - v).abs() * std::f32::consts::FRAC_1_SQRT_2 <= 0.2
                    || (u + v).abs() * std::f32::consts::FRAC_1_SQRT_2 <= 0.2)
        }
    }
}
