// contrast.cu: L2 normalization, logits against the queue, and InfoNCE forward + backward.
//
// Shapes (row-major): q, k: N x C (encoder outputs, not yet normalized); queue: K x C, one
// key per row; logits: N x (1 + K), column 0 the positive. T is the temperature.
//
//   qn = q / max(||q||, eps)                       (F.normalize, eps = 1e-12)
//   l_0 = qn . kn / T,  l_j = qn . queue_{j-1} / T
//   loss = mean_i [ logsumexp_j l_ij - l_i0 ]
//   dL/dqn_i = (sum_j p_ij key_j - kn_i) / (N T)   (p = softmax over j)
//   dL/dq_i  = (g - qn (qn . g)) / ||q||  if ||q|| > eps, else g / eps
//
// The fused path never materializes the N x K logits: it is split-K flash attention with
// Q = qn and K = V = queue. Block (row tile, split) streams its share of the queue through
// shared memory, keeps an online (max, sum) per row and the running sum_j p_j queue_j, and
// writes one partial per (split, row); `moco_infonce_combine` merges the partials with the
// positive and back-propagates through the normalization. FLOPs: 4 N K C (two GEMMs).
//
// Performance (H200, N=256 C=128 K=65536): 281 us = 30.6 TFLOP/s, 46% of fp32 FMA peak, 2.16x
// the FLOP floor. Likely limiter: shared-memory bandwidth. Each thread's 4x4 register tile
// issues 8 LDS.128 per 64 FFMA in the logits loop and 12 per 128 in the P.V loop, and an SM
// serves one 128-byte wavefront per clock against four warp-FFMAs. Next steps: larger
// register tiles (8x4 / 8x8 per thread), cp.async double buffering of the queue tiles, and
// (as an option, not the fp32 default) TF32/bf16 mma for both products.
#include "common.cuh"

#define MOCO_NEG_INF (-__int_as_float(0x7f800000))

namespace {

// ---------------------------------------------------------------------------------------
// Normalization helpers.

// d(x / max(||x||, eps)) applied to g: (g - xn (xn . g)) / ||x||, or g / eps when clamped.
__device__ __forceinline__ float norm_backward(float g, float xn, float xn_dot_g, float norm, float eps) {
    return norm > eps ? (g - xn * xn_dot_g) / norm : g / eps;
}

}  // namespace

// One warp per row: out[r] = x[r] / max(||x[r]||, eps); norms[r] = ||x[r]||.
extern "C" __global__ void __launch_bounds__(256) moco_l2_normalize_rows(const float *__restrict__ x,
                                                                         float *__restrict__ out,
                                                                         float *__restrict__ norms,
                                                                         uint32_t n, uint32_t c, float eps) {
    const uint32_t warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const uint32_t lane = threadIdx.x & 31;
    if (warp >= n) return;
    const float *row = x + (uint64_t)warp * c;
    float ss = 0.0f;
    for (uint32_t j = lane; j < c; j += 32) ss = fmaf(row[j], row[j], ss);
    ss = moco_warp_sum(ss);
    const float norm = sqrtf(ss);
    const float inv = 1.0f / fmaxf(norm, eps);
    float *o = out + (uint64_t)warp * c;
    for (uint32_t j = lane; j < c; j += 32) o[j] = row[j] * inv;
    if (lane == 0 && norms) norms[warp] = norm;
}

// logits[r, 0] = qn[r] . kn[r] / T (the other columns are written by a GEMM). One warp per row.
extern "C" __global__ void __launch_bounds__(256) moco_positive_logits(const float *__restrict__ qn,
                                                                       const float *__restrict__ kn,
                                                                       float *__restrict__ out,
                                                                       uint64_t out_stride,
                                                                       MocoContrastShape s) {
    const uint32_t warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const uint32_t lane = threadIdx.x & 31;
    if (warp >= s.n) return;
    float d = 0.0f;
    for (uint32_t j = lane; j < s.c; j += 32) d = fmaf(qn[(uint64_t)warp * s.c + j], kn[(uint64_t)warp * s.c + j], d);
    d = moco_warp_sum(d);
    if (lane == 0) out[(uint64_t)warp * out_stride] = d * s.inv_t;
}

