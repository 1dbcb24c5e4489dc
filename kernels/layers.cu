// layers.cu: elementwise and pooling layers of the ResNet (ReLU, residual add, max-pool,
// global average pool, linear-layer bias). Gathers only: no atomics, deterministic.
#include "common.cuh"

// x = max(x, 0) in place (NaN propagates, as in PyTorch).
extern "C" __global__ void __launch_bounds__(256) moco_relu_f32(float *__restrict__ x, uint64_t n) {
    for (uint64_t i = moco_global_tid(); i < n; i += moco_grid_threads()) {
        const float v = x[i];
        x[i] = (v <= 0.0f) ? 0.0f : v;
    }
}

// dy *= (y > 0) in place.
extern "C" __global__ void __launch_bounds__(256)
moco_relu_bwd_f32(const float *__restrict__ y, float *__restrict__ dy, uint64_t n) {
    for (uint64_t i = moco_global_tid(); i < n; i += moco_grid_threads())
        if (!(y[i] > 0.0f)) dy[i] = 0.0f;
}

// a += b.
extern "C" __global__ void __launch_bounds__(256)
moco_add_f32(float *__restrict__ a, const float *__restrict__ b, uint64_t n) {
    for (uint64_t i = moco_global_tid(); i < n; i += moco_grid_threads()) a[i] += b[i];
}

// Max-pool, one thread per output; the first maximum in scan order wins (PyTorch).
extern "C" __global__ void __launch_bounds__(256)
moco_maxpool_f32(const float *__restrict__ x, float *__restrict__ y, uint32_t *__restrict__ idx,
                 MocoPoolShape s) {
    const uint64_t planes = s.planes;
    const uint32_t h = s.h, w = s.w, k = s.k, stride = s.stride, pad = s.pad, ho = s.ho, wo = s.wo;
    const uint64_t total = planes * ho * wo;
    for (uint64_t i = moco_global_tid(); i < total; i += moco_grid_threads()) {
        const int ox = (int)(i % wo), oy = (int)((i / wo) % ho);
        const uint64_t p = i / ((uint64_t)ho * wo);
        const float *xp = x + p * h * w;
        const int y0 = oy * (int)stride - (int)pad, x0 = ox * (int)stride - (int)pad;
        const int y1 = min(y0 + (int)k, (int)h), x1 = min(x0 + (int)k, (int)w);
        float best = -INFINITY;
        int bi = -1;
        for (int iy = max(y0, 0); iy < y1; ++iy)
            for (int ix = max(x0, 0); ix < x1; ++ix) {
                const int j = iy * (int)w + ix;
                const float v = xp[j];
                if (bi < 0 || v > best || (v != v && best == best)) {
                    best = v;
                    bi = j;
                }
            }
        y[i] = best;
        idx[i] = (uint32_t)bi;
    }
}

// Max-pool backward, one thread per input element: sums dy over the windows that chose it.
extern "C" __global__ void __launch_bounds__(256)
moco_maxpool_bwd_f32(const float *__restrict__ dy, const uint32_t *__restrict__ idx,
                     float *__restrict__ dx, MocoPoolShape s) {
    const uint64_t planes = s.planes;
    const uint32_t h = s.h, w = s.w, k = s.k, stride = s.stride, pad = s.pad, ho = s.ho, wo = s.wo;
    const uint64_t total = planes * h * w;
    for (uint64_t i = moco_global_tid(); i < total; i += moco_grid_threads()) {
        const int ix = (int)(i % w), iy = (int)((i / w) % h);
        const uint64_t p = i / ((uint64_t)h * w);
        const uint32_t j = (uint32_t)(iy * (int)w + ix);
        // Windows containing (iy, ix): oy * stride - pad <= iy < oy * stride - pad + k.
        const int oy0 = max(0, (iy + (int)pad - (int)k + (int)stride) / (int)stride);
        const int oy1 = min((int)ho - 1, (iy + (int)pad) / (int)stride);
        const int ox0 = max(0, (ix + (int)pad - (int)k + (int)stride) / (int)stride);
        const int ox1 = min((int)wo - 1, (ix + (int)pad) / (int)stride);
        float acc = 0.0f;
        for (int oy = oy0; oy <= oy1; ++oy)
            for (int ox = ox0; ox <= ox1; ++ox) {
                const uint64_t o = (p * ho + (uint64_t)oy) * wo + (uint64_t)ox;
                if (idx[o] == j) acc += dy[o];
            }
        dx[i] = acc;
    }
}

