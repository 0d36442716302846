// live-peak: a preload that records the most bytes a program held at once
// (the sum of malloc_usable_size over its live blocks), to put a program's
// peak RSS beside what it asked for under each allocator. Written for
// mimalloc-bench's rptest, whose peak RSS depends on how many blocks its
// threads hold at once, and that depends on their relative progress
// (docs/performance.md, nineteenth session).
//
//   gcc -O2 -shared -fPIC -o live-peak.so benches/live-peak.c -ldl
//   LD_PRELOAD="live-peak.so ALLOCATOR.so" PROGRAM   # prints "live-peak: N KiB"
//
// It goes first in LD_PRELOAD and forwards every C allocation call to the
// next definition (the allocator under test); the allocator's own
// malloc_usable_size measures each block, so a block counts what the
// allocator gave, not what was asked (an allocator with coarser classes
// reads a little higher: for rptest's sizes hakmem's mid classes give 8.7%
// more than asked, classes eight to a doubling 4.6%). Each thread sums its
// changes and adds them to the process's total every 64 calls and when it
// exits, so the peak it reports may be off by up to 64 blocks a thread
// either way (a total updated at every call made two threads share one
// cache line a million times a second and slowed rptest down). Only for C
// programs: C++'s operator new and delete reach the allocator directly
// under allocators that define them.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FLUSH_EVERY 64

static void *(*next_malloc)(size_t);
static void *(*next_calloc)(size_t, size_t);
static void *(*next_realloc)(void *, size_t);
static void *(*next_memalign)(size_t, size_t);
static void *(*next_aligned_alloc)(size_t, size_t);
static int (*next_posix_memalign)(void **, size_t, size_t);
static void *(*next_valloc)(size_t);
static void *(*next_pvalloc)(size_t);
static void (*next_free)(void *);
static size_t (*next_usable_size)(void *);

static _Atomic long live, peak;
static __thread long delta;
static __thread int calls;
static __thread int registered;
static pthread_key_t at_exit;

// dlsym may allocate while `resolve` runs: a static buffer serves that.
static char bootstrap[4096];
static atomic_int bootstrap_used;

static void *from_bootstrap(size_t bytes) {
    if (bytes > sizeof bootstrap || atomic_exchange(&bootstrap_used, 1))
        return NULL;
    return bootstrap;
}

static void flush(void);
static void flush_at_exit(void *unused) {
    (void)unused;
    flush();
}

static __thread int resolving;

static void resolve(void) {
    resolving = 1;
    next_malloc = dlsym(RTLD_NEXT, "malloc");
    next_calloc = dlsym(RTLD_NEXT, "calloc");
    next_realloc = dlsym(RTLD_NEXT, "realloc");
    next_memalign = dlsym(RTLD_NEXT, "memalign");
    next_aligned_alloc = dlsym(RTLD_NEXT, "aligned_alloc");
    next_posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
    next_valloc = dlsym(RTLD_NEXT, "valloc");
    next_pvalloc = dlsym(RTLD_NEXT, "pvalloc");
    next_usable_size = dlsym(RTLD_NEXT, "malloc_usable_size");
    next_free = dlsym(RTLD_NEXT, "free");
    if (!next_malloc || !next_calloc || !next_realloc || !next_memalign || !next_aligned_alloc ||
        !next_posix_memalign || !next_valloc || !next_pvalloc || !next_usable_size ||
        !next_free) {
        fputs("live-peak: an allocation function has no next definition\n", stderr);
        abort();
    }
    pthread_key_create(&at_exit, flush_at_exit);
    resolving = 0;
}

static inline void ensure_resolved(void) {
    if (!next_free)
        resolve();
}

static void flush(void) {
    long now = atomic_fetch_add(&live, delta) + delta;
    delta = 0;
    calls = 0;
    long seen = atomic_load(&peak);
    while (now > seen && !atomic_compare_exchange_weak(&peak, &seen, now)) {
    }
}

static inline void count(long bytes) {
    if (!registered) {
        // Set first: pthread_setspecific may allocate, which counts.
        registered = 1;
        pthread_setspecific(at_exit, &registered);
    }
    delta += bytes;
    if (++calls >= FLUSH_EVERY)
        flush();
}

static inline void *counted(void *p) {
    if (p)
        count((long)next_usable_size(p));
    return p;
}

void *malloc(size_t size) {
    if (resolving)
        return from_bootstrap(size);
    ensure_resolved();
    return counted(next_malloc(size));
}

void *calloc(size_t n, size_t size) {
    if (resolving)
        return n && size > sizeof bootstrap / n ? NULL : from_bootstrap(n * size);
    ensure_resolved();
    return counted(next_calloc(n, size));
}

void *realloc(void *old, size_t size) {
    ensure_resolved();
    if (old == (void *)bootstrap) {
        void *p = malloc(size);
        if (p)
            memcpy(p, bootstrap, size < sizeof bootstrap ? size : sizeof bootstrap);
        return p;
    }
    long before = old ? (long)next_usable_size(old) : 0;
    void *p = next_realloc(old, size);
    if (p)
        count((long)next_usable_size(p) - before);
    else if (old && size == 0)
        count(-before);
    return p;
}

void *memalign(size_t align, size_t size) {
    ensure_resolved();
    return counted(next_memalign(align, size));
}

void *aligned_alloc(size_t align, size_t size) {
    ensure_resolved();
    return counted(next_aligned_alloc(align, size));
}

void *valloc(size_t size) {
    ensure_resolved();
    return counted(next_valloc(size));
}

void *pvalloc(size_t size) {
    ensure_resolved();
    return counted(next_pvalloc(size));
}

void *reallocarray(void *old, size_t n, size_t size) {
    if (size && n > (size_t)-1 / size) {
        errno = ENOMEM;
        return NULL;
    }
    return realloc(old, n * size);
}

int posix_memalign(void **out, size_t align, size_t size) {
    ensure_resolved();
    int rc = next_posix_memalign(out, align, size);
    if (rc == 0)
        counted(*out);
    return rc;
}

void free(void *p) {
    if (!p || p == (void *)bootstrap)
        return;
    ensure_resolved();
    count(-(long)next_usable_size(p));
    next_free(p);
}

__attribute__((destructor)) static void report(void) {
    fprintf(stderr, "live-peak: %ld KiB\n", atomic_load(&peak) / 1024);
}