// ---------------------------------------------------------------------------------------
// Fused path, pass 1: partial online softmax and sum_j p_j queue_j over a slice of the queue.
//
// Block: 256 threads as a 16 x 16 grid (ty, tx). Tile: BM = 64 query rows x BN = 64 keys x CP
// features (C padded with zeros to CP). Thread (ty, tx) owns rows ty + 16a (a < 4) and, for
// the logits, keys tx + 16b (b < 4); for the output, features tx*4 + 64g (g < CP/64).
// Shared rows are padded to CP + 4 floats so the strided float4 reads are conflict-free.
namespace {
constexpr int FBM = 64;
constexpr int FBN = 64;

template <int CP>
__device__ __forceinline__ void load_rows(float *__restrict__ dst, const float *__restrict__ src, uint64_t row0,
                                          uint64_t rows, uint32_t c) {
    constexpr int LD = CP + 4;
    if (c == CP && ((reinterpret_cast<uintptr_t>(src) & 15) == 0)) {
        // Fast path: whole rows of float4.
        constexpr int V = CP / 4;
        for (int i = threadIdx.x; i < FBM * V; i += blockDim.x) {
            const int r = i / V, v = i % V;
            float4 val = make_float4(0.f, 0.f, 0.f, 0.f);
            if (row0 + r < rows) val = __ldg(reinterpret_cast<const float4 *>(src + (row0 + r) * CP) + v);
            *reinterpret_cast<float4 *>(dst + r * LD + v * 4) = val;
        }
    } else {
        for (int i = threadIdx.x; i < FBM * CP; i += blockDim.x) {
            const int r = i / CP, j = i % CP;
            float val = 0.0f;
            if (row0 + r < rows && (uint32_t)j < c) val = __ldg(src + (row0 + r) * c + j);
            dst[r * LD + j] = val;
        }
    }
}

// Sum over the 16 lanes that share ty (lanes ty*16 .. ty*16+15 of a warp half).
__device__ __forceinline__ float sum16(float v) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(MOCO_FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float max16(float v) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(MOCO_FULL_MASK, v, o));
    return v;
}

