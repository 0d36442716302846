/* Keeping the optimiser out of the contract programs (contract.c,
 * contract.cc): a value or pointer passed through here is opaque to the
 * compiler, so no -Walloc-size-larger-than on constant huge sizes, no
 * alignment assumed from alloc_align/malloc attributes, no malloc/free or
 * new/delete pair elided, no size folded. C and C++ alike. */
#ifndef HAKMEM_CONFORMANCE_OPAQUE_H
#define HAKMEM_CONFORMANCE_OPAQUE_H

#include <stddef.h>

static size_t opaque(size_t v)
{
    __asm__ volatile("" : "+r"(v));
    return v;
}

static void *opaque_ptr(void *p)
{
    __asm__ volatile("" : "+r"(p));
    return p;
}

#endif
