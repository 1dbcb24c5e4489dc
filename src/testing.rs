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

/// TF32's unit roundoff: 10 stored mantissa bits, so round-to-nearest moves a value by at
/// most 2^-11 of itself.
pub const TF32_UNIT_ROUNDOFF: f64 = 1.0 / 2048.0;

/// f32's unit roundoff (2^-24): the tensor cores accumulate TF32 products in f32.
pub const F32_UNIT_ROUNDOFF: f64 = 1.0 / 16_777_216.0;

/// `x` rounded to TF32 (10 mantissa bits), to nearest, ties to even: what a kernel that
/// converts its f32 inputs (`cvt.rna.tf32.f32`, cuBLAS, cuDNN) feeds the tensor cores.
/// Non-finite values pass through.
pub fn round_to_tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    let b = x.to_bits();
    let b = (b + 0xfff + ((b >> 13) & 1)) & !0x1fff;
    f32::from_bits(b)
}

/// `x` truncated to TF32 (the 13 low mantissa bits dropped): what a kernel that hands raw
/// f32 bits to the tensor cores computes with. Up to 2^-10 relative, always toward zero.
pub fn truncate_to_tf32(x: f32) -> f32 {
    f32::from_bits(x.to_bits() & !0x1fff)
}

/// Relative 2-norm bound, `||y_tf32 - y|| / ||y||`, for `outputs` dot products of length
/// `reduction_len` (a convolution: `cin k k` terms per output) over zero-mean random inputs,
/// each input rounded to TF32 to nearest, products accumulated in f32.
///
/// Derivation. Rounding an input moves it by a relative `d` with `|d| <= u = 2^-11`
/// ([`TF32_UNIT_ROUNDOFF`]); modelled as uniform on `[-u, u]`, `E[d^2] <= u^2 / 3` (values
/// with log-distributed mantissas give 0.18 u^2, less). A product `p = x w` becomes
/// `p (1 + dx + dw)`, so an output's error is `e = sum_j p_j (dx_j + dw_j)` with
/// `E[e^2] = 2 E[d^2] sum_j p_j^2`, and for zero-mean independent products
/// `E[y^2] = sum_j p_j^2`: the expected relative error is `sqrt(2/3) u`, independent of the
/// reduction length (errors and signal both grow as `sqrt(reduction_len)`). The measured
/// 2-norm is a ratio of sums over `outputs` terms: its relative spread is about
/// `1/sqrt(outputs)`, and three of those are allowed, `(1 + 3/sqrt(outputs))`. The f32
/// accumulation adds `2^-24` per addition to a partial sum of the size of `y`, random in
/// sign: `sqrt(reduction_len) 2^-24`.
///
/// A kernel that truncates instead of rounding moves each input by `(-2u, 0]`, a mean of
/// about `-0.72 u` per input: about `1.6 u` (7.8e-4) relative, above this bound once
/// `outputs` exceeds about 100 (`tests/resnet_layers.rs` checks both on the CPU).
pub fn tf32_rel_bound(reduction_len: usize, outputs: usize) -> f64 {
    let spread = 1.0 + 3.0 / (outputs.max(1) as f64).sqrt();
    (2.0f64 / 3.0).sqrt() * TF32_UNIT_ROUNDOFF * spread
        + (reduction_len.max(1) as f64).sqrt() * F32_UNIT_ROUNDOFF
}

/// Per-element bound factor `g`: `|y_tf32 - y| <= g * sum_j |x_j w_j|` for any inputs, a
/// dot product of length `reduction_len` over TF32-rounded inputs accumulated in f32. The
/// worst case, no statistics: each product is off by at most `(1 + u)^2 - 1 = 2u + u^2`,
/// and `reduction_len` f32 additions by at most `reduction_len 2^-24` (the linear
/// `gamma_n` of Higham, first order) of the sum of magnitudes.
pub fn tf32_elem_bound(reduction_len: usize) -> f64 {
    let u = TF32_UNIT_ROUNDOFF;
    2.0 * u + u * u + reduction_len as f64 * F32_UNIT_ROUNDOFF
}

