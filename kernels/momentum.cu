// momentum.cu: the momentum (EMA) update of the key encoder, key = m * key + (1 - m) * query.
//
// Memory bound: 12 bytes per element (read key, read query, write key). The fast path uses
// 16-byte vector loads when key and query share their alignment modulo 16 bytes; a scalar
// head brings the key to a 16-byte boundary and a scalar tail finishes. Otherwise a plain
// grid-stride scalar loop runs. Each thread keeps UNROLL vectors in flight for bandwidth.
#include "common.cuh"

namespace {
constexpr int UNROLL = 4;

__device__ __forceinline__ float ema(float k, float q, float m, float omm) {
    return fmaf(k, m, q * omm);
}

__device__ __forceinline__ void ema_range(float *__restrict__ key, const float *__restrict__ query,
                                          uint64_t n, float m, float omm) {
    // Scalar head until key is 16-byte aligned (at most 3 elements).
    uint64_t head = 0;
    if (((reinterpret_cast<uintptr_t>(key) ^ reinterpret_cast<uintptr_t>(query)) & 15) == 0) {
        head = ((16 - (reinterpret_cast<uintptr_t>(key) & 15)) & 15) / sizeof(float);
        if (head > n) head = n;
    } else {
        // Misaligned relative to each other: scalar grid-stride loop.
        for (uint64_t i = moco_global_tid(); i < n; i += moco_grid_threads())
            key[i] = ema(key[i], query[i], m, omm);
        return;
    }
    const uint64_t tid = moco_global_tid(), stride = moco_grid_threads();
    if (tid < head) key[tid] = ema(key[tid], query[tid], m, omm);

    float4 *k4 = reinterpret_cast<float4 *>(key + head);
    const float4 *q4 = reinterpret_cast<const float4 *>(query + head);
    const uint64_t n4 = (n - head) / 4;
    uint64_t i = tid;
    // Main loop: UNROLL independent vectors per thread per iteration.
    for (; i + (UNROLL - 1) * stride < n4; i += UNROLL * stride) {
        float4 kv[UNROLL], qv[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            kv[u] = k4[i + u * stride];
            qv[u] = __ldg(&q4[i + u * stride]);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            float4 r;
            r.x = ema(kv[u].x, qv[u].x, m, omm);
            r.y = ema(kv[u].y, qv[u].y, m, omm);
            r.z = ema(kv[u].z, qv[u].z, m, omm);
            r.w = ema(kv[u].w, qv[u].w, m, omm);
            k4[i + u * stride] = r;
        }
    }
    for (; i < n4; i += stride) {
        float4 kv = k4[i];
        const float4 qv = __ldg(&q4[i]);
        kv.x = ema(kv.x, qv.x, m, omm);
        kv.y = ema(kv.y, qv.y, m, omm);
        kv.z = ema(kv.z, qv.z, m, omm);
        kv.w = ema(kv.w, qv.w, m, omm);
        k4[i] = kv;
    }
    // Scalar tail (at most 3 elements).
    const uint64_t tail_start = head + n4 * 4;
    if (tail_start + tid < n) key[tail_start + tid] = ema(key[tail_start + tid], query[tail_start + tid], m, omm);
}
}  // namespace

// Flat-buffer form: one launch over n contiguous elements.
extern "C" __global__ void __launch_bounds__(256) moco_ema_f32(float *__restrict__ key,
                                                               const float *__restrict__ query,
                                                               MocoEmaArgs args) {
    ema_range(key, query, args.n, args.m, args.one_minus_m);
}

// Multi-tensor form: block b updates chunk chunks[b] of pair table `pairs`, chunk_len elements
// at most. One launch covers every (key, query) pair, however scattered in memory.
extern "C" __global__ void __launch_bounds__(256) moco_ema_multi_f32(const MocoTensorPair *__restrict__ pairs,
                                                                     const MocoTensorChunk *__restrict__ chunks,
                                                                     uint64_t chunk_len, float m, float omm) {
    const MocoTensorChunk ch = chunks[blockIdx.x];
    const MocoTensorPair p = pairs[ch.pair];
    float *key = reinterpret_cast<float *>(p.key) + ch.start;
    const float *query = reinterpret_cast<const float *>(p.query) + ch.start;
    uint64_t n = p.len - ch.start;
    if (n > chunk_len) n = chunk_len;
    // Block-local loop: reuse ema_range semantics with a block-sized "grid".
    const bool vec = (((reinterpret_cast<uintptr_t>(key) | reinterpret_cast<uintptr_t>(query)) & 15) == 0);
    if (vec) {
        float4 *k4 = reinterpret_cast<float4 *>(key);
        const float4 *q4 = reinterpret_cast<const float4 *>(query);
        const uint64_t n4 = n / 4;
        for (uint64_t i = threadIdx.x; i < n4; i += blockDim.x) {
            float4 kv = k4[i];
            const float4 qv = __ldg(&q4[i]);
            kv.x = ema(kv.x, qv.x, m, omm);
            kv.y = ema(kv.y, qv.y, m, omm);
            kv.z = ema(kv.z, qv.z, m, omm);
            kv.w = ema(kv.w, qv.w, m, omm);
            k4[i] = kv;
        }
        for (uint64_t i = n4 * 4 + threadIdx.x; i < n; i += blockDim.x) key[i] = ema(key[i], query[i], m, omm);
    } else {
        for (uint64_t i = threadIdx.x; i < n; i += blockDim.x) key[i] = ema(key[i], query[i], m, omm);
    }
}

// Flat-buffer form that also writes the key encoder's bf16 copy in the same pass (the
// weights a bf16 forward reads): key = m key + (1 - m) query in f32 exactly as moco_ema_f32,
// then key_bf16 = round-to-nearest-even(key). 14 bytes per element; scalar grid-stride (the
// bf16 store breaks the float4 alignment pairing of the f32-only kernel).
extern "C" __global__ void __launch_bounds__(256) moco_ema_bf16copy_f32(float *__restrict__ key,
                                                                       const float *__restrict__ query,
                                                                       __nv_bfloat16 *__restrict__ key_bf16,
                                                                       MocoEmaArgs args) {
    for (uint64_t i = moco_global_tid(); i < args.n; i += moco_grid_threads()) {
        const float k = ema(key[i], query[i], args.m, args.one_minus_m);
        key[i] = k;
        key_bf16[i] = __float2bfloat16_rn(k);
    }
}
