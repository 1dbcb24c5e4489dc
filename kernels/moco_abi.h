/*
 * moco_abi.h: the parameter structs and enums shared by the CUDA kernels and Rust.
 *
 * This header is the single source of truth for every struct passed to a kernel by value
 * or read by a kernel from device memory. bindgen generates its Rust mirror
 * (src/cuda/abi_generated.rs, committed); `cargo check --features regen-abi` proves the
 * committed file is what bindgen produces today, and a C shim (kernels/abi_layout.c,
 * compiled by build.rs with cc) reports the C compiler's sizes and offsets so a test can
 * compare them with Rust's.
 *
 * Rules: fixed-width fields only, 64-bit element counts (tensors can exceed 2^31
 * elements), no pointers-to-struct, no bool. Bump MOCO_ABI_VERSION on any change.
 */
#ifndef MOCO_ABI_H
#define MOCO_ABI_H

#include <stdint.h>

#define MOCO_ABI_VERSION 2

/* Momentum (EMA) update of a flat buffer: key = m * key + (1 - m) * query. */
typedef struct MocoEmaArgs {
    uint64_t n;          /* number of f32 elements */
    float m;             /* momentum, in [0, 1] */
    float one_minus_m;   /* 1 - m, computed on the host in f64 then rounded */
} MocoEmaArgs;

/* One (key, query) pair of the multi-tensor momentum update, read from device memory. */
typedef struct MocoTensorPair {
    uint64_t key;        /* device address of the key tensor (f32) */
    uint64_t query;      /* device address of the query tensor (f32) */
    uint64_t len;        /* elements in both */
} MocoTensorPair;

/* One block's share of the multi-tensor update: a chunk of one pair. */
typedef struct MocoTensorChunk {
    uint32_t pair;       /* index into the MocoTensorPair table */
    uint32_t reserved;
    uint64_t start;      /* first element of the chunk within the pair */
} MocoTensorChunk;

/* Shapes of the contrastive operations. q, k: N x C; queue: K x C (one key per row). */
typedef struct MocoContrastShape {
    uint32_t n;          /* queries in the batch */
    uint32_t c;          /* feature dimension */
    uint64_t k;          /* keys in the queue */
    float inv_t;         /* 1 / temperature */
    float eps;           /* normalization epsilon, 1e-12 as in F.normalize */
} MocoContrastShape;

/* Circular enqueue of n keys of width c into a K x C queue starting at row ptr. */
typedef struct MocoEnqueueArgs {
    uint64_t n;
    uint64_t c;
    uint64_t k;
    uint64_t ptr;
} MocoEnqueueArgs;

/* One chunk of a convolution for im2col / col2im: nb samples of cin x h x w, a k x k kernel
 * with stride and zero padding, output ho x wo. */
typedef struct MocoConvShape {
    uint32_t nb;
    uint32_t cin;
    uint32_t h;
    uint32_t w;
    uint32_t k;
    uint32_t stride;
    uint32_t pad;
    uint32_t ho;
    uint32_t wo;
} MocoConvShape;

/* A max-pool over planes independent h x w planes: k x k window, stride, padding (as -inf),
 * output ho x wo. */
typedef struct MocoPoolShape {
    uint64_t planes;
    uint32_t h;
    uint32_t w;
    uint32_t k;
    uint32_t stride;
    uint32_t pad;
    uint32_t ho;
    uint32_t wo;
    uint32_t reserved;
} MocoPoolShape;

/* A BatchNorm over n x c x hw, with statistics per group of samples (n % groups == b in
 * group b; groups = 1 is plain BatchNorm). */
typedef struct MocoBnShape {
    uint32_t n;
    uint32_t c;
    uint64_t hw;
    uint32_t groups;
    uint32_t reserved;
} MocoBnShape;

/* Element type of queue storage. */
typedef enum MocoDType {
    MOCO_DTYPE_F32 = 0,
    MOCO_DTYPE_BF16 = 1
} MocoDType;

#endif /* MOCO_ABI_H */
