//! Direct f32 convolutions with AVX-512 and AVX2 micro-kernels, chosen at run time.
//!
//! No im2col matrix is built. Each sample's input is copied once into zero-padded "phase
//! planes": for stride `s`, plane `(r, c)` holds the padded input's pixels `(a s + r,
//! b s + c)`, so every kernel tap `(ky, kx)` reads one plane shifted by a constant. With
//! the output flattened over the planes' row stride `Wq` (`q = oy Wq + ox`, the columns
//! `ox >= Wo` computed and thrown away), a tap is one offset into a flat buffer and a
//! convolution is
//!
//! ```text
//! out[co][q] = sum over j = (ci, ky, kx) of w[co][j] * planes[offs[j] + q]
//! ```
//!
//! which kernel A computes in register tiles of `R` output channels x `P` vectors of
//! output pixels (the weight broadcast, the input loaded contiguously). The input gradient
//! is the same computation: each phase `(r, c)` of `dx` (its pixels `(a s + r, b s + c)`)
//! is a stride-1 correlation of the padded `dy` with the taps whose parity matches, so one
//! kernel serves the forward pass and `dx` for every stride. The weight gradient
//! `dw[co][j] = sum_q dy[co][q] planes[offs[j] + q]` is kernel B: tiles of `R` output
//! channels x `T` taps with the pixels in the vector lanes, summed over the samples of a
//! chunk, then across the lanes once.
//!
//! Every reduction runs in an order fixed by the shapes (samples in fixed chunks, taps in
//! order, lanes summed by one instruction sequence), so results do not depend on the
//! thread count. They differ from the im2col path's by rounding only (another summation
//! order); `MOCO_CPU_CONV=im2col` selects that path instead.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::backend::ConvShape;

/// The vector instruction set a direct convolution runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// 16 f32 lanes, 32 registers.
    Avx512,
    /// 8 f32 lanes (AVX2 + FMA), 16 registers.
    Avx2,
}

impl Isa {
    /// f32 lanes per vector.
    fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
        }
    }
    /// Output channels per kernel-A tile.
    fn a_rows(self) -> usize {
        match self {
            Isa::Avx512 => A_R512,
            Isa::Avx2 => A_R256,
        }
    }
    /// (output channels, taps) per kernel-B tile.
    fn b_tile(self) -> (usize, usize) {
        match self {
            Isa::Avx512 => (B_R512, B_T512),
            Isa::Avx2 => (B_R256, B_T256),
        }
    }
}

const A_R512: usize = 8;
const A_R256: usize = 4;
const B_R512: usize = 4;
const B_T512: usize = 6;
const B_R256: usize = 3;
const B_T256: usize = 4;
/// Largest number of pixel vectors per kernel-A tile.
const A_MAX_P: usize = 3;
/// Kernel B sums this many bytes of samples (planes and `dy`) per pass, so that one
/// pass's data stays in a core's L2 cache.
const B_PASS_BYTES: usize = 1 << 20;

/// The instruction set of the direct convolutions on this CPU, or `None` (no AVX2/FMA, not
/// x86-64, or `MOCO_CPU_CONV=im2col` in the environment): then the im2col path runs.
pub(crate) fn isa() -> Option<Isa> {
    static ISA: OnceLock<Option<Isa>> = OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var_os("MOCO_CPU_CONV").is_some_and(|v| v == "im2col") {
            return None;
        }
        simd_level()
    })
}

