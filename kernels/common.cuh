// common.cuh: helpers shared by the kernels (vector loads, reductions, grid sizing).
#pragma once
#include <stdint.h>
#include "moco_abi.h"
#include <cuda_bf16.h>

#define MOCO_FULL_MASK 0xffffffffu

// True when p is aligned to `bytes` (a power of two).
__device__ __forceinline__ bool moco_is_aligned(const void *p, uintptr_t bytes) {
    return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

__device__ __forceinline__ float moco_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(MOCO_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float moco_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(MOCO_FULL_MASK, v, o));
    return v;
}

// Block-wide sum; every thread gets the result. `scratch` holds >= 32 floats.
__device__ __forceinline__ float moco_block_sum(float v, float *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = moco_warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < warps) ? scratch[lane] : 0.0f;
    return moco_warp_sum(v);
}

// Grid-stride index helpers with 64-bit sizes.
__device__ __forceinline__ uint64_t moco_global_tid() {
    return (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ uint64_t moco_grid_threads() {
    return (uint64_t)gridDim.x * blockDim.x;
}
