// optim.cu: SGD with momentum and weight decay (PyTorch semantics) in one pass over the flat
// parameter buffer: g = grad + wd p; buf = momentum buf + g; p -= lr buf.
// Memory bound: 20 bytes per parameter (read p, grad, buf; write p, buf).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256)
moco_sgd_f32(float *__restrict__ p, const float *__restrict__ grad, float *__restrict__ buf,
             uint64_t n, float lr, float momentum, float wd) {
    for (uint64_t i = moco_global_tid(); i < n; i += moco_grid_threads()) {
        const float d = grad[i] + wd * p[i];
        const float b = momentum * buf[i] + d;
        buf[i] = b;
        p[i] = p[i] - lr * b;
    }
}

// The same step writing the query encoder's bf16 copy (the weights a bf16 forward reads) in
// the same pass: p is updated exactly as moco_sgd_f32 does, then p_bf16 = round-to-nearest-
// even(p). 22 bytes per parameter.
extern "C" __global__ void __launch_bounds__(256)
moco_sgd_bf16copy_f32(float *__restrict__ p, const float *__restrict__ grad, float *__restrict__ buf,
                      __nv_bfloat16 *__restrict__ p_bf16, uint64_t n, float lr, float momentum, float wd) {
    for (uint64_t i = moco_global_tid(); i < n; i += moco_grid_threads()) {
        const float d = grad[i] + wd * p[i];
        const float b = momentum * buf[i] + d;
        buf[i] = b;
        const float np = p[i] - lr * b;
        p[i] = np;
        p_bf16[i] = __float2bfloat16_rn(np);
    }
}
