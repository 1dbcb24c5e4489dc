// conv.cu: the data movement around the cuBLAS GEMMs of a convolution (im2col, col2im and a
// permutation between NCHW and channel-major layouts).
//
// Layout over a chunk of nb samples: col is (Cin K K) x (nb Ho Wo), row r = (ci K + ky) K + kx,
// column = n (Ho Wo) + oy Wo + ox. Forward: Yt (Cout x nb HoWo) = W col, then Yt -> NCHW.
// Backward: dYt = NCHW -> Cout x nb HoWo; dW += dYt col^T; dcol = W^T dYt; dx = col2im(dcol).
// col2im gathers (each input element sums its own contributions): no atomics, deterministic.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256)
moco_im2col_f32(const float *__restrict__ x, float *__restrict__ col, MocoConvShape s) {
    const uint32_t nb = s.nb, cin = s.cin, h = s.h, w = s.w, k = s.k, stride = s.stride, pad = s.pad,
                   ho = s.ho, wo = s.wo;
    const uint64_t hwo = (uint64_t)ho * wo;
    const uint64_t total = (uint64_t)cin * k * k * nb * hwo;
    for (uint64_t i = moco_global_tid(); i < total; i += moco_grid_threads()) {
        const uint64_t p = i % hwo;
        const uint64_t t = i / hwo;
        const uint64_t n = t % nb;
        const uint64_t r = t / nb;
        const uint32_t kx = (uint32_t)(r % k);
        const uint32_t ky = (uint32_t)((r / k) % k);
        const uint64_t ci = r / ((uint64_t)k * k);
        const int oy = (int)(p / wo), ox = (int)(p % wo);
        const int iy = oy * (int)stride - (int)pad + (int)ky;
        const int ix = ox * (int)stride - (int)pad + (int)kx;
        float v = 0.0f;
        if (iy >= 0 && ix >= 0 && iy < (int)h && ix < (int)w)
            v = x[((n * cin + ci) * h + (uint64_t)iy) * w + (uint64_t)ix];
        col[i] = v;
    }
}

extern "C" __global__ void __launch_bounds__(256)
moco_col2im_f32(const float *__restrict__ dcol, float *__restrict__ dx, MocoConvShape s) {
    const uint32_t nb = s.nb, cin = s.cin, h = s.h, w = s.w, k = s.k, stride = s.stride, pad = s.pad,
                   ho = s.ho, wo = s.wo;
    const uint64_t hwo = (uint64_t)ho * wo;
    const uint64_t total = (uint64_t)nb * cin * h * w;
    for (uint64_t i = moco_global_tid(); i < total; i += moco_grid_threads()) {
        const int ix = (int)(i % w);
        const int iy = (int)((i / w) % h);
        const uint64_t ci = (i / ((uint64_t)h * w)) % cin;
        const uint64_t n = i / ((uint64_t)cin * h * w);
        float acc = 0.0f;
        for (uint32_t ky = 0; ky < k; ++ky) {
            const int ty = iy + (int)pad - (int)ky;
            if (ty < 0 || ty % (int)stride != 0) continue;
            const int oy = ty / (int)stride;
            if (oy >= (int)ho) continue;
            for (uint32_t kx = 0; kx < k; ++kx) {
                const int tx = ix + (int)pad - (int)kx;
                if (tx < 0 || tx % (int)stride != 0) continue;
                const int ox = tx / (int)stride;
                if (ox >= (int)wo) continue;
                const uint64_t r = (ci * k + ky) * k + kx;
                acc += dcol[(r * nb + n) * hwo + (uint64_t)oy * wo + (uint64_t)ox];
            }
        }
        dx[i] = acc;
    }
}

// dst[b][a][p] = src[a][b][p]: swaps the two leading dimensions (NCHW <-> C x N x HW).
extern "C" __global__ void __launch_bounds__(256)
moco_permute01_f32(const float *__restrict__ src, float *__restrict__ dst, uint64_t a, uint64_t b,
                   uint64_t p) {
    const uint64_t total = a * b * p;
    for (uint64_t i = moco_global_tid(); i < total; i += moco_grid_threads()) {
        const uint64_t pp = i % p;
        const uint64_t t = i / p;
        const uint64_t ai = t % a;
        const uint64_t bi = t / a;
        dst[i] = src[(ai * b + bi) * p + pp];
    }
}
