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
