//! The kNN monitor on tiny hand-checkable banks, against a brute-force reference.
use moco::eval::knn::{knn_predict, knn_top1, l2_normalize_rows, KNN_K, KNN_T};

#[test]
fn constants_match_the_moco_cifar_demo() {
    assert_eq!(KNN_K, 200);
    assert_eq!(KNN_T, 0.1);
}

/// Three bank points of class 0 at 60 degrees from the query and one of class 1 at
/// 0 degrees: with k = 4 and t = 0.1 the one close neighbour's weight exp(10) beats
/// 3 exp(5), so the weighting (not a majority vote) decides.
#[test]
fn weighting_beats_majority() {
    let (c60, s60) = (0.5f32, 0.75f32.sqrt());
    let bank = [c60, s60, c60, -s60, c60, s60, 1.0, 0.0];
    let labels = [0, 0, 0, 1];
    let q = [1.0, 0.0];
    assert_eq!(
        knn_predict(&bank, &labels, &q, 2, 4, 0.1, 2).unwrap(),
        vec![1]
    );
    // With a large temperature the weights flatten (3 e^0.5 > e^1) and the majority wins.
    assert_eq!(
        knn_predict(&bank, &labels, &q, 2, 4, 10.0, 2).unwrap(),
        vec![0]
    );
    // k = 1: the nearest alone.
    assert_eq!(
        knn_predict(&bank, &labels, &q, 2, 1, 10.0, 2).unwrap(),
        vec![1]
    );
}

#[test]
fn features_are_normalized_internally_and_k_is_clamped() {
    let bank = [3.0, 0.0, 0.0, 0.5, 0.0, 7.0];
    let labels = [2, 0, 0];
    let q = [10.0, 1.0, 0.1, 4.0];
    let a = knn_predict(&bank, &labels, &q, 2, 1, 0.1, 3).unwrap();
    let nb = l2_normalize_rows(&bank, 2);
    let nq = l2_normalize_rows(&q, 2);
    assert!((nb[0] - 1.0).abs() < 1e-7 && (nb[3] - 1.0).abs() < 1e-7);
    assert_eq!(a, knn_predict(&nb, &labels, &nq, 2, 1, 0.1, 3).unwrap());
    assert_eq!(a, vec![2, 0]);
    // k > M is clamped to M: every query then sees the whole bank (2 x class 0 wins at t = 10).
    assert_eq!(
        knn_predict(&bank, &labels, &q, 2, 200, 10.0, 3).unwrap(),
        vec![0, 0]
    );
}

#[test]
fn ties_break_towards_lower_index_and_lower_class() {
    // Two identical bank rows with different labels; k = 1 takes the lower index.
    let bank = [1.0, 0.0, 1.0, 0.0];
    assert_eq!(
        knn_predict(&bank, &[1, 0], &[1.0, 0.0], 2, 1, 0.1, 2).unwrap(),
        vec![1]
    );
    assert_eq!(
        knn_predict(&bank, &[0, 1], &[1.0, 0.0], 2, 1, 0.1, 2).unwrap(),
        vec![0]
    );
    // k = 2: equal class scores, the lower class wins.
    assert_eq!(
        knn_predict(&bank, &[1, 0], &[1.0, 0.0], 2, 2, 0.1, 2).unwrap(),
        vec![0]
    );
    // A zero query has similarity 0 to all: the lowest indices are its neighbours.
    assert_eq!(
        knn_predict(
            &[1.0, 0.0, 0.0, 1.0, -1.0, 0.0],
            &[2, 1, 0],
            &[0.0, 0.0],
            2,
            2,
            0.1,
            3
        )
        .unwrap(),
        vec![1]
    );
}

/// Plain reference: full sort of (similarity desc, index asc), f64 weights.
fn reference(
    bank: &[f32],
    labels: &[u32],
    q: &[f32],
    d: usize,
    k: usize,
    t: f32,
    nc: usize,
) -> Vec<u32> {
    let b = l2_normalize_rows(bank, d);
    let qs = l2_normalize_rows(q, d);
    qs.chunks(d)
        .map(|q| {
            let mut sims: Vec<(f64, usize)> = b
                .chunks(d)
                .enumerate()
                .map(|(i, r)| (r.iter().zip(q).map(|(a, b)| (a * b) as f64).sum(), i))
                .collect();
            sims.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
            let mut score = vec![0.0f64; nc];
            for &(s, i) in sims.iter().take(k) {
                score[labels[i] as usize] += (s / t as f64).exp();
            }
            let mut best = 0;
            for c in 0..nc {
                if score[c] > score[best] {
                    best = c;
                }
            }
            best as u32
        })
        .collect()
}

