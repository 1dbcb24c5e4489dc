//! Seeded random numbers for library code (initial queue keys, shuffle-BN permutations).
//!
//! ChaCha8 streams give the same numbers on every platform, so a seed fixes a run. The test
//! helpers in [`crate::testing`] draw from these same functions.
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A ChaCha8 generator seeded with `seed`.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` uniform values in [-1, 1) from `seed`.
pub fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut r = rng(seed);
    (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

/// `n` standard-normal f32 values from `seed`.
pub fn normal(n: usize, seed: u64) -> Vec<f32> {
    use rand_distr::{Distribution, StandardNormal};
    let mut r = rng(seed);
    (0..n).map(|_| StandardNormal.sample(&mut r)).collect()
}

/// The shuffle-BN permutation the trainer uses for the key batch of global step `step`:
/// `perm[dst] = src`, so row `dst` of the shuffled batch is image `perm[dst]`. `salt`
/// tells the key batches of one step apart (0 for the plain loss; 1 and 2 for the keys of
/// the first and second view with the symmetric loss).
///
/// ```
/// let p = moco::rng::shuffle_permutation(0, 7, 0, 8);
/// let mut s = p.clone();
/// s.sort();
/// assert_eq!(s, (0..8).collect::<Vec<_>>());
/// assert_eq!(p, moco::rng::shuffle_permutation(0, 7, 0, 8));
/// ```
pub fn shuffle_permutation(seed: u64, step: u64, salt: u64, n: usize) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    let mut r = rng(seed ^ 0x5348_5546 ^ (step << 1) ^ salt);
    perm.shuffle(&mut r);
    perm
}

/// Checks that `perm` is a permutation of `0..n`.
pub fn check_permutation(perm: &[usize], n: usize) -> crate::Result<()> {
    if perm.len() != n {
        return Err(crate::Error::invalid(format!(
            "permutation has {} entries for a batch of {n}",
            perm.len()
        )));
    }
    let mut seen = vec![false; n];
    for &p in perm {
        if p >= n || std::mem::replace(&mut seen[p], true) {
            return Err(crate::Error::invalid(format!(
                "not a permutation of 0..{n}: {p} is out of range or repeated"
            )));
        }
    }
    Ok(())
}
