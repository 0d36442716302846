/* A tool preloaded before hakmem that replaces only the C allocation
 * functions (malloc, calloc, realloc, free), counting calls and forwarding
 * each to the next definition with RTLD_NEXT (hakmem's), as leak checkers
 * and counters do. A C++ program's `new` must then reach it: hakmem's
 * operators forward to the C++ runtime's, which call `malloc`. Prints how
 * many mallocs it saw at exit.
 *
 * Build: cc -std=c11 -O1 -shared -fPIC malloc-tool.c -o libmalloc-tool.so -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

static void *(*next_malloc)(size_t);
static void *(*next_calloc)(size_t, size_t);
static void *(*next_realloc)(void *, size_t);
static void (*next_free)(void *);
static atomic_long mallocs;
static _Thread_local int resolving;
/* dlsym may call calloc before next_calloc is known. */
static char bootstrap[4096];

static void resolve(void)
{
    resolving = 1;
    next_malloc = dlsym(RTLD_NEXT, "malloc");
    next_calloc = dlsym(RTLD_NEXT, "calloc");
    next_realloc = dlsym(RTLD_NEXT, "realloc");
    next_free = dlsym(RTLD_NEXT, "free");
    resolving = 0;
    if (!next_malloc || !next_calloc || !next_realloc || !next_free)
        abort();
}

void *malloc(size_t n)
{
    if (!next_free)
        resolve();
    mallocs++;
    return next_malloc(n);
}

void *calloc(size_t n, size_t size)
{
    if (resolving)
        return n * size <= sizeof bootstrap ? bootstrap : NULL;
    if (!next_free)
        resolve();
    return next_calloc(n, size);
}

void *realloc(void *p, size_t n)
{
    if (!next_free)
        resolve();
    return next_realloc(p, n);
}

void free(void *p)
{
    if (p == bootstrap)
        return;
    if (!next_free)
        resolve();
    next_free(p);
}

__attribute__((destructor)) static void report(void)
{
    fprintf(stderr, "malloc-tool: mallocs=%ld\n", atomic_load(&mallocs));
}