#[test]
fn matches_reference_and_is_thread_count_independent() {
    let (m, q, d, nc) = (300, 61, 17, 7); // 61: a partial last query block
    let bank = moco::testing::normal(m * d, 1);
    let queries = moco::testing::normal(q * d, 2);
    let labels: Vec<u32> = (0..m as u32).map(|i| (i * 31 + 5) % nc as u32).collect();
    for k in [1, 5, 200, 1000] {
        let got = knn_predict(&bank, &labels, &queries, d, k, 0.1, nc).unwrap();
        let want = reference(&bank, &labels, &queries, d, k.min(m), 0.1, nc);
        // f32 vs f64 dot products may swap near-ties: allow at most one disagreement.
        let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert!(
            diff <= 1,
            "k = {k}: {diff} predictions differ from the reference"
        );
        let pool1 = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let pool3 = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let a = pool1.install(|| knn_predict(&bank, &labels, &queries, d, k, 0.1, nc).unwrap());
        let b = pool3.install(|| knn_predict(&bank, &labels, &queries, d, k, 0.1, nc).unwrap());
        assert_eq!(a, got);
        assert_eq!(b, got);
    }
}

#[test]
fn top1_counts_hits() {
    // Clusters around the axes of R^3: queries near axis c have label c.
    let bank = [
        1.0, 0.1, 0.0, 0.9, 0.0, 0.1, 0.0, 1.0, 0.1, 0.1, 0.9, 0.0, 0.0, 0.0, 1.0,
    ];
    let bl = [0, 0, 1, 1, 2];
    let q = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.1, 1.0, 0.0, 0.1, 1.0];
    assert_eq!(
        knn_top1(&bank, &bl, &q, &[0, 1, 2, 2], 3, 2, 0.1, 3).unwrap(),
        1.0
    );
    assert_eq!(
        knn_top1(&bank, &bl, &q, &[0, 1, 2, 0], 3, 2, 0.1, 3).unwrap(),
        0.75
    );
    assert_eq!(
        knn_top1(&bank, &bl, &q, &[1, 0, 0, 0], 3, 2, 0.1, 3).unwrap(),
        0.0
    );
}

#[test]
fn bad_shapes_and_arguments_are_errors() {
    let bank = [1.0, 0.0, 0.0, 1.0];
    let l = [0, 1];
    let q = [1.0, 0.0];
    assert!(knn_predict(&bank, &l, &q, 0, 1, 0.1, 2).is_err()); // dim 0
    assert!(knn_predict(&bank[..3], &l, &q, 2, 1, 0.1, 2).is_err()); // bank size
    assert!(knn_predict(&bank, &l, &q[..1], 2, 1, 0.1, 2).is_err()); // query size
    assert!(knn_predict(&bank, &l, &q, 2, 0, 0.1, 2).is_err()); // k = 0
    assert!(knn_predict(&bank, &l, &q, 2, 1, 0.0, 2).is_err()); // t = 0
    assert!(knn_predict(&bank, &l, &q, 2, 1, f32::NAN, 2).is_err());
    assert!(knn_predict(&bank, &[0, 2], &q, 2, 1, 0.1, 2).is_err()); // label range
    assert!(knn_predict(&[], &[], &q, 2, 1, 0.1, 2).is_err()); // empty bank
    assert!(knn_predict(&bank, &l, &[f32::NAN, 0.0], 2, 1, 0.1, 2).is_err());
    assert!(knn_top1(&bank, &l, &q, &[0, 1], 2, 1, 0.1, 2).is_err()); // label count
    assert!(knn_top1(&bank, &l, &[], &[], 2, 1, 0.1, 2).is_err()); // no queries
                                                                   // No queries is fine for predict: an empty answer.
    assert_eq!(
        knn_predict(&bank, &l, &[], 2, 1, 0.1, 2).unwrap(),
        Vec::<u32>::new()
    );
}

#[test]
fn monitor_uses_k200_t01() {
    let bank = moco::testing::normal(250 * 8, 5);
    let labels: Vec<u32> = (0..250).map(|i| i % 3).collect();
    let q = moco::testing::normal(20 * 8, 6);
    let ql: Vec<u32> = (0..20).map(|i| (i * 7) % 3).collect();
    assert_eq!(
        moco::eval::knn_monitor(&bank, &labels, &q, &ql, 8, 3).unwrap(),
        knn_top1(&bank, &labels, &q, &ql, 8, 200, 0.1, 3).unwrap()
    );
}
