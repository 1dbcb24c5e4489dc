//! Helpers shared by tests and benches: seeded data, poisoning, error norms.

pub use crate::rng::{normal, rng, uniform};

/// A value no correct kernel writes: outputs are filled with it before a launch so an
/// element the kernel forgot fails the comparison.
pub const POISON: f32 = f32::NAN;

/// Relative error `||out - ref|| / ||ref||` (2-norm, f64) and max-abs difference.
/// NaN anywhere yields `(inf, inf)`, so NaN never passes.
pub fn rel_err(out: &[f32], reference: &[f32]) -> (f64, f64) {
    assert_eq!(out.len(), reference.len(), "rel_err: length mismatch");
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    let mut max_abs = 0.0f64;
    for (&o, &r) in out.iter().zip(reference) {
        if !o.is_finite() || !r.is_finite() {
            return (f64::INFINITY, f64::INFINITY);
        }
        let d = o as f64 - r as f64;
        num += d * d;
        den += (r as f64) * (r as f64);
        max_abs = max_abs.max(d.abs());
    }
    let rel = if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    };
    (rel, max_abs)
}

/// Panics with a readable message unless `out` matches `reference` within `rel_tol`
/// (relative 2-norm) and `abs_tol` (max-abs).
#[track_caller]
pub fn assert_close(what: &str, out: &[f32], reference: &[f32], rel_tol: f64, abs_tol: f64) {
    let (rel, max_abs) = rel_err(out, reference);
    assert!(
        rel <= rel_tol && max_abs <= abs_tol,
        "{what}: rel err {rel:.3e} (tol {rel_tol:.1e}), max abs {max_abs:.3e} (tol {abs_tol:.1e}), n = {}",
        out.len()
    );
}

/// The GPU for `#[ignore = "needs a CUDA GPU"]` tests. Panics with the reason when there is
/// no usable GPU: a GPU test that cannot reach the GPU fails rather than passing silently.
#[track_caller]
pub fn test_gpu() -> crate::cuda::Gpu {
    match crate::cuda::Gpu::new(0) {
        Ok(g) => g,
        Err(e) => panic!("this test needs a CUDA GPU: {e}"),
    }
}

/// Like [`assert_close`], for references that may be zero up to rounding: the max-abs bound
/// always applies, the relative bound only when the reference's 2-norm exceeds
/// `abs_tol * sqrt(n)` (the relative error of a vector that is analytically zero, such as
/// the input gradient of a BatchNorm group of two samples, measures nothing but rounding).
#[track_caller]
pub fn assert_close_or_zero(
    what: &str,
    out: &[f32],
    reference: &[f32],
    rel_tol: f64,
    abs_tol: f64,
) {
    let (rel, max_abs) = rel_err(out, reference);
    let norm = reference
        .iter()
        .map(|&v| (v as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let tiny = norm <= abs_tol * (reference.len().max(1) as f64).sqrt();
    assert!(
        max_abs <= abs_tol && (tiny || rel <= rel_tol),
        "{what}: rel err {rel:.3e} (tol {rel_tol:.1e}), max abs {max_abs:.3e} (tol {abs_tol:.1e}), ref norm {norm:.3e}, n = {}",
        out.len()
    );
}

/// Relative 2-norm tolerance for whole-network GPU-vs-CPU comparisons of tensors downstream
/// of a ReLU mask (gradients, SGD momentum, parameter updates). A pre-activation within
/// rounding of zero can fall on the other side of a ReLU on the other device; one flipped
/// mask element moves the upstream gradients by about 1/sqrt(activations) relative (1.8e-3
/// measured between f32 and f64 on the CPU for resnet18-cifar, tests/resnet_model.rs, and up
/// to 8e-3 on an H200 for resnet50, tests/resnet_cuda.rs). A wiring bug gives O(1) errors.
pub const FLIP_REL_TOL: f64 = 1e-2;

/// Per-element tolerance of a flip-aware comparison, as a fraction of the reference
/// tensor's largest magnitude: a flip moves single elements by a sizable fraction while the
/// 2-norm stays within [`FLIP_REL_TOL`] (5.2% of the largest gradient measured on an H200).
pub const FLIP_ELEM_FRACTION: f64 = 1e-1;

/// The max-abs bound of [`assert_close_flip_aware`] for `reference`:
/// [`FLIP_ELEM_FRACTION`] of its largest magnitude, at least 1e-4.
pub fn flip_aware_abs_tol(reference: &[f32]) -> f64 {
    let scale = reference.iter().fold(0.0f32, |a, &b| a.max(b.abs())) as f64;
    (FLIP_ELEM_FRACTION * scale).max(1e-4)
}

/// [`assert_close`] with the flip-aware tolerances ([`FLIP_REL_TOL`] relative 2-norm,
/// [`flip_aware_abs_tol`] per element): for one tensor (one parameter's gradient, update or
/// momentum) of a whole network run on two devices.
#[track_caller]
pub fn assert_close_flip_aware(what: &str, out: &[f32], reference: &[f32]) {
    assert_close(
        what,
        out,
        reference,
        FLIP_REL_TOL,
        flip_aware_abs_tol(reference),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> Vec<f32> {
        (0..400)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect()
    }

    #[test]
    fn flip_aware_accepts_one_flipped_element() {
        let r = reference();
        let mut o = r.clone();
        o[17] += 0.05; // 5% of the largest magnitude (1.0): one ReLU flip
        assert_close_flip_aware("one flip", &o, &r);
    }

    #[test]
    #[should_panic(expected = "rel err")]
    fn flip_aware_rejects_a_scaled_tensor() {
        let r = reference();
        let o: Vec<f32> = r.iter().map(|v| v * 1.05).collect(); // a wrong factor somewhere
        assert_close_flip_aware("scaled", &o, &r);
    }

    #[test]
    #[should_panic(expected = "max abs")]
    fn flip_aware_rejects_one_wild_element() {
        let r = reference();
        let norm = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        assert!(
            0.11 / norm < FLIP_REL_TOL,
            "the 2-norm bound alone would pass"
        );
        let mut o = r.clone();
        // 11% of the largest magnitude: within the 2-norm bound (rel 1e-2 of a 2-norm of
        // about 11.5), not within the per-element one.
        o[3] += 0.11;
        assert_close_flip_aware("wild", &o, &r);
    }
}