template <int CP>
__device__ __forceinline__ void infonce_partial(const float *__restrict__ qn, const float *__restrict__ queue,
                                                MocoContrastShape s, uint32_t tiles_per_split,
                                                float *__restrict__ part_m, float *__restrict__ part_l,
                                                float *__restrict__ part_o) {
    constexpr int LD = CP + 4;
    constexpr int LDP = FBN + 4;
    constexpr int G = CP / 64;
    extern __shared__ float4 smem4[];
    float *Qs = reinterpret_cast<float *>(smem4);
    float *Ks = Qs + FBM * LD;
    float *Ps = Ks + FBN * LD;

    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const uint64_t row0 = (uint64_t)blockIdx.x * FBM;
    const uint32_t split = blockIdx.y;
    const uint64_t ntiles = (s.k + FBN - 1) / FBN;
    const uint64_t t_begin = (uint64_t)split * tiles_per_split;
    uint64_t t_end = t_begin + tiles_per_split;
    if (t_end > ntiles) t_end = ntiles;

    load_rows<CP>(Qs, qn, row0, s.n, s.c);

    float o[4][G * 4];
    float m[4], l[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        m[a] = MOCO_NEG_INF;
        l[a] = 0.0f;
#pragma unroll
        for (int j = 0; j < G * 4; ++j) o[a][j] = 0.0f;
    }

    for (uint64_t t = t_begin; t < t_end; ++t) {
        __syncthreads();  // previous tile's Ks / Ps fully consumed
        load_rows<CP>(Ks, queue, t * FBN, s.k, s.c);
        __syncthreads();

        // S = Q K^T for this thread's 4 x 4 (rows ty+16a, keys tx+16b).
        float acc[4][4];
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
            for (int b = 0; b < 4; ++b) acc[a][b] = 0.0f;
#pragma unroll 4
        for (int c = 0; c < CP; c += 4) {
            float4 qv[4], kv[4];
#pragma unroll
            for (int a = 0; a < 4; ++a) qv[a] = *reinterpret_cast<const float4 *>(Qs + (ty + 16 * a) * LD + c);
#pragma unroll
            for (int b = 0; b < 4; ++b) kv[b] = *reinterpret_cast<const float4 *>(Ks + (tx + 16 * b) * LD + c);
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    acc[a][b] = fmaf(qv[a].x, kv[b].x, acc[a][b]);
                    acc[a][b] = fmaf(qv[a].y, kv[b].y, acc[a][b]);
                    acc[a][b] = fmaf(qv[a].z, kv[b].z, acc[a][b]);
                    acc[a][b] = fmaf(qv[a].w, kv[b].w, acc[a][b]);
                }
        }

        // Online softmax update per row.
#pragma unroll
        for (int a = 0; a < 4; ++a) {
            float sv[4];
            float tmax = MOCO_NEG_INF;
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                const uint64_t key = t * FBN + tx + 16 * b;
                sv[b] = key < s.k ? acc[a][b] * s.inv_t : MOCO_NEG_INF;
                tmax = fmaxf(tmax, sv[b]);
            }
            tmax = max16(tmax);
            const float m_new = fmaxf(m[a], tmax);  // finite: every tile has a valid key
            const float scale = expf(m[a] - m_new);
            float psum = 0.0f;
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                const float p = expf(sv[b] - m_new);
                psum += p;
                Ps[(ty + 16 * a) * LDP + tx + 16 * b] = p;
            }
            psum = sum16(psum);
            l[a] = l[a] * scale + psum;
            m[a] = m_new;
#pragma unroll
            for (int j = 0; j < G * 4; ++j) o[a][j] *= scale;
        }
        __syncthreads();

        // O += P V with V = this tile of the queue.
#pragma unroll 2
        for (int j = 0; j < FBN; j += 4) {
            float4 pv[4];
#pragma unroll
            for (int a = 0; a < 4; ++a) pv[a] = *reinterpret_cast<const float4 *>(Ps + (ty + 16 * a) * LDP + j);
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
                for (int g = 0; g < G; ++g) {
                    const float4 v = *reinterpret_cast<const float4 *>(Ks + (j + jj) * LD + g * 64 + tx * 4);
#pragma unroll
                    for (int a = 0; a < 4; ++a) {
                        const float p = jj == 0 ? pv[a].x : jj == 1 ? pv[a].y : jj == 2 ? pv[a].z : pv[a].w;
                        o[a][g * 4 + 0] = fmaf(p, v.x, o[a][g * 4 + 0]);
                        o[a][g * 4 + 1] = fmaf(p, v.y, o[a][g * 4 + 1]);
                        o[a][g * 4 + 2] = fmaf(p, v.z, o[a][g * 4 + 2]);
                        o[a][g * 4 + 3] = fmaf(p, v.w, o[a][g * 4 + 3]);
                    }
                }
            }
        }
    }

    // Partials: m, l per (split, row); O per (split, row, feature) with row stride CP.
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        const uint64_t r = row0 + ty + 16 * a;
        if (r >= s.n) continue;
        const uint64_t pr = (uint64_t)split * s.n + r;
        if (tx == 0) {
            part_m[pr] = m[a];
            part_l[pr] = l[a];
        }