/// The bound on every NCCL test: a collective that never completes (a rank that did not
/// join, the lazy-loading deadlock) fails the test instead of hanging the GPU run.
pub const NCCL_TEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs `f` on its own thread and returns its value; re-raises its panic; panics with
/// "`what`: timed out" when it has not finished within `timeout` (the thread is left
/// running: a hung NCCL call cannot be cancelled, and the test fails either way).
#[track_caller]
pub fn run_with_timeout<T: Send + 'static>(
    what: &str,
    timeout: std::time::Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::Builder::new()
        .name(what.to_string())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(r);
        })
        .expect("spawn a test thread");
    match rx.recv_timeout(timeout) {
        Ok(r) => {
            let _ = h.join();
            match r {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        Err(_) => panic!(
            "{what}: timed out after {:.1} s (thread left running)",
            timeout.as_secs_f64()
        ),
    }
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
    fn tf32_rounding_keeps_ten_mantissa_bits() {
        let one_ulp = 1.0 / 1024.0; // TF32's spacing at 1.0
        for (x, r, t) in [
            (1.0f32, 1.0f32, 1.0f32),
            (1.0 + one_ulp * 0.25, 1.0, 1.0),
            (1.0 + one_ulp * 0.75, 1.0 + one_ulp, 1.0),
            (1.0 + one_ulp * 0.5, 1.0, 1.0), // a tie: to even (mantissa ...0)
            (1.0 + one_ulp * 1.5, 1.0 + 2.0 * one_ulp, 1.0 + one_ulp), // a tie: to even
            (-(1.0 + one_ulp * 0.75), -(1.0 + one_ulp), -1.0),
        ] {
            assert_eq!(round_to_tf32(x), r, "round {x}");
            assert_eq!(truncate_to_tf32(x), t, "truncate {x}");
        }
        assert!(round_to_tf32(f32::NAN).is_nan());
        assert_eq!(round_to_tf32(f32::INFINITY), f32::INFINITY);
        // Relative error: at most 2^-11 rounded, under 2^-10 truncated.
        for x in normal(10_000, 3) {
            let rel = |y: f32| ((y - x) as f64 / x as f64).abs();
            assert!(rel(round_to_tf32(x)) <= TF32_UNIT_ROUNDOFF, "{x}");
            assert!(rel(truncate_to_tf32(x)) < 2.0 * TF32_UNIT_ROUNDOFF, "{x}");
            assert_eq!(round_to_tf32(x).to_bits() & 0x1fff, 0);
        }
    }

    #[test]
    fn tf32_bounds_sit_between_rounding_and_truncation() {
        // Many outputs: the bound is close to sqrt(2/3) u (4.0e-4), below truncation's 1.6 u.
        let b = tf32_rel_bound(576, 100_000);
        assert!(
            b > 0.8 * TF32_UNIT_ROUNDOFF && b < 0.9 * TF32_UNIT_ROUNDOFF,
            "{b:e}"
        );
        assert!(b < 1.4 * TF32_UNIT_ROUNDOFF);
        // Few outputs: a wider spread is allowed; longer reductions add f32 accumulation.
        assert!(tf32_rel_bound(9, 25) > tf32_rel_bound(9, 10_000));
        assert!(tf32_rel_bound(10_000, 100) > tf32_rel_bound(9, 100));
        assert!(tf32_elem_bound(9) > 2.0 * TF32_UNIT_ROUNDOFF);
        assert!(tf32_elem_bound(9) < 2.1 * TF32_UNIT_ROUNDOFF);
    }

    #[test]
    fn run_with_timeout_returns_and_reraises() {
        let t = std::time::Duration::from_secs(10);
        assert_eq!(run_with_timeout("quick", t, || 6 * 7), 42);
        let p = std::panic::catch_unwind(|| run_with_timeout("fails", t, || panic!("boom 17")));
        let msg = p.unwrap_err();
        let msg = msg
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| msg.downcast_ref::<String>().cloned())
            .unwrap();
        assert!(msg.contains("boom 17"), "{msg}");
    }

    #[test]
    #[should_panic(expected = "hangs: timed out after 0.1 s")]
    fn run_with_timeout_bounds_a_hang() {
        let start = std::time::Instant::now();
        let r = std::panic::catch_unwind(|| {
            run_with_timeout("hangs", std::time::Duration::from_millis(100), || {
                std::thread::sleep(std::time::Duration::from_secs(30))
            })
        });
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "did not return early"
        );
        std::panic::resume_unwind(r.unwrap_err());
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
