// queue.cu: circular enqueue of N keys into a K x C queue (one key per row).
//
// Row i of `keys` goes to row (ptr + i) mod K, so a batch that runs past the end wraps to
// the start (the reference implementation instead asserts K % N == 0). N <= K is checked
// on the host. Pure copy: 8 bytes moved per element.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) moco_enqueue_f32(float *__restrict__ queue,
                                                                   const float *__restrict__ keys,
                                                                   MocoEnqueueArgs a) {
    const uint64_t total = a.n * a.c;
    for (uint64_t i = moco_global_tid(); i < total; i += moco_grid_threads()) {
        const uint64_t r = i / a.c, j = i - r * a.c;
        uint64_t dst = a.ptr + r;
        if (dst >= a.k) dst -= a.k;
        queue[dst * a.c + j] = keys[i];
    }
}

// The same enqueue into a queue stored in bf16 (`--queue-dtype bf16`: half the memory); each
// f32 key element is rounded to nearest even.
extern "C" __global__ void __launch_bounds__(256) moco_enqueue_bf16(__nv_bfloat16 *__restrict__ queue,
                                                                    const float *__restrict__ keys,
                                                                    MocoEnqueueArgs a) {
    const uint64_t total = a.n * a.c;
    for (uint64_t i = moco_global_tid(); i < total; i += moco_grid_threads()) {
        const uint64_t r = i / a.c, j = i - r * a.c;
        uint64_t dst = a.ptr + r;
        if (dst >= a.k) dst -= a.k;
        queue[dst * a.c + j] = __float2bfloat16_rn(keys[i]);
    }
}