#pragma unroll
        for (int g = 0; g < G; ++g)
            *reinterpret_cast<float4 *>(part_o + pr * CP + g * 64 + tx * 4) =
                make_float4(o[a][g * 4 + 0], o[a][g * 4 + 1], o[a][g * 4 + 2], o[a][g * 4 + 3]);
    }
}
}  // namespace

#define MOCO_PARTIAL(CP)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) moco_infonce_partial_c##CP(                          \
        const float *__restrict__ qn, const float *__restrict__ queue, MocoContrastShape s,                \
        uint32_t tiles_per_split, float *__restrict__ part_m, float *__restrict__ part_l,                  \
        float *__restrict__ part_o) {                                                                      \
        infonce_partial<CP>(qn, queue, s, tiles_per_split, part_m, part_l, part_o);                        \
    }
MOCO_PARTIAL(64)
MOCO_PARTIAL(128)
MOCO_PARTIAL(256)

// Fused path, pass 2: one block per row. Merges the split partials with the positive,
// writes the row's loss and top-1 hit, and dL/dq through the normalization.
// Shared memory: splits floats (partial weights) + cp floats (the row's gradient wrt qn).
extern "C" __global__ void __launch_bounds__(256) moco_infonce_combine(
    const float *__restrict__ qn, const float *__restrict__ norms, const float *__restrict__ kn,
    const float *__restrict__ part_m, const float *__restrict__ part_l, const float *__restrict__ part_o,
    uint32_t splits, uint32_t cp, MocoContrastShape s, float *__restrict__ grad_q, float *__restrict__ loss_row,
    float *__restrict__ correct_row) {
    extern __shared__ float4 smem4[];
    float *w = reinterpret_cast<float *>(smem4);  // [splits]
    float *g = w + splits;                        // [c]
    __shared__ float red[32];
    const uint32_t r = blockIdx.x;
    const float *q = qn + (uint64_t)r * s.c;
    const float *k = kn + (uint64_t)r * s.c;

    // Max over the negatives, then the split weights exp(m_s - M).
    float mx = MOCO_NEG_INF;
    for (uint32_t i = 0; i < splits; ++i) mx = fmaxf(mx, part_m[(uint64_t)i * s.n + r]);
    float lsum = 0.0f;
    for (uint32_t i = threadIdx.x; i < splits; i += blockDim.x) {
        const float wi = expf(part_m[(uint64_t)i * s.n + r] - mx);
        w[i] = wi;
        lsum += part_l[(uint64_t)i * s.n + r] * wi;
    }
    lsum = moco_block_sum(lsum, red);

    float d = 0.0f;
    for (uint32_t j = threadIdx.x; j < s.c; j += blockDim.x) d = fmaf(q[j], k[j], d);
    const float l0 = moco_block_sum(d, red) * s.inv_t;

    const float mt = fmaxf(mx, l0);
    const float wneg = expf(mx - mt), wpos = expf(l0 - mt);
    const float lt = lsum * wneg + wpos;
    const float inv_lt = 1.0f / lt;
    const float scale = s.inv_t / (float)s.n;
    __syncthreads();  // w visible

    float qg = 0.0f;
    for (uint32_t j = threadIdx.x; j < s.c; j += blockDim.x) {
        float acc = 0.0f;
        for (uint32_t i = 0; i < splits; ++i) acc = fmaf(part_o[((uint64_t)i * s.n + r) * cp + j], w[i], acc);
        const float pk = (acc * wneg + wpos * k[j]) * inv_lt;  // sum_j p_j key_j
        const float gj = (pk - k[j]) * scale;
        g[j] = gj;
        qg = fmaf(q[j], gj, qg);
    }
    qg = moco_block_sum(qg, red);
    const float norm = norms[r];
    for (uint32_t j = threadIdx.x; j < s.c; j += blockDim.x)
        grad_q[(uint64_t)r * s.c + j] = norm_backward(g[j], q[j], qg, norm, s.eps);
    if (threadIdx.x == 0) {
        loss_row[r] = mt + logf(lt) - l0;
        correct_row[r] = l0 >= mx ? 1.0f : 0.0f;
    }
}

