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
