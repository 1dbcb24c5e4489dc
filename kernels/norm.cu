// norm.cu: BatchNorm2d (training with split statistics, inference) forward and backward.
//
// x is N x C x HW; group b holds samples n with n % G == b (PyTorch's split BatchNorm).
// Statistics: one block per (channel, group), two passes (mean, then centered squares),
// accumulated in double. Elementwise kernels apply the per-(group, channel) affine maps.
// Every reduction has a fixed order, so results do not vary run to run.
#include "common.cuh"

namespace {
__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(MOCO_FULL_MASK, v, o);
    return v;
}
// Block-wide double sum; every thread gets the result. `scratch` holds >= 32 doubles.
__device__ __forceinline__ double block_sum_d(double v, double *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < warps) ? scratch[lane] : 0.0;
    return warp_sum_d(v);
}
// Element j of group b's values of channel ch (j in [0, N/G * HW)).
__device__ __forceinline__ uint64_t group_index(uint64_t j, uint64_t hw, uint32_t b, uint32_t g,
                                                uint32_t c, uint32_t ch) {
    const uint64_t nn = b + (j / hw) * g;
    return (nn * c + ch) * hw + j % hw;
}
}  // namespace

// grid (C, G). mean, invstd, var_unbiased: G x C.
extern "C" __global__ void __launch_bounds__(256)
moco_bn_stats_f32(const float *__restrict__ x, float *__restrict__ mean, float *__restrict__ invstd,
                  float *__restrict__ var_unbiased, MocoBnShape bn, float eps) {
    const uint32_t n = bn.n, c = bn.c, g = bn.groups;
    const uint64_t hw = bn.hw;
    __shared__ double scratch[32];
    const uint32_t ch = blockIdx.x, b = blockIdx.y;
    const uint64_t m = (uint64_t)(n / g) * hw;
    double s = 0.0;
    for (uint64_t j = threadIdx.x; j < m; j += blockDim.x) s += x[group_index(j, hw, b, g, c, ch)];
    const double mu = block_sum_d(s, scratch) / (double)m;
    double s2 = 0.0;
    for (uint64_t j = threadIdx.x; j < m; j += blockDim.x) {
        const double d = (double)x[group_index(j, hw, b, g, c, ch)] - mu;
        s2 += d * d;
    }
    const double var = block_sum_d(s2, scratch) / (double)m;
    if (threadIdx.x == 0) {
        mean[b * c + ch] = (float)mu;
        invstd[b * c + ch] = (float)(1.0 / sqrt(var + (double)eps));
        var_unbiased[b * c + ch] = (float)(m > 1 ? var * (double)m / (double)(m - 1) : var);
    }
}

// One thread per channel: running = (1 - mom) running + mom * mean over groups of the stats.
extern "C" __global__ void __launch_bounds__(256)
moco_bn_running_f32(float *__restrict__ running_mean, float *__restrict__ running_var,
                    const float *__restrict__ mean, const float *__restrict__ var_unbiased,
                    uint32_t c, uint32_t g, double mom) {
    const uint32_t ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double am = 0.0, av = 0.0;
    for (uint32_t b = 0; b < g; ++b) {
        am += mean[b * c + ch];
        av += var_unbiased[b * c + ch];
    }
    running_mean[ch] = (float)((1.0 - mom) * running_mean[ch] + mom * am / g);
    running_var[ch] = (float)((1.0 - mom) * running_var[ch] + mom * av / g);
}

// Inference statistics in the training layout (G = 1): mean = running_mean,
// invstd = 1 / sqrt(running_var + eps).
extern "C" __global__ void __launch_bounds__(256)
moco_bn_eval_stats_f32(const float *__restrict__ running_mean, const float *__restrict__ running_var,
                       float *__restrict__ mean, float *__restrict__ invstd, uint32_t c, float eps) {
    const uint32_t ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    mean[ch] = running_mean[ch];
    invstd[ch] = (float)(1.0 / sqrt((double)running_var[ch] + (double)eps));
}

// y = (x - mean[b, ch]) invstd[b, ch] gamma[ch] + beta[ch], then, in the same pass, + residual
// (when not null) and the ReLU (when relu): the fused epilogue of a ResNet block.
extern "C" __global__ void __launch_bounds__(256)
moco_bn_apply_f32(const float *__restrict__ x, float *__restrict__ y, const float *__restrict__ gamma,
                  const float *__restrict__ beta, const float *__restrict__ mean,
                  const float *__restrict__ invstd, MocoBnShape bn, const float *__restrict__ residual,
                  uint32_t relu) {
    const uint32_t n = bn.n, c = bn.c, g = bn.groups;
    const uint64_t hw = bn.hw;
    const uint64_t total = (uint64_t)n * c * hw;
    for (uint64_t i = moco_global_tid(); i < total; i += moco_grid_threads()) {
        const uint64_t plane = i / hw;
        const uint32_t ch = (uint32_t)(plane % c);
        const uint32_t b = (uint32_t)((plane / c) % g);
        // (x - mean) first: keeps the precision of values near the mean.
        const float scale = gamma[ch] * invstd[b * c + ch];
        float v = fmaf(x[i] - mean[b * c + ch], scale, beta[ch]);
        if (residual) v += residual[i];
        // NaN propagates, as in PyTorch (NaN <= 0 is false).
        if (relu && v <= 0.0f) v = 0.0f;
        y[i] = v;
    }
}