// Global average pool: one warp per plane.
extern "C" __global__ void __launch_bounds__(256)
moco_avgpool_f32(const float *__restrict__ x, float *__restrict__ y, uint64_t planes, uint64_t hw) {
    const uint64_t warp = moco_global_tid() / 32, lane = threadIdx.x & 31;
    const uint64_t warps = moco_grid_threads() / 32;
    for (uint64_t p = warp; p < planes; p += warps) {
        float s = 0.0f;
        for (uint64_t j = lane; j < hw; j += 32) s += x[p * hw + j];
        s = moco_warp_sum(s);
        if (lane == 0) y[p] = s / (float)hw;
    }
}

extern "C" __global__ void __launch_bounds__(256)
moco_avgpool_bwd_f32(const float *__restrict__ dy, float *__restrict__ dx, uint64_t planes, uint64_t hw) {
    const uint64_t total = planes * hw;
    for (uint64_t i = moco_global_tid(); i < total; i += moco_grid_threads()) dx[i] = dy[i / hw] / (float)hw;
}

// y[r][o] = b[o] for every row (the GEMM then adds x W^T).
extern "C" __global__ void __launch_bounds__(256)
moco_bias_rows_f32(float *__restrict__ y, const float *__restrict__ b, uint64_t rows, uint64_t cols) {
    const uint64_t total = rows * cols;
    for (uint64_t i = moco_global_tid(); i < total; i += moco_grid_threads()) y[i] = b[i % cols];
}

// db[o] += sum over rows of dy[r][o], one thread per column, rows in order.
extern "C" __global__ void __launch_bounds__(256)
moco_col_sum_acc_f32(const float *__restrict__ dy, float *__restrict__ db, uint64_t rows, uint64_t cols) {
    const uint64_t o = moco_global_tid();
    if (o >= cols) return;
    double s = 0.0;
    for (uint64_t r = 0; r < rows; ++r) s += dy[r * cols + o];
    db[o] = (float)((double)db[o] + s);
}

// count[0] += the number of elements of x that are NaN or infinite (the trainer's per-step
// state check). Each thread counts its share; only a thread that found one touches the
// counter, so a healthy buffer costs one read pass and no atomics.
extern "C" __global__ void __launch_bounds__(256)
moco_count_nonfinite_f32(const float *__restrict__ x, uint64_t n, unsigned long long *__restrict__ count) {
    unsigned long long bad = 0;
    for (uint64_t i = moco_global_tid(); i < n; i += moco_grid_threads())
        if (!isfinite(x[i])) ++bad;
    if (bad) atomicAdd(count, bad);
}

// out[i][j] = x[rows[i]][j] for nrows rows of row_len floats: the shuffle and unshuffle of
// shuffle-BN on the device. The host checked every index against x's row count.
extern "C" __global__ void __launch_bounds__(256)
moco_gather_rows_f32(const float *__restrict__ x, const uint32_t *__restrict__ rows, uint64_t nrows,
                     uint64_t row_len, float *__restrict__ out) {
    const uint64_t total = nrows * row_len;
    for (uint64_t i = moco_global_tid(); i < total; i += moco_grid_threads()) {
        const uint64_t r = i / row_len;
        out[i] = x[(uint64_t)rows[r] * row_len + (i - r * row_len)];
    }
}