/// The widest vector instruction set of this CPU, whatever `MOCO_CPU_CONV` says: the
/// plane-wise loops of BatchNorm are compiled once per set and this picks one.
pub(crate) fn simd_level() -> Option<Isa> {
    static LEVEL: OnceLock<Option<Isa>> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

/// Whether the direct path beats im2col for this shape (measured on resnet8, 2 threads,
/// an idle AVX-512 machine, `moco bench --profile`): not for 1x1 kernels (the phase copy
/// costs more than it saves), nor for the backward pass of maps under 14x14 (a 7x7 map is
/// 4 vectors per channel: the 64->64 7x7 backward took 19 ms direct against 12.7 ms by
/// im2col, measured again after kernel B went samples-outer).
pub(crate) fn pays(s: &ConvShape, backward: bool) -> bool {
    s.k > 1 && (!backward || s.ho * s.wo >= 196)
}

/// Every instruction set this CPU can run (for tests that compare them).
#[cfg(test)]
pub(crate) fn available() -> Vec<Isa> {
    let mut v = Vec::new();
    if let Some(i) = detect() {
        v.push(i);
        if i == Isa::Avx512 && detect_avx2() {
            v.push(Isa::Avx2);
        }
    }
    v
}

#[cfg(target_arch = "x86_64")]
fn detect_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Option<Isa> {
    if is_x86_feature_detected!("avx512f") {
        Some(Isa::Avx512)
    } else if detect_avx2() {
        Some(Isa::Avx2)
    } else {
        None
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx2() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Option<Isa> {
    None
}

/// Pixel vectors per kernel-A tile (1 to [`A_MAX_P`]) for `q` outputs, and the padded
/// length: the least padded length weighted by the tile's cost per vector (one vector per
/// tile needs a broadcast per FMA and is load-bound, about 15% slower).
fn pick_p(q: usize, lanes: usize) -> (usize, usize) {
    const COST: [usize; A_MAX_P] = [115, 100, 98];
    (1..=A_MAX_P)
        .map(|p| (p, q.div_ceil(p * lanes) * p * lanes))
        .min_by_key(|&(p, qv)| (qv * COST[p - 1], usize::MAX - p))
        .expect("A_MAX_P >= 1")
}

/// The phase planes of one sample's input for the forward pass (and the weight gradient).
struct Planes {
    /// Rows and columns per plane: `Ho + (K-1)/s`, `Wo + (K-1)/s`.
    hq: usize,
    wq: usize,
    /// Phases per dimension that a tap reads: `min(s, K)`.
    pu: usize,
    /// Elements per input channel: `pu^2 hq wq`.
    cs: usize,
    /// Flattened outputs `Ho wq`, padded to `qv` (a multiple of `p` vectors).
    q: usize,
    qv: usize,
    p: usize,
    /// Offset of tap `j = (ci K + ky) K + kx`.
    offs: Vec<usize>,
    /// Buffer length: every read of `offs[j] + q` for `q < qv` lands inside.
    len: usize,
}

impl Planes {
    fn new(s: &ConvShape, lanes: usize) -> Planes {
        let (st, k) = (s.stride, s.k);
        let e = (k - 1) / st;
        let (hq, wq) = (s.ho + e, s.wo + e);
        let plane = hq * wq;
        let pu = st.min(k);
        let cs = pu * pu * plane;
        let q = s.ho * wq;
        let (p, qv) = pick_p(q, lanes);
        let mut offs = Vec::with_capacity(s.cin * k * k);
        for ci in 0..s.cin {
            for ky in 0..k {
                for kx in 0..k {
                    let ph = (ky % st) * pu + kx % st;
                    offs.push(ci * cs + ph * plane + (ky / st) * wq + kx / st);
                }
            }
        }
        let max_off = offs.iter().copied().max().unwrap_or(0);
        let len = (max_off + qv).max(s.cin * cs);
        Planes {
            hq,
            wq,
            pu,
            cs,
            q,
            qv,
            p,
            offs,
            len,
        }
    }

    /// Writes every plane element of one sample (`x`: Cin x H x W); `buf[cin cs..]` (the
    /// slack) is left as it is (zero from allocation).
    fn fill(&self, isa: Isa, s: &ConvShape, x: &[f32], buf: &mut [f32]) {
        let (st, pad) = (s.stride, s.pad);
        let plane = self.hq * self.wq;
        for ci in 0..s.cin {
            let xc = &x[ci * s.h * s.w..(ci + 1) * s.h * s.w];
            for r in 0..self.pu {
                for c in 0..self.pu {
                    let base = ci * self.cs + (r * self.pu + c) * plane;
                    // Columns b whose input column b st + c - pad is inside the image.
                    let b_lo = pad.saturating_sub(c).div_ceil(st).min(self.wq);
                    let b_hi = (s.w + pad)
                        .saturating_sub(c)
                        .div_ceil(st)
                        .clamp(b_lo, self.wq);
                    // Rows a whose input row a st + r - pad is inside the image.
                    let a_lo = pad.saturating_sub(r).div_ceil(st).min(self.hq);
                    let a_hi = (s.h + pad)
                        .saturating_sub(r)
                        .div_ceil(st)
                        .clamp(a_lo, self.hq);
                    let pl = &mut buf[base..base + plane];
                    if b_lo == b_hi || a_lo == a_hi {
                        pl.fill(0.0);
                        continue;
                    }
                    pl[..a_lo * self.wq].fill(0.0);
                    pl[a_hi * self.wq..].fill(0.0);
                    let (iy0, x0) = (a_lo * st + r - pad, b_lo * st + c - pad);
                    let rows = &mut pl[a_lo * self.wq..a_hi * self.wq];
                    let src = &xc[iy0 * s.w + x0..];
                    put_strided(isa, rows, self.wq, b_lo, src, st * s.w, st, b_hi - b_lo);
                }
            }
        }
    }
}

/// One phase `(r, c)` of the input gradient: `dx[ci][a s + r][b s + c]` for `a < ha`,
/// `b < wb`, computed at `q = a wd + b` from the padded `dy`.
struct Phase {
    r: usize,
    c: usize,
    ha: usize,
    wb: usize,
    /// `(ky, kx)` of the taps that reach this phase.
    taps: Vec<(usize, usize)>,
    /// Offset of `j = co ntaps + t` into the padded `dy`.
    offs: Vec<usize>,
    qv: usize,
    p: usize,
}

/// The padded `dy` of one sample for the input gradient, and its phases.
struct DyPad {
    /// Zero rows above / columns left of `dy`.
    ty: usize,
    tx: usize,
    hd: usize,
    wd: usize,
    phases: Vec<Phase>,
    /// Buffer length (Cout hd wd plus the slack of the longest phase).
    len: usize,
}

/// Tap offsets of one dimension: for phase `r`, the taps `kk` with `kk = r + pad (mod s)`
/// and their shift `(r + pad - kk) / s` (the `dy` row read, relative to the phase row).
fn phase_taps(k: usize, st: usize, pad: usize, r: usize) -> Vec<(usize, isize)> {
    (0..k)
        .filter(|&kk| (r + pad + st * k - kk).is_multiple_of(st))
        .map(|kk| (kk, (r as isize + pad as isize - kk as isize) / st as isize))
        .collect()
}

impl DyPad {
    fn new(s: &ConvShape, lanes: usize) -> DyPad {
        let (st, k, pad) = (s.stride, s.k, s.pad);
        let count = |n: usize, r: usize| if r < n { (n - r).div_ceil(st) } else { 0 };
        let mut ty = 0isize;
        let mut tx = 0isize;
        for r in 0..st {
            for &(_, d) in &phase_taps(k, st, pad, r) {
                ty = ty.max(-d);
                tx = tx.max(-d);
            }
        }
        let (ty, tx) = (ty as usize, tx as usize);
        let mut hd = s.ho + ty;
        let mut wd = s.wo + tx;
        for r in 0..st {
            if let Some(dmax) = phase_taps(k, st, pad, r).iter().map(|t| t.1).max() {
                // Phase row a < ha reads padded row a + d + ty, d <= dmax (and d >= -ty).
                let ha = count(s.h, r);
                if ha > 0 {
                    hd = hd.max((ha as isize + dmax + ty as isize) as usize);
                }
                let wb = count(s.w, r);
                if wb > 0 {
                    wd = wd.max((wb as isize + dmax + tx as isize) as usize);
                }
            }
        }
        let csd = hd * wd;
        let mut phases = Vec::new();
        let mut len = s.cout * csd;
        for r in 0..st {
            for c in 0..st {
                let (ha, wb) = (count(s.h, r), count(s.w, c));
                let ty_r = phase_taps(k, st, pad, r);
                let tx_c = phase_taps(k, st, pad, c);
                let mut taps = Vec::new();
                let mut rel = Vec::new();
                for &(ky, dy) in &ty_r {
                    for &(kx, dx) in &tx_c {
                        taps.push((ky, kx));
                        rel.push((dy + ty as isize) as usize * wd + (dx + tx as isize) as usize);
                    }
                }
                let mut offs = Vec::with_capacity(s.cout * taps.len());
                for co in 0..s.cout {
                    offs.extend(rel.iter().map(|o| co * csd + o));
                }
                let (p, qv) = pick_p(ha * wd, lanes);
                if let Some(&m) = offs.iter().max() {
                    len = len.max(m + qv);
                }
                phases.push(Phase {
                    r,
                    c,
                    ha,
                    wb,
                    taps,
                    offs,
                    qv,
                    p,
                });
            }
        }
        DyPad {
            ty,
            tx,
            hd,
            wd,
            phases,
            len,
        }
    }

    /// Writes `dy` (Cout x Ho x Wo) into its place; the zero border is written too.
    fn fill(&self, isa: Isa, s: &ConvShape, dy: &[f32], buf: &mut [f32]) {
        let csd = self.hd * self.wd;
        for co in 0..s.cout {
            let src = &dy[co * s.ho * s.wo..(co + 1) * s.ho * s.wo];
            let dst = &mut buf[co * csd..(co + 1) * csd];
            dst[..self.ty * self.wd].fill(0.0);
            dst[(self.ty + s.ho) * self.wd..].fill(0.0);
            let rows = &mut dst[self.ty * self.wd..(self.ty + s.ho) * self.wd];
            put_rows(isa, rows, self.wd, self.tx, src, s.wo, s.wo);
        }
    }
}

/// A zeroed f32 buffer whose first element is 64-byte aligned (one cache line, one
/// AVX-512 vector): the kernels' rows are whole vectors, so their stores and the dy loads
/// of kernel B do not split cache lines.
struct Scratch {
    v: Vec<f32>,
    off: usize,
    len: usize,
}

impl Scratch {
    fn zeroed(len: usize) -> Scratch {
        let v = vec![0.0f32; len + 15];
        let off = v.as_ptr().align_offset(64).min(15);
        Scratch { v, off, len }
    }
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.v[self.off..self.off + self.len]
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.v[self.off..self.off + self.len]
    }
}

/// Packs `w(co, j)` for `co < cout`, `j < nj` as `[co block][j][R]`, zero rows past `cout`.
fn pack_a(cout: usize, nj: usize, rows: usize, w: impl Fn(usize, usize) -> f32) -> Vec<f32> {
    let nb = cout.div_ceil(rows);
    let mut wp = vec![0.0f32; nb * nj * rows];
    for b in 0..nb {
        for j in 0..nj {
            for r in 0..rows {
                let co = b * rows + r;
                if co < cout {
                    wp[(b * nj + j) * rows + r] = w(co, j);
                }
            }
        }
    }
    wp
}

/// Kernel A over one sample: `out[co][q] = sum_j wp(co, j) inp[offs[j] + q]` for every
/// padded output channel and `q < qv` (`out`: `nb R x qv`).
#[allow(clippy::too_many_arguments)]
fn kernel_a(
    isa: Isa,
    inp: &[f32],
    offs: &[usize],
    wp: &[f32],
    nb: usize,
    out: &mut [f32],
    qv: usize,
    p: usize,
) {
    let rows = isa.a_rows();
    let max_off = offs.iter().copied().max().unwrap_or(0);
    assert!(
        offs.is_empty() || max_off + qv <= inp.len(),
        "kernel A: input"
    );
    assert!(wp.len() >= nb * offs.len() * rows, "kernel A: weights");
    assert!(out.len() >= nb * rows * qv, "kernel A: output");
    assert!(
        (1..=A_MAX_P).contains(&p) && qv.is_multiple_of(p * isa.lanes()),
        "kernel A: tile"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the asserts bound every read (offs[j] + q < inp.len() for q < qv, weights
    // nb x J x R) and write (nb R rows of qv); `isa` came from run-time detection, so the
    // CPU has its instructions.
    unsafe {
        match isa {
            Isa::Avx512 => {
                x86::a_avx512(inp.as_ptr(), offs, wp.as_ptr(), nb, out.as_mut_ptr(), qv, p)
            }
            Isa::Avx2 => x86::a_avx2(inp.as_ptr(), offs, wp.as_ptr(), nb, out.as_mut_ptr(), qv, p),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no direct convolution ISA off x86-64");
}

/// Kernel B over `m` samples: `part[co][j] += sum_i sum_{q < qb} dyp_i[co][q]
/// inp_i[offs[j] + q]` for `co < cpad` (a multiple of R), `j < offs.len()` (a multiple of
/// T). `inp` holds the samples `sx` apart, `dyp` `sd` apart (rows `qb` apart).
#[allow(clippy::too_many_arguments)]
fn kernel_b(
    isa: Isa,
    inp: &[f32],
    sx: usize,
    offs: &[usize],
    dyp: &[f32],
    sd: usize,
    qb: usize,
    cpad: usize,
    m: usize,
    part: &mut [f32],
) {
    let (rows, taps) = isa.b_tile();
    let nj = offs.len();
    assert!(
        cpad.is_multiple_of(rows) && nj.is_multiple_of(taps) && qb.is_multiple_of(isa.lanes()),
        "kernel B: tile"
    );
    let max_off = offs.iter().copied().max().unwrap_or(0);
    assert!(
        m == 0 || (m - 1) * sx + max_off + qb <= inp.len(),
        "kernel B: input"
    );
    assert!(
        m == 0 || (m - 1) * sd + cpad * qb <= dyp.len(),
        "kernel B: dy"
    );
    assert!(part.len() >= cpad * nj, "kernel B: partial");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the asserts bound every read of the m samples (inputs at offs[j] + q,
    // dy rows of qb) and every write (cpad x nj partial); `isa` came from run-time
    // detection.
    unsafe {
        let args = x86::BArgs {
            inp: inp.as_ptr(),
            sx,
            offs,
            dyp: dyp.as_ptr(),
            sd,
            qb,
            cpad,
            m,
            part: part.as_mut_ptr(),
        };
        match isa {
            Isa::Avx512 => x86::b_avx512(&args),
            Isa::Avx2 => x86::b_avx2(&args),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no direct convolution ISA off x86-64");
}

/// `dst = [0; lead] ++ src ++ [0; ..]` (one row; see [`put_rows`]).
#[cfg(test)]
fn put_row(isa: Isa, dst: &mut [f32], lead: usize, src: &[f32]) {
    let w = dst.len();
    assert!(
        lead.checked_add(src.len()).is_some_and(|e| e <= w),
        "put_row: {lead} + {} > {w}",
        src.len()
    );
    if w > 0 {
        put_rows(isa, dst, w, lead, src, src.len(), src.len());
    }
}

/// Row `i` of `dst` (rows `ds` apart, `dst.len() / ds` of them, each `ds` long) becomes
/// `[0; lead] ++ src[i ss..i ss + len] ++ [0; ..]`, with vector (masked) loads and stores
/// whose masks are computed once for all rows: the rows here are 7-60 floats, where a
/// `memcpy`/`memset` call per row cost more than the copy (10% of a resnet8 step went to
/// them), and a call per row still cost a quarter of a convolution.
fn put_rows(isa: Isa, dst: &mut [f32], ds: usize, lead: usize, src: &[f32], ss: usize, len: usize) {
    assert!(
        ds > 0 && dst.len().is_multiple_of(ds),
        "put_rows: {} is not whole rows of {ds}",
        dst.len()
    );
    let rows = dst.len() / ds;
    assert!(
        lead.checked_add(len).is_some_and(|e| e <= ds),
        "put_rows: {lead} + {len} > {ds}"
    );
    assert!(
        rows == 0
            || (rows - 1)
                .checked_mul(ss)
                .and_then(|o| o.checked_add(len))
                .is_some_and(|e| e <= src.len()),
        "put_rows: {rows} rows of {len}, {ss} apart, overrun {}",
        src.len()
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the asserts keep every enabled lane inside `dst` (stores: row `i`'s
    // `ds` floats) and `src` (loads: lane `l` of the chunk at `c0` of row `i` reads
    // `src[i ss + c0 + l - lead]` only when `c0 + l - lead` is in `0..len`); `isa` came
    // from run-time detection.
    unsafe {
        match isa {
            Isa::Avx512 => {
                x86::put_rows_avx512(dst.as_mut_ptr(), ds, rows, lead, src.as_ptr(), ss, len)
            }
            Isa::Avx2 => {
                x86::put_rows_avx2(dst.as_mut_ptr(), ds, rows, lead, src.as_ptr(), ss, len)
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no direct convolution ISA off x86-64");
}

/// Row `i` of `dst` (rows `ds` apart, each `ds` long) becomes `[0; lead] ++ [s[0],
/// s[st], .., s[(count - 1) st]] ++ [0; ..]` with `s = src[i ss..]`: the phase planes of a
/// strided convolution take every `st`-th input column. Stride 1 is [`put_rows`]; stride
/// 2 with AVX-512 vector loads and permutes (the masks computed once for all rows); a
/// scalar loop otherwise.
#[allow(clippy::too_many_arguments)]
fn put_strided(
    isa: Isa,
    dst: &mut [f32],
    ds: usize,
    lead: usize,
    src: &[f32],
    ss: usize,
    st: usize,
    count: usize,
) {
    assert!(
        ds > 0 && dst.len().is_multiple_of(ds),
        "put_strided: {} is not whole rows of {ds}",
        dst.len()
    );
    let rows = dst.len() / ds;
    assert!(
        lead.checked_add(count).is_some_and(|e| e <= ds),
        "put_strided: {lead} + {count} > {ds}"
    );
    // One past the last element read.
    let end = (count.max(1) - 1)
        .checked_mul(st)
        .and_then(|e| e.checked_add(1))
        .and_then(|e| {
            (rows.max(1) - 1)
                .checked_mul(ss)
                .and_then(|o| o.checked_add(e))
        });
    assert!(
        rows == 0 || count == 0 || end.is_some_and(|e| e <= src.len()),
        "put_strided: {rows} rows of {count} columns {st} apart overrun {}",
        src.len()
    );
    if st == 1 {
        return put_rows(isa, dst, ds, lead, src, ss, count);
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && st == 2 {
        // SAFETY: the asserts are the function's contract (`dst` holds `rows` rows of
        // `ds`, `lead + count <= ds`, row `i` of `src` holds `2 (count - 1) + 1` from
        // `i ss`); `isa` came from run-time detection.
        unsafe {
            x86::put_stride2_avx512(dst.as_mut_ptr(), ds, rows, lead, src.as_ptr(), ss, count)
        };
        return;
    }
    let _ = isa;
    for (i, row) in dst.chunks_exact_mut(ds).enumerate() {
        row[..lead].fill(0.0);
        row[lead + count..].fill(0.0);
        let s = src[i * ss..].iter().step_by(st);
        for (d, &v) in row[lead..lead + count].iter_mut().zip(s) {
            *d = v;
        }
    }
}

/// `dst[b st] = src[b]` for every `b`; the elements between are left as they are (the
/// other phases of a strided convolution's input gradient). Vector permutes and masked
/// stores for stride 2 with AVX-512, a scalar loop otherwise.
fn scatter_row(isa: Isa, dst: &mut [f32], st: usize, src: &[f32]) {
    assert!(
        src.is_empty()
            || (src.len() - 1)
                .checked_mul(st)
                .is_some_and(|e| e < dst.len()),
        "scatter_row: {} columns {st} apart overrun {}",
        src.len(),
        dst.len()
    );
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && st == 2 {
        // SAFETY: the assert is the function's contract (`dst` holds `2 (len - 1) + 1`);
        // `isa` came from run-time detection.
        unsafe { x86::scatter_stride2_avx512(dst.as_mut_ptr(), src.as_ptr(), src.len()) };
        return;
    }
    let _ = isa;
    for (b, &v) in src.iter().enumerate() {
        dst[b * st] = v;
    }
}

/// Samples per forward work item: about 32 items for the batch.
fn fwd_group(n: usize) -> usize {
    n.div_ceil(32).max(1)
}

/// `y = conv2d(x, w)` (shapes validated by the caller).
pub(crate) fn forward(isa: Isa, s: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]) {
    let lanes = isa.lanes();
    let pl = Planes::new(s, lanes);
    let rows = isa.a_rows();
    let nj = s.cin * s.k * s.k;
    let nb = s.cout.div_ceil(rows);
    let wp = pack_a(s.cout, nj, rows, |co, j| w[co * nj + j]);
    let (xs, ys, hwo) = (s.cin * s.h * s.w, s.cout * s.ho * s.wo, s.ho * s.wo);
    let g = fwd_group(s.n);
    y[..s.n * ys]
        .par_chunks_mut(g * ys)
        .zip(x[..s.n * xs].par_chunks(g * xs))
        .for_each(|(yc, xc)| {
            let mut buf = Scratch::zeroed(pl.len);
            let mut out = Scratch::zeroed(nb * rows * pl.qv);
            for (yn, xn) in yc.chunks_mut(ys).zip(xc.chunks(xs)) {
                pl.fill(isa, s, xn, &mut buf);
                kernel_a(isa, &buf, &pl.offs, &wp, nb, &mut out, pl.qv, pl.p);
                for co in 0..s.cout {
                    let o = &out[co * pl.qv..];
                    let yr = &mut yn[co * hwo..(co + 1) * hwo];
                    put_rows(isa, yr, s.wo, 0, o, pl.wq, s.wo);
                }
            }
        });
}

/// The packed weights of every input-gradient phase: `w[co][ci][ky][kx]` at
/// `(ci, j = co ntaps + t)`.
fn pack_phases(isa: Isa, s: &ConvShape, dp: &DyPad, w: &[f32]) -> Vec<Vec<f32>> {
    let kk = s.k * s.k;
    dp.phases
        .iter()
        .map(|ph| {
            let nt = ph.taps.len();
            pack_a(s.cin, s.cout * nt, isa.a_rows(), |ci, j| {
                let (co, t) = (j / nt, j % nt);
                let (ky, kx) = ph.taps[t];
                w[(co * s.cin + ci) * kk + ky * s.k + kx]
            })
        })
        .collect()
}

/// Backward of [`forward`]: `dw += dL/dw` and, when given, `dx = dL/dx`.
pub(crate) fn backward(
    isa: Isa,
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
) {
    let lanes = isa.lanes();
    let pl = Planes::new(s, lanes);
    let (br, bt) = isa.b_tile();
    let nj = s.cin * s.k * s.k;
    let jpad = nj.div_ceil(bt) * bt;
    let mut offs_b = pl.offs.clone();
    offs_b.resize(jpad, 0);
    let cpad = s.cout.div_ceil(br) * br;
    // dy at q = oy wq + ox, zero in the thrown-away columns and past the last row.
    let qb = pl.q.div_ceil(lanes) * lanes;
    let sd = cpad * qb;
    let per_sample = (pl.len + sd) * std::mem::size_of::<f32>();
    let (xs, ys) = (s.cin * s.h * s.w, s.cout * s.ho * s.wo);
    // The im2col path's chunks: the same partials, whatever the thread count.
    let chunk = super::conv::conv_chunk(s.n);
    let pass = (B_PASS_BYTES / per_sample.max(1)).clamp(1, chunk);
    let nchunks = s.n.div_ceil(chunk);
    let want_dx = dx.is_some();
    let dp = want_dx.then(|| DyPad::new(s, lanes));
    let wph = dp.as_ref().map(|d| pack_phases(isa, s, d, w));
    let rows = isa.a_rows();
    let nbx = s.cin.div_ceil(rows);

    let work = |ci: usize, part: &mut Vec<f32>, mut dxc: Option<&mut [f32]>| {
        *part = vec![0.0f32; cpad * jpad];
        let c0 = ci * chunk;
        let c1 = (c0 + chunk).min(s.n);
        let mut xbuf = Scratch::zeroed(pass * pl.len);
        let mut dybuf = Scratch::zeroed(pass * sd);
        let mut dpbuf = Scratch::zeroed(dp.as_ref().map_or(0, |d| d.len));
        let out_q = dp
            .as_ref()
            .map_or(0, |d| d.phases.iter().map(|p| p.qv).max().unwrap_or(0));
        let mut out = Scratch::zeroed(nbx * rows * out_q);
        for n0 in (c0..c1).step_by(pass) {
            let m = pass.min(c1 - n0);
            for i in 0..m {
                let n = n0 + i;
                pl.fill(
                    isa,
                    s,
                    &x[n * xs..(n + 1) * xs],
                    &mut xbuf[i * pl.len..(i + 1) * pl.len],
                );
                let dyn_ = &dy[n * ys..(n + 1) * ys];
                let db = &mut dybuf[i * sd..(i + 1) * sd];
                for co in 0..s.cout {
                    let row = &mut db[co * qb..(co + 1) * qb];
                    let src = &dyn_[co * s.ho * s.wo..(co + 1) * s.ho * s.wo];
                    put_rows(isa, &mut row[..s.ho * pl.wq], pl.wq, 0, src, s.wo, s.wo);
                    row[s.ho * pl.wq..].fill(0.0);
                }
                if let (Some(dxc), Some(d), Some(wph)) = (dxc.as_deref_mut(), &dp, &wph) {
                    let dxn = &mut dxc[(n - c0) * xs..(n - c0 + 1) * xs];
                    d.fill(isa, s, dyn_, &mut dpbuf);
                    for (ph, wp) in d.phases.iter().zip(wph) {
                        if ph.ha == 0 || ph.wb == 0 {
                            continue;
                        }
                        if ph.taps.is_empty() {
                            for c in 0..s.cin {
                                for a in 0..ph.ha {
                                    let iy = a * s.stride + ph.r;
                                    for b in 0..ph.wb {
                                        dxn[(c * s.h + iy) * s.w + b * s.stride + ph.c] = 0.0;
                                    }
                                }
                            }
                            continue;
                        }
                        kernel_a(isa, &dpbuf, &ph.offs, wp, nbx, &mut out, ph.qv, ph.p);
                        for c in 0..s.cin {
                            let o = &out[c * ph.qv..];
                            if s.stride == 1 {
                                let plane = &mut dxn[c * s.h * s.w..(c + 1) * s.h * s.w];
                                put_rows(isa, plane, s.w, 0, o, d.wd, ph.wb);
                                continue;
                            }
                            for a in 0..ph.ha {
                                let iy = a * s.stride + ph.r;
                                let dr = &mut dxn[(c * s.h + iy) * s.w..(c * s.h + iy + 1) * s.w];
                                let src = &o[a * d.wd..a * d.wd + ph.wb];
                                scatter_row(isa, &mut dr[ph.c..], s.stride, src);
                            }
                        }
                    }
                }
            }
            kernel_b(isa, &xbuf, pl.len, &offs_b, &dybuf, sd, qb, cpad, m, part);
        }
    };
    let partials =
        super::conv::per_chunk(nchunks, dx.map(|d| &mut d[..s.n * xs]), chunk * xs, work);
    dw[..s.cout * nj]
        .par_chunks_mut(nj)
        .enumerate()
        .for_each(|(co, d)| {
            for (j, d) in d.iter_mut().enumerate() {
                let mut acc = *d;
                for p in &partials {
                    acc += p[co * jpad + j];
                }
                *d = acc;
            }
        });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The micro-kernels, generic over the vector type, instantiated per instruction set
    //! inside `#[target_feature]` entry points (everything below them is inlined).
    use std::arch::x86_64::*;

    /// The few vector operations the kernels use.
    trait Simd {
        type V: Copy;
        const L: usize;
        unsafe fn zero() -> Self::V;
        unsafe fn loadu(p: *const f32) -> Self::V;
        unsafe fn splat(p: *const f32) -> Self::V;
        unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
        unsafe fn storeu(p: *mut f32, v: Self::V);
        unsafe fn hsum(v: Self::V) -> f32;
    }

    struct Avx512;
    struct Avx2;

    // SAFETY (all methods below): callers run inside a function compiled with the
    // matching target features on a CPU that has them, and pass pointers valid for one
    // vector (loads, stores) or one f32 (splat).
    impl Simd for Avx512 {
        type V = __m512;
        const L: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            // SAFETY: see the impl.
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn loadu(p: *const f32) -> __m512 {
            // SAFETY: see the impl.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn splat(p: *const f32) -> __m512 {
            // SAFETY: see the impl.
            unsafe { _mm512_set1_ps(*p) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: see the impl.
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn storeu(p: *mut f32, v: __m512) {
            // SAFETY: see the impl.
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn hsum(v: __m512) -> f32 {
            // SAFETY: see the impl.
            unsafe { _mm512_reduce_add_ps(v) }
        }
    }

    impl Simd for Avx2 {
        type V = __m256;
        const L: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            // SAFETY: see the impl.
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn loadu(p: *const f32) -> __m256 {
            // SAFETY: see the impl.
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn splat(p: *const f32) -> __m256 {
            // SAFETY: see the impl.
            unsafe { _mm256_broadcast_ss(&*p) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            // SAFETY: see the impl.
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn storeu(p: *mut f32, v: __m256) {
            // SAFETY: see the impl.
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn hsum(v: __m256) -> f32 {
            // SAFETY: see the impl.
            unsafe {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
                _mm_cvtss_f32(s)
            }
        }
    }

    /// One kernel-A tile: R output channels x P vectors at `out` (rows `ldo` apart).
    #[inline(always)]
    unsafe fn tile_a<S: Simd, const R: usize, const P: usize>(
        inp: *const f32,
        offs: &[usize],
        wp: *const f32,
        out: *mut f32,
        ldo: usize,
    ) {
        // SAFETY: the caller (kernel_a's asserts) bounds every pointer used here.
        unsafe {
            let mut acc = [[S::zero(); P]; R];
            for (j, &o) in offs.iter().enumerate() {
                let src = inp.add(o);
                let mut v = [S::zero(); P];
                for (pi, vp) in v.iter_mut().enumerate() {
                    *vp = S::loadu(src.add(pi * S::L));
                }
                let wj = wp.add(j * R);
                for (r, ar) in acc.iter_mut().enumerate() {
                    let wv = S::splat(wj.add(r));
                    for (a, &vp) in ar.iter_mut().zip(&v) {
                        *a = S::fma(wv, vp, *a);
                    }
                }
            }
            for (r, ar) in acc.iter().enumerate() {
                for (pi, &a) in ar.iter().enumerate() {
                    S::storeu(out.add(r * ldo + pi * S::L), a);
                }
            }
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_a<S: Simd, const R: usize, const P: usize>(
        inp: *const f32,
        offs: &[usize],
        wp: *const f32,
        nb: usize,
        out: *mut f32,
        qv: usize,
    ) {
        let nj = offs.len();
        // SAFETY: kernel_a's asserts: q0 + P L <= qv, blocks < nb.
        unsafe {
            for q0 in (0..qv).step_by(P * S::L) {
                for b in 0..nb {
                    tile_a::<S, R, P>(
                        inp.add(q0),
                        offs,
                        wp.add(b * nj * R),
                        out.add(b * R * qv + q0),
                        qv,
                    );
                }
            }
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dispatch_a<S: Simd, const R: usize>(
        inp: *const f32,
        offs: &[usize],
        wp: *const f32,
        nb: usize,
        out: *mut f32,
        qv: usize,
        p: usize,
    ) {
        // SAFETY: forwarded contract.
        unsafe {
            match p {
                1 => run_a::<S, R, 1>(inp, offs, wp, nb, out, qv),
                2 => run_a::<S, R, 2>(inp, offs, wp, nb, out, qv),
                _ => run_a::<S, R, 3>(inp, offs, wp, nb, out, qv),
            }
        }
    }

    /// Kernel A with AVX-512.
    ///
    /// # Safety
    /// The CPU supports AVX-512F; pointers as `kernel_a` asserts.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn a_avx512(
        inp: *const f32,
        offs: &[usize],
        wp: *const f32,
        nb: usize,
        out: *mut f32,
        qv: usize,
        p: usize,
    ) {
        // SAFETY: forwarded contract.
        unsafe { dispatch_a::<Avx512, { super::A_R512 }>(inp, offs, wp, nb, out, qv, p) }
    }

    /// Kernel A with AVX2 + FMA.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; pointers as `kernel_a` asserts.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn a_avx2(
        inp: *const f32,
        offs: &[usize],
        wp: *const f32,
        nb: usize,
        out: *mut f32,
        qv: usize,
        p: usize,
    ) {
        // SAFETY: forwarded contract.
        unsafe { dispatch_a::<Avx2, { super::A_R256 }>(inp, offs, wp, nb, out, qv, p) }
    }

    /// `put_rows` with AVX-512: per 16-float chunk of a row, one masked load of the part
    /// of `src` it holds (zero elsewhere) and one masked store; the masks of a chunk are
    /// the same in every row.
    ///
    /// # Safety
    /// The CPU supports AVX-512F; `dst` is valid for `rows` rows of `w` floats, `w`
    /// apart, `src` for `(rows - 1) ss + len`, and `lead + len <= w`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn put_rows_avx512(
        dst: *mut f32,
        w: usize,
        rows: usize,
        lead: usize,
        src: *const f32,
        ss: usize,
        len: usize,
    ) {
        let bits = |n: usize| if n >= 16 { 0xffffu16 } else { (1u16 << n) - 1 };
        for c0 in (0..w).step_by(16) {
            let store = bits(w - c0);
            let lo = lead.saturating_sub(c0);
            let hi = (lead + len).saturating_sub(c0);
            let load = bits(hi) & !bits(lo);
            let (mut d, mut s) = (
                dst.wrapping_add(c0),
                src.wrapping_add(c0).wrapping_sub(lead),
            );
            for _ in 0..rows {
                // SAFETY: masked-off lanes are not accessed; enabled load lanes index
                // `src[i ss..i ss + len]`, enabled store lanes row `i` of `dst`.
                unsafe {
                    let v = _mm512_maskz_loadu_ps(load, s);
                    _mm512_mask_storeu_ps(d, store, v);
                }
                d = d.wrapping_add(w);
                s = s.wrapping_add(ss);
            }
        }
    }

    /// `put_rows` with AVX2 (8-float chunks, `vmaskmovps`).
    ///
    /// # Safety
    /// The CPU supports AVX2; as [`put_rows_avx512`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn put_rows_avx2(
        dst: *mut f32,
        w: usize,
        rows: usize,
        lead: usize,
        src: *const f32,
        ss: usize,
        len: usize,
    ) {
        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        // Lanes `i` with `i < n`, as an all-ones mask per lane.
        let below = |n: usize| _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), idx);
        for c0 in (0..w).step_by(8) {
            let store = below(w - c0);
            let lo = below(lead.saturating_sub(c0));
            let hi = below((lead + len).saturating_sub(c0));
            let load = _mm256_andnot_si256(lo, hi);
            let (mut d, mut s) = (
                dst.wrapping_add(c0),
                src.wrapping_add(c0).wrapping_sub(lead),
            );
            for _ in 0..rows {
                // SAFETY: as in the AVX-512 version: `vmaskmovps` does not access
                // masked-off lanes.
                unsafe {
                    let v = _mm256_maskload_ps(s, load);
                    _mm256_maskstore_ps(d, store, v);
                }
                d = d.wrapping_add(w);
                s = s.wrapping_add(ss);
            }
        }
    }

    /// `put_strided` for stride 2 with AVX-512: per 16-float chunk of a row, two masked
    /// loads of the 32 `src` floats it draws from (zero outside the row's `src`), one
    /// two-source permute that keeps the even ones, and one masked store; the masks of a
    /// chunk are the same in every row. (A gather is several times slower on the CPUs
    /// measured.)
    ///
    /// # Safety
    /// The CPU supports AVX-512F; `dst` is valid for `rows` rows of `w` floats, `w` apart,
    /// row `i` of `src` for `2 (count - 1) + 1` floats from `i ss`, `lead + count <= w`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn put_stride2_avx512(
        dst: *mut f32,
        w: usize,
        rows: usize,
        lead: usize,
        src: *const f32,
        ss: usize,
        count: usize,
    ) {
        let bits = |n: usize| if n >= 16 { 0xffffu16 } else { (1u16 << n) - 1 };
        // Lanes l of a load at `base` whose index base + l is in 0..n.
        let n = (2 * count).saturating_sub(1) as isize;
        let in_src = |base: isize| {
            let lo = (-base).clamp(0, 16) as usize;
            let hi = (n - base).clamp(0, 16) as usize;
            bits(hi) & !bits(lo)
        };
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        for c0 in (0..w).step_by(16) {
            let store = bits(w - c0);
            let lo = lead.saturating_sub(c0);
            let hi = (lead + count).saturating_sub(c0);
            let keep = bits(hi) & !bits(lo);
            // Lane i takes src[2 (c0 + i - lead)]: the two loads start at that index of
            // lane 0 (possibly outside `src`; only in-range lanes are read).
            let base = 2 * (c0 as isize - lead as isize);
            let (ma, mb) = (in_src(base), in_src(base + 16));
            let (mut d, mut s) = (dst.wrapping_add(c0), src.wrapping_offset(base));
            for _ in 0..rows {
                // SAFETY: masked-off lanes are not accessed: load lanes index the row's
                // `src[0..n]`, store lanes row `i` of `dst`.
                unsafe {
                    let a = _mm512_maskz_loadu_ps(ma, s);
                    let b = _mm512_maskz_loadu_ps(mb, s.wrapping_add(16));
                    let v = _mm512_maskz_mov_ps(keep, _mm512_permutex2var_ps(a, even, b));
                    _mm512_mask_storeu_ps(d, store, v);
                }
                d = d.wrapping_add(w);
                s = s.wrapping_add(ss);
            }
        }
    }

    /// `scatter_row` for stride 2 with AVX-512: per 16 elements of `src`, one masked load,
    /// two permutes that spread them to the even lanes of 32, and two masked stores that
    /// leave the odd lanes (the other phase) untouched.
    ///
    /// # Safety
    /// The CPU supports AVX-512F; `src` is valid for `len` floats, `dst` for
    /// `2 (len - 1) + 1`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scatter_stride2_avx512(dst: *mut f32, src: *const f32, len: usize) {
        let bits = |n: usize| if n >= 16 { 0xffffu16 } else { (1u16 << n) - 1 };
        // Lane 2i of the low half holds src[i], of the high half src[8 + i].
        let lo_idx = _mm512_setr_epi32(0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0, 7, 0);
        let hi_idx = _mm512_setr_epi32(8, 0, 9, 0, 10, 0, 11, 0, 12, 0, 13, 0, 14, 0, 15, 0);
        for b0 in (0..len).step_by(16) {
            let k = (len - b0).min(16);
            // Even lanes for the first min(k, 8) and the next k - 8 elements.
            let m_lo = bits((2 * k.min(8)).saturating_sub(1)) & 0x5555;
            let m_hi = bits((2 * k.saturating_sub(8)).saturating_sub(1)) & 0x5555;
            // SAFETY: loads read `src[b0..b0 + k]`; enabled store lanes are
            // `dst[2 b]` for `b < len`.
            unsafe {
                let v = _mm512_maskz_loadu_ps(bits(k), src.add(b0));
                let d = dst.add(2 * b0);
                _mm512_mask_storeu_ps(d, m_lo, _mm512_permutexvar_ps(lo_idx, v));
                if m_hi != 0 {
                    _mm512_mask_storeu_ps(d.add(16), m_hi, _mm512_permutexvar_ps(hi_idx, v));
                }
            }
        }
    }

    /// Kernel B's operands (see `kernel_b`).
    pub(super) struct BArgs<'a> {
        pub inp: *const f32,
        pub sx: usize,
        pub offs: &'a [usize],
        pub dyp: *const f32,
        pub sd: usize,
        pub qb: usize,
        pub cpad: usize,
        pub m: usize,
        pub part: *mut f32,
    }

    /// Samples outermost: one sample's `dy` rows of a tile row (R x qb) stay in L1 while
    /// every tap group of that row runs over them, and the tiles' vector accumulators live
    /// in `acc` between samples (the same FMAs in the same order as keeping them in
    /// registers across samples, so the same result).
    #[inline(always)]
    unsafe fn run_b<S: Simd, const R: usize, const T: usize>(a: &BArgs) {
        let nj = a.offs.len();
        let nv = a.qb / S::L;
        let (nrow, ncol) = (a.cpad / R, nj / T);
        // SAFETY: kernel_b's asserts bound every sample's reads and the partial's writes;
        // `acc` holds R T vectors per tile.
        unsafe {
            let mut acc = vec![S::zero(); nrow * ncol * R * T];
            for i in 0..a.m {
                let xb = a.inp.add(i * a.sx);
                for tr in 0..nrow {
                    let db = a.dyp.add(i * a.sd + tr * R * a.qb);
                    for tc in 0..ncol {
                        let j0 = tc * T;
                        let ab = acc.as_mut_ptr().add((tr * ncol + tc) * R * T);
                        let mut t_acc = [[S::zero(); T]; R];
                        for (r, ar) in t_acc.iter_mut().enumerate() {
                            for (t, v) in ar.iter_mut().enumerate() {
                                *v = *ab.add(r * T + t);
                            }
                        }
                        let mut xp = [xb; T];
                        for (t, p) in xp.iter_mut().enumerate() {
                            *p = xb.add(a.offs[j0 + t]);
                        }
                        for v in 0..nv {
                            let q = v * S::L;
                            let mut d = [S::zero(); R];
                            for (r, dr) in d.iter_mut().enumerate() {
                                *dr = S::loadu(db.add(r * a.qb + q));
                            }
                            for t in 0..T {
                                let xv = S::loadu(xp[t].add(q));
                                for r in 0..R {
                                    t_acc[r][t] = S::fma(d[r], xv, t_acc[r][t]);
                                }
                            }
                        }
                        for (r, ar) in t_acc.iter().enumerate() {
                            for (t, &v) in ar.iter().enumerate() {
                                *ab.add(r * T + t) = v;
                            }
                        }
                    }
                }
            }
            for tr in 0..nrow {
                for tc in 0..ncol {
                    let ab = acc.as_ptr().add((tr * ncol + tc) * R * T);
                    for r in 0..R {
                        for t in 0..T {
                            let co = tr * R + r;
                            *a.part.add(co * nj + tc * T + t) += S::hsum(*ab.add(r * T + t));
                        }
                    }
                }
            }
        }
    }

    /// Kernel B with AVX-512.
    ///
    /// # Safety
    /// The CPU supports AVX-512F; pointers as `kernel_b` asserts.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn b_avx512(a: &BArgs) {
        // SAFETY: forwarded contract.
        unsafe { run_b::<Avx512, { super::B_R512 }, { super::B_T512 }>(a) }
    }

    /// Kernel B with AVX2 + FMA.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; pointers as `kernel_b` asserts.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn b_avx2(a: &BArgs) {
        // SAFETY: forwarded contract.
        unsafe { run_b::<Avx2, { super::B_R256 }, { super::B_T256 }>(a) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use rand::{Rng, SeedableRng};

    fn rand_vec(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    fn abs64(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x.abs() as f64).collect()
    }

    /// `got` (f32) against the f64 im2col result `want`, each element within 1e-5 of the
    /// sum of the magnitudes of its terms (`scale`, the f64 result on |inputs|).
    fn close(what: &str, s: &ConvShape, isa: Isa, got: &[f32], want: &[f64], scale: &[f64]) {
        assert_eq!(got.len(), want.len(), "{what} {s:?}");
        for (i, ((&g, &w), &sc)) in got.iter().zip(want).zip(scale).enumerate() {
            let err = (g as f64 - w).abs();
            assert!(
                err <= 1e-5 * sc + 1e-7,
                "{what} {isa:?} {s:?}: element {i} is {g}, the f64 reference {w} (scale {sc})"
            );
        }
    }

    /// (n, cin, (h, w), cout, k, stride, pad).
    type Case = (usize, usize, (usize, usize), usize, usize, usize, usize);

    const SHAPES: &[Case] = &[
        // The resnet8 layers at 28x28.
        (3, 3, (28, 28), 16, 3, 1, 1),
        (2, 16, (28, 28), 16, 3, 1, 1),
        (5, 16, (28, 28), 32, 3, 2, 1),
        (5, 16, (28, 28), 32, 1, 2, 0),
        (3, 32, (14, 14), 64, 3, 2, 1),
        (2, 64, (7, 7), 64, 3, 1, 1),
        // Odd sizes, valid and over-padded convolutions, strides 3 and 4 (phases no tap
        // reaches), even kernels, channel counts off the tile sizes, many chunks.
        (2, 5, (9, 11), 7, 3, 1, 0),
        (3, 3, (10, 7), 5, 5, 2, 2),
        (2, 4, (8, 8), 3, 1, 1, 0),
        (2, 2, (7, 9), 6, 3, 3, 1),
        (1, 3, (5, 5), 2, 4, 2, 1),
        (2, 2, (9, 9), 3, 3, 4, 1),
        (2, 3, (4, 4), 5, 3, 1, 3),
        (3, 2, (7, 7), 9, 1, 2, 0),
        (2, 1, (1, 1), 1, 1, 1, 0),
        (37, 3, (6, 6), 9, 2, 1, 1),
        (2, 3, (3, 3), 17, 3, 1, 1),
    ];

    #[test]
    fn direct_convolutions_match_the_f64_im2col_path() {
        let isas = available();
        if isas.is_empty() {
            eprintln!("no AVX2/AVX-512 here: the direct convolutions never run");
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let c64 = Cpu::<f64>::new();
        for &(n, cin, hw, cout, k, st, pad) in SHAPES {
            let s = ConvShape::new(n, cin, hw, cout, k, st, pad).unwrap();
            let x = rand_vec(&mut rng, s.x_len());
            let w = rand_vec(&mut rng, s.w_len());
            let dy = rand_vec(&mut rng, s.y_len());
            let dw0 = rand_vec(&mut rng, s.w_len());
            let mut want_y = vec![0.0; s.y_len()];
            c64.forward_im2col(&s, &f64s(&x), &f64s(&w), &mut want_y);
            let mut scale_y = vec![0.0; s.y_len()];
            c64.forward_im2col(&s, &abs64(&x), &abs64(&w), &mut scale_y);
            let mut want_dx = vec![0.0; s.x_len()];
            let mut want_dw = f64s(&dw0);
            c64.backward_im2col(
                &s,
                &f64s(&x),
                &f64s(&w),
                &f64s(&dy),
                Some(&mut want_dx),
                &mut want_dw,
            );
            let mut scale_dx = vec![0.0; s.x_len()];
            let mut scale_dw = abs64(&dw0);
            c64.backward_im2col(
                &s,
                &abs64(&x),
                &abs64(&w),
                &abs64(&dy),
                Some(&mut scale_dx),
                &mut scale_dw,
            );
            for &isa in &isas {
                let mut y = vec![f32::NAN; s.y_len()];
                forward(isa, &s, &x, &w, &mut y);
                close("y", &s, isa, &y, &want_y, &scale_y);
                let mut dx = vec![f32::NAN; s.x_len()];
                let mut dw = dw0.clone();
                backward(isa, &s, &x, &w, &dy, Some(&mut dx), &mut dw);
                close("dx", &s, isa, &dx, &want_dx, &scale_dx);
                close("dw", &s, isa, &dw, &want_dw, &scale_dw);
                // Without dx, the same weight gradient bit for bit.
                let mut dw2 = dw0.clone();
                backward(isa, &s, &x, &w, &dy, None, &mut dw2);
                assert_eq!(dw, dw2, "{isa:?} {s:?}: dw depends on whether dx is asked");
            }
        }
    }

    #[test]
    fn direct_convolutions_do_not_depend_on_the_thread_count() {
        let Some(isa) = isa() else { return };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let s = ConvShape::new(40, 16, (14, 14), 32, 3, 2, 1).unwrap();
        let x = rand_vec(&mut rng, s.x_len());
        let w = rand_vec(&mut rng, s.w_len());
        let dy = rand_vec(&mut rng, s.y_len());
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut y = vec![0.0; s.y_len()];
                forward(isa, &s, &x, &w, &mut y);
                let mut dx = vec![0.0; s.x_len()];
                let mut dw = vec![0.0; s.w_len()];
                backward(isa, &s, &x, &w, &dy, Some(&mut dx), &mut dw);
                (y, dx, dw)
            })
        };
        let one = run(1);
        for t in [2, 3, 7] {
            assert!(run(t) == one, "{t} threads differ from 1");
        }
    }

    #[test]
    fn put_row_writes_the_row_and_zeros_only() {
        for isa in available() {
            for w in 0..70 {
                for lead in 0..=w.min(20) {
                    for len in [0, 1, 7, 8, 15, 16, 17, 33, w - lead] {
                        if lead + len > w {
                            continue;
                        }
                        let src: Vec<f32> = (0..len).map(|i| i as f32 + 1.0).collect();
                        // A guard element past the row must stay untouched.
                        let mut dst = vec![f32::NAN; w + 1];
                        put_row(isa, &mut dst[..w], lead, &src);
                        let mut want = vec![0.0; w];
                        want[lead..lead + len].copy_from_slice(&src);
                        assert_eq!(&dst[..w], &want[..], "{isa:?} w {w} lead {lead} len {len}");
                        assert!(dst[w].is_nan(), "{isa:?} w {w}: wrote past the row");
                    }
                }
            }
        }
    }

    #[test]
    fn put_rows_writes_every_row_at_its_stride() {
        for isa in available() {
            for (ds, lead, len, ss, rows) in
                [(30, 1, 28, 28, 30), (9, 0, 7, 9, 7), (40, 3, 33, 50, 4)]
            {
                let src: Vec<f32> = (0..(rows - 1) * ss + len).map(|i| i as f32 + 1.0).collect();
                let mut dst = vec![f32::NAN; rows * ds + 1];
                put_rows(isa, &mut dst[..rows * ds], ds, lead, &src, ss, len);
                for r in 0..rows {
                    let mut want = vec![0.0; ds];
                    want[lead..lead + len].copy_from_slice(&src[r * ss..r * ss + len]);
                    assert_eq!(
                        &dst[r * ds..(r + 1) * ds],
                        &want[..],
                        "{isa:?} row {r} of {ds}"
                    );
                }
                assert!(dst[rows * ds].is_nan(), "{isa:?}: wrote past the rows");
            }
        }
    }

    #[test]
    fn strided_rows_take_every_stride_th_column() {
        for isa in available() {
            for st in 1..5 {
                for w in [0, 1, 7, 8, 15, 16, 17, 31, 33, 40] {
                    for lead in 0..=w.min(3) {
                        for count in [0, 1, 5, 8, 16, 17, w - lead] {
                            if lead + count > w {
                                continue;
                            }
                            let n = if count == 0 { 0 } else { (count - 1) * st + 1 };
                            let src: Vec<f32> = (0..n).map(|i| i as f32 + 1.0).collect();
                            let mut dst = vec![f32::NAN; w + 1];
                            if w > 0 {
                                put_strided(isa, &mut dst[..w], w, lead, &src, 0, st, count);
                            }
                            let mut want = vec![0.0; w];
                            for b in 0..count {
                                want[lead + b] = src[b * st];
                            }
                            let at = format!("{isa:?} st {st} w {w} lead {lead} count {count}");
                            assert_eq!(&dst[..w], &want[..], "{at}");
                            assert!(dst[w].is_nan(), "{at}: wrote past the row");
                            // Three rows, `n + 3` apart in `src`: each row its own.
                            if w > 0 {
                                let ss = n + 3;
                                let src3: Vec<f32> = (0..2 * ss + n).map(|i| i as f32).collect();
                                let mut dst3 = vec![f32::NAN; 3 * w];
                                put_strided(isa, &mut dst3, w, lead, &src3, ss, st, count);
                                for r in 0..3 {
                                    let mut want = vec![0.0; w];
                                    for b in 0..count {
                                        want[lead + b] = src3[r * ss + b * st];
                                    }
                                    assert_eq!(
                                        &dst3[r * w..(r + 1) * w],
                                        &want[..],
                                        "{at} row {r}"
                                    );
                                }
                            }
                            // And back: scatter the taken columns into a NaN row.
                            let mut back = vec![f32::NAN; n + 1];
                            scatter_row(isa, &mut back[..n], st, &want[lead..lead + count]);
                            for (i, &v) in back.iter().enumerate() {
                                if i < n && i % st == 0 {
                                    assert_eq!(v, src[i], "{at}: scatter {i}");
                                } else {
                                    assert!(v.is_nan(), "{at}: scatter touched {i}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_tile_height_pads_least() {
        assert_eq!(pick_p(840, 16), (3, 864));
        assert_eq!(pick_p(224, 16), (2, 224));
        assert_eq!(pick_p(63, 16), (2, 64));
        assert_eq!(pick_p(16, 16), (1, 16));
        assert_eq!(pick_p(1, 8), (1, 8));
    }
}