// The incoming gradient, through the ReLU that followed the BatchNorm when relu_out (that
// ReLU's output) is not null: dy where relu_out > 0, else 0.
__device__ __forceinline__ float masked_dy(const float *__restrict__ dy, const float *__restrict__ relu_out,
                                           uint64_t i) {
    return (relu_out && !(relu_out[i] > 0.0f)) ? 0.0f : dy[i];
}

// grid (C, G): sums[2 (b C + ch)] = sum dy, sums[2 (b C + ch) + 1] = sum dy xhat (dy masked
// by the ReLU after the BatchNorm when relu_out is not null).
extern "C" __global__ void __launch_bounds__(256)
moco_bn_bwd_reduce_f32(const float *__restrict__ x, const float *__restrict__ dy,
                       const float *__restrict__ mean, const float *__restrict__ invstd,
                       float *__restrict__ sums, MocoBnShape bn, const float *__restrict__ relu_out) {
    const uint32_t n = bn.n, c = bn.c, g = bn.groups;
    const uint64_t hw = bn.hw;
    __shared__ double scratch[32];
    const uint32_t ch = blockIdx.x, b = blockIdx.y;
    const uint64_t m = (uint64_t)(n / g) * hw;
    const double mu = mean[b * c + ch], is = invstd[b * c + ch];
    double sdy = 0.0, sdx = 0.0;
    for (uint64_t j = threadIdx.x; j < m; j += blockDim.x) {
        const uint64_t i = group_index(j, hw, b, g, c, ch);
        const double d = masked_dy(dy, relu_out, i);
        sdy += d;
        sdx += d * ((double)x[i] - mu) * is;
    }
    sdy = block_sum_d(sdy, scratch);
    sdx = block_sum_d(sdx, scratch);
    if (threadIdx.x == 0) {
        sums[2 * (b * c + ch)] = (float)sdy;
        sums[2 * (b * c + ch) + 1] = (float)sdx;
    }
}

// One thread per channel: dgamma += sum_b sdx, dbeta += sum_b sdy.
extern "C" __global__ void __launch_bounds__(256)
moco_bn_bwd_params_f32(const float *__restrict__ sums, float *__restrict__ dgamma,
                       float *__restrict__ dbeta, uint32_t c, uint32_t g) {
    const uint32_t ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double sdy = 0.0, sdx = 0.0;
    for (uint32_t b = 0; b < g; ++b) {
        sdy += sums[2 * (b * c + ch)];
        sdx += sums[2 * (b * c + ch) + 1];
    }
    dgamma[ch] = (float)((double)dgamma[ch] + sdx);
    dbeta[ch] = (float)((double)dbeta[ch] + sdy);
}

// Training mode: dx = gamma invstd (dy - sdy / M - xhat sdx / M). With train = 0 (inference
// statistics are constants): dx = gamma invstd dy. dy is masked by the ReLU after the
// BatchNorm when relu_out is not null.
extern "C" __global__ void __launch_bounds__(256)
moco_bn_bwd_dx_f32(const float *__restrict__ x, const float *__restrict__ dy, float *__restrict__ dx,
                   const float *__restrict__ gamma, const float *__restrict__ mean,
                   const float *__restrict__ invstd, const float *__restrict__ sums, MocoBnShape bn,
                   uint32_t train, const float *__restrict__ relu_out) {
    const uint32_t n = bn.n, c = bn.c, g = bn.groups;
    const uint64_t hw = bn.hw;
    const uint64_t total = (uint64_t)n * c * hw;
    const float inv_m = 1.0f / (float)((uint64_t)(n / g) * hw);
    for (uint64_t i = moco_global_tid(); i < total; i += moco_grid_threads()) {
        const uint64_t plane = i / hw;
        const uint32_t ch = (uint32_t)(plane % c);
        const uint32_t b = (uint32_t)((plane / c) % g);
        const uint32_t s = b * c + ch;
        const float is = invstd[s];
        const float a = gamma[ch] * is;
        if (train) {
            const float xhat = (x[i] - mean[s]) * is;
            dx[i] = a * (masked_dy(dy, relu_out, i) - sums[2 * s] * inv_m - xhat * sums[2 * s + 1] * inv_m);
        } else {
            dx[i] = a * masked_dy(dy, relu_out, i);
        }
    }
}