// ---------------------------------------------------------------------------------------
// Unfused path: S = qn queue^T / T comes from a GEMM (N x K, row stride ld). One block per
// row turns it, in place, into P / (N T) = softmax / (N T) over [l_0, S_row], writes the
// row's loss and hit, and coef0[r] = (p_0 - 1) / (N T), the weight of kn in dL/dqn.
extern "C" __global__ void __launch_bounds__(256) moco_softmax_ce_rows(float *__restrict__ logits, uint64_t ld,
                                                                       const float *__restrict__ qn,
                                                                       const float *__restrict__ kn,
                                                                       MocoContrastShape s,
                                                                       float *__restrict__ coef0,
                                                                       float *__restrict__ loss_row,
                                                                       float *__restrict__ correct_row) {
    __shared__ float red[32];
    const uint32_t r = blockIdx.x;
    float *row = logits + (uint64_t)r * ld;
    float d = 0.0f;
    for (uint32_t j = threadIdx.x; j < s.c; j += blockDim.x)
        d = fmaf(qn[(uint64_t)r * s.c + j], kn[(uint64_t)r * s.c + j], d);
    const float l0 = moco_block_sum(d, red) * s.inv_t;

    float mx = MOCO_NEG_INF;
    for (uint64_t j = threadIdx.x; j < s.k; j += blockDim.x) mx = fmaxf(mx, row[j]);
    mx = moco_warp_max(mx);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = mx;
    __syncthreads();
    mx = MOCO_NEG_INF;
    for (int i = 0; i < (int)((blockDim.x + 31) >> 5); ++i) mx = fmaxf(mx, red[i]);

    const float mt = fmaxf(mx, l0);
    float sum = 0.0f;
    for (uint64_t j = threadIdx.x; j < s.k; j += blockDim.x) sum += expf(row[j] - mt);
    sum = moco_block_sum(sum, red) + expf(l0 - mt);
    const float lse = mt + logf(sum);
    const float scale = s.inv_t / (float)s.n;
    for (uint64_t j = threadIdx.x; j < s.k; j += blockDim.x) row[j] = expf(row[j] - lse) * scale;
    if (threadIdx.x == 0) {
        coef0[r] = (expf(l0 - lse) - 1.0f) * scale;
        loss_row[r] = lse - l0;
        correct_row[r] = l0 >= mx ? 1.0f : 0.0f;
    }
}

// Unfused path, last step: g = G[r] + coef0[r] kn[r] (G = P queue from a GEMM), then the
// normalization backward. One block per row; shared memory: c floats.
extern "C" __global__ void __launch_bounds__(256) moco_infonce_finish(const float *__restrict__ gemm_g,
                                                                      const float *__restrict__ coef0,
                                                                      const float *__restrict__ qn,
                                                                      const float *__restrict__ norms,
                                                                      const float *__restrict__ kn,
                                                                      MocoContrastShape s,
                                                                      float *__restrict__ grad_q) {
    extern __shared__ float4 smem4[];
    float *g = reinterpret_cast<float *>(smem4);
    __shared__ float red[32];
    const uint32_t r = blockIdx.x;
    const uint64_t base = (uint64_t)r * s.c;
    const float c0 = coef0[r];
    float qg = 0.0f;
    for (uint32_t j = threadIdx.x; j < s.c; j += blockDim.x) {
        const float gj = gemm_g[base + j] + c0 * kn[base + j];
        g[j] = gj;
        qg = fmaf(qn[base + j], gj, qg);
    }
    qg = moco_block_sum(qg, red);
    const float norm = norms[r];
    for (uint32_t j = threadIdx.x; j < s.c; j += blockDim.x)
        grad_q[base + j] = norm_backward(g[j], qn[base + j], qg, norm, s.eps);
}
