/*
 * abi_layout.c: host-side shim compiled by build.rs with `cc`. It reports what the C
 * compiler thinks of the structs in moco_abi.h, so tests can prove the Rust mirror that
 * bindgen generated has the same sizes, alignments and field offsets.
 */
#include <stddef.h>
#include "moco_abi.h"

#define ENTRY(T, F) { #T "." #F, offsetof(T, F) }
#define SIZE(T) { #T, sizeof(T) }

typedef struct MocoLayoutEntry {
    const char *name;
    size_t value;
} MocoLayoutEntry;

static const MocoLayoutEntry MOCO_LAYOUT[] = {
    SIZE(MocoEmaArgs),
    ENTRY(MocoEmaArgs, n),
    ENTRY(MocoEmaArgs, m),
    ENTRY(MocoEmaArgs, one_minus_m),
    SIZE(MocoTensorPair),
    ENTRY(MocoTensorPair, key),
    ENTRY(MocoTensorPair, query),
    ENTRY(MocoTensorPair, len),
    SIZE(MocoTensorChunk),
    ENTRY(MocoTensorChunk, pair),
    ENTRY(MocoTensorChunk, start),
    SIZE(MocoContrastShape),
    ENTRY(MocoContrastShape, n),
    ENTRY(MocoContrastShape, c),
    ENTRY(MocoContrastShape, k),
    ENTRY(MocoContrastShape, inv_t),
    ENTRY(MocoContrastShape, eps),
    SIZE(MocoEnqueueArgs),
    ENTRY(MocoEnqueueArgs, n),
    ENTRY(MocoEnqueueArgs, c),
    ENTRY(MocoEnqueueArgs, k),
    ENTRY(MocoEnqueueArgs, ptr),
    SIZE(MocoConvShape),
    ENTRY(MocoConvShape, nb),
    ENTRY(MocoConvShape, cin),
    ENTRY(MocoConvShape, h),
    ENTRY(MocoConvShape, w),
    ENTRY(MocoConvShape, k),
    ENTRY(MocoConvShape, stride),
    ENTRY(MocoConvShape, pad),
    ENTRY(MocoConvShape, ho),
    ENTRY(MocoConvShape, wo),
    SIZE(MocoPoolShape),
    ENTRY(MocoPoolShape, planes),
    ENTRY(MocoPoolShape, h),
    ENTRY(MocoPoolShape, w),
    ENTRY(MocoPoolShape, k),
    ENTRY(MocoPoolShape, stride),
    ENTRY(MocoPoolShape, pad),
    ENTRY(MocoPoolShape, ho),
    ENTRY(MocoPoolShape, wo),
    SIZE(MocoBnShape),
    ENTRY(MocoBnShape, n),
    ENTRY(MocoBnShape, c),
    ENTRY(MocoBnShape, hw),
    ENTRY(MocoBnShape, groups),
    { "MocoDType", sizeof(MocoDType) },
    { "MOCO_ABI_VERSION", MOCO_ABI_VERSION },
};

size_t moco_abi_layout_len(void) { return sizeof(MOCO_LAYOUT) / sizeof(MOCO_LAYOUT[0]); }

/* Writes the name of entry i into *name and returns its value; (size_t)-1 past the end. */
size_t moco_abi_layout_entry(size_t i, const char **name) {
    if (i >= moco_abi_layout_len()) return (size_t)-1;
    *name = MOCO_LAYOUT[i].name;
    return MOCO_LAYOUT[i].value;
}
