/* Differential conformance probe for malloc replacements.
 *
 * Walks glibc's documented allocation contract and prints one line per case,
 * "<case> -> <observed behaviour>", normalised so that two correct allocators
 * print the same: never an address or an exact usable size, only NULL/nonnull,
 * errno names (errno is set to EDOM before each call: "unchanged" means the
 * call left it alone), alignment to what was asked, usable size >= request,
 * contents kept or zeroed. allocator/tests/conformance.rs runs it under glibc
 * and under LD_PRELOAD=libhakmem.so and compares the two outputs.
 *
 * Every case runs in a forked child, so a crash (an allocator's abort) costs
 * only that case, whose line then reads "<case> -> crashed(signal N)"; each
 * group of cases runs in a child too, reported as "group NAME -> exit=0"
 * (the statistics groups, whose cases build on each other, only so).
 *
 * Build: cc -std=c11 -O1 -Wall -Werror contract.c -o contract */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "opaque.h"

/* glibc exports these (GLIBC_2.2.5) but no header declares them. */
extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void *__libc_valloc(size_t);
extern void *__libc_pvalloc(size_t);

#define MiB ((size_t)1 << 20)
#define GiB ((size_t)1 << 30)
#define LEN(a) (sizeof(a) / sizeof((a)[0]))
#define ERRNO_SENTINEL EDOM
/* Blocks larger than this are not tried (the machine's memory). */
#define MAX_TRY (3 * GiB)

static size_t page;

/* ---- one output line per case ----------------------------------------- */

static char case_name[256];
static char result[1024];

/* Names the case and clears its result. */
static void begin(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void begin(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(case_name, sizeof case_name, fmt, ap);
    va_end(ap);
    result[0] = '\0';
}

/* Sets errno to the sentinel: the call under test comes next. */
static void arm(void)
{
    errno = ERRNO_SENTINEL;
}

/* Appends " <token>" to the current result. */
static void add(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void add(const char *fmt, ...)
{
    size_t len = strlen(result);
    va_list ap;
    va_start(ap, fmt);
    if (len + 1 < sizeof result) {
        result[len] = ' ';
        vsnprintf(result + len + 1, sizeof result - len - 1, fmt, ap);
    }
    va_end(ap);
}

static void end(void)
{
    printf("%s ->%s\n", case_name, result);
}

/* How a child ended, for its result. */
static const char *fate(int status)
{
    static char text[48];
    if (WIFEXITED(status))
        snprintf(text, sizeof text, "exit=%d", WEXITSTATUS(status));
    else if (WTERMSIG(status) == SIGALRM)
        snprintf(text, sizeof text, "timeout");
    else
        snprintf(text, sizeof text, "crashed(signal %d)", WTERMSIG(status));
    return text;
}

/* Forks. Returns 1 in the child, which gets `timeout` seconds; in the
 * parent waits for it, returns 0 and leaves its wait status in *status
 * (-1 if there was no child). */
static int in_child(unsigned timeout, int *status)
{
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        alarm(timeout);
        return 1;
    }
    if (pid < 0 || waitpid(pid, status, 0) != pid)
        *status = -1;
    return 0;
}

/* Runs the rest of the current case in a child, so that a crash costs only
 * this case: returns 1 in the child, which ends with finish(); in the
 * parent returns 0, having printed the case as crashed if it did not finish. */
static int isolated(void)
{
    int status;
    if (in_child(60, &status))
        return 1;
    if (status != 0) {
        result[0] = '\0';
        add("%s", status == -1 ? "fork-failed" : fate(status));
        end();
    }
    return 0;
}

/* Prints the case's line and ends its child. */
static void finish(void)
{
    end();
    fflush(stdout);
    _exit(0);
}

static const char *errname(int e)
{
    static char other[32];
    switch (e) {
    case 0: return "0";
    case ENOMEM: return "ENOMEM";
    case EINVAL: return "EINVAL";
    case EDOM: return "EDOM";
    case ERANGE: return "ERANGE";
    case EOVERFLOW: return "EOVERFLOW";
    case EFAULT: return "EFAULT";
    default:
        snprintf(other, sizeof other, "%d", e);
        return other;
    }
}

static void add_errno(int e)
{
    add("errno=%s", e == ERRNO_SENTINEL ? "unchanged" : errname(e));
}

static const char *yes(int b)
{
    return b ? "yes" : "no";
}

/* ---- block checks ------------------------------------------------------ */

static void fill(void *p, size_t n, unsigned seed)
{
    unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        b[i] = (unsigned char)(i * 31 + seed);
}

static int filled(const void *p, size_t n, unsigned seed)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != (unsigned char)(i * 31 + seed))
            return 0;
    return 1;
}

static int all_zero(const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i])
            return 0;
    return 1;
}

/* The alignment glibc guarantees malloc/calloc/realloc results (16 on
 * x86-64); the check is relaxed to 8 for blocks too small to need 16. */
static size_t natural(size_t n)
{
    return n > 8 ? 16 : 8;
}

/* Smallest power of two >= a (what memalign rounds to), 0 if none fits. */
static size_t pow2_at_least(size_t a)
{
    size_t p = 1;
    while (p < a) {
        if (p > SIZE_MAX / 2)
            return 0;
        p <<= 1;
    }
    return p;
}

/* How the block is checked. */
struct how {
    size_t align;   /* check alignment to this (0: no check) */
    int zeroed;     /* check the n bytes are zero (calloc) */
    int foreign;    /* from glibc's own heap under a preload (__libc_*):
                       not measured with malloc_usable_size */
    int page_round; /* usable size >= n rounded up to pages (pvalloc) */
};

/* Reports NULL/nonnull and, for a block, alignment, usable size >= n,
 * zeroing; then writes all n bytes to prove them usable. */
static void report_block(void *p, size_t n, struct how how)
{
    p = opaque_ptr(p);
    if (!p) {
        add("NULL");
        return;
    }
    add("nonnull");
    if (how.align)
        add("%saligned%zu", (uintptr_t)p % how.align ? "MIS" : "", how.align);
    if (!how.foreign) {
        size_t want = how.page_round ? (n + page - 1) / page * page : n;
        add("usable%s%s", malloc_usable_size(p) >= want ? ">=req" : "<req",
            how.page_round ? "(page-rounded)" : "");
    }
    if (how.zeroed)
        add("%s", all_zero(p, n) ? "zeroed" : "NOT-zeroed");
    memset(p, 0x5A, n);
}

/* ---- the entry points, behind one signature --------------------------- */

/* posix_memalign's return value and untouched-output marker. */
static int posix_ret;
static char untouched;

#define ADAPT(fn, expr) \
    static void *fn(size_t a, size_t n) { (void)a; (void)n; return expr; }
ADAPT(e_malloc, malloc(n))
ADAPT(e_calloc, calloc(1, n))
ADAPT(e_realloc, realloc(NULL, n))
ADAPT(e_reallocarray, reallocarray(NULL, 1, n))
ADAPT(e_valloc, valloc(n))
ADAPT(e_pvalloc, pvalloc(n))
ADAPT(e_memalign, memalign(a, n))
ADAPT(e_aligned_alloc, aligned_alloc(a, n))
ADAPT(e_libc_malloc, __libc_malloc(n))
ADAPT(e_libc_calloc, __libc_calloc(1, n))
ADAPT(e_libc_realloc, __libc_realloc(NULL, n))
ADAPT(e_libc_valloc, __libc_valloc(n))
ADAPT(e_libc_pvalloc, __libc_pvalloc(n))
ADAPT(e_libc_memalign, __libc_memalign(a, n))

static void *e_posix_memalign(size_t a, size_t n)
{
    void *out = &untouched;
    posix_ret = posix_memalign(&out, a, n);
    return out;
}

/* Which alignment to check: malloc's, the page (valloc; pvalloc, which
 * also rounds the size up to pages) or the one asked for. */
enum rule { NATURAL, PAGE, PAGE_ROUNDED, GIVEN };

struct entry {
    const char *fmt;    /* case name: "%s" size, or "%s,%s" align and size */
    void *(*call)(size_t align, size_t n);
    void (*release)(void *);
    enum rule rule;     /* which alignment to check */
    int zeroes, foreign, posix;
};

static const struct entry sized_entries[] = {
    {"malloc(%s)", e_malloc, free, NATURAL, 0, 0, 0},
    {"calloc(1,%s)", e_calloc, free, NATURAL, 1, 0, 0},
    {"realloc(NULL,%s)", e_realloc, free, NATURAL, 0, 0, 0},
    {"reallocarray(NULL,1,%s)", e_reallocarray, free, NATURAL, 0, 0, 0},
    {"valloc(%s)", e_valloc, free, PAGE, 0, 0, 0},
    {"pvalloc(%s)", e_pvalloc, free, PAGE_ROUNDED, 0, 0, 0},
    {"__libc_malloc(%s)", e_libc_malloc, __libc_free, NATURAL, 0, 1, 0},
    {"__libc_calloc(1,%s)", e_libc_calloc, __libc_free, NATURAL, 1, 1, 0},
    {"__libc_realloc(NULL,%s)", e_libc_realloc, __libc_free, NATURAL, 0, 1, 0},
    {"__libc_valloc(%s)", e_libc_valloc, __libc_free, PAGE, 0, 1, 0},
    {"__libc_pvalloc(%s)", e_libc_pvalloc, __libc_free, PAGE_ROUNDED, 0, 1, 0},
};

static const struct entry aligned_entries[] = {
    {"posix_memalign(align=%s,size=%s)", e_posix_memalign, free, GIVEN, 0, 0, 1},
    {"aligned_alloc(align=%s,size=%s)", e_aligned_alloc, free, GIVEN, 0, 0, 0},
    {"memalign(align=%s,size=%s)", e_memalign, free, GIVEN, 0, 0, 0},
    {"__libc_memalign(align=%s,size=%s)", e_libc_memalign, __libc_free, GIVEN, 0, 1, 0},
};

/* One call of `e`, reported on one line; the block is freed. */
static void probe(const struct entry *e, size_t align, const char *align_name,
                  size_t n, const char *size_name)
{
    struct how how = {0, e->zeroes, e->foreign, e->rule == PAGE_ROUNDED};
    switch (e->rule) {
    case NATURAL: how.align = natural(n); break;
    case PAGE: case PAGE_ROUNDED: how.align = page; break;
    case GIVEN: how.align = pow2_at_least(align); break;
    }
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
    if (e->rule == GIVEN)
        begin(e->fmt, align_name, size_name);
    else
        begin(e->fmt, size_name);
#pragma GCC diagnostic pop
    if (!isolated())
        return;
    arm();
    void *p = e->call(opaque(align), opaque(n));
    int err = errno;
    if (e->posix) {
        add("ret=%s", errname(posix_ret));
        if (p == &untouched) {
            add("out=untouched");
            p = NULL;
        } else {
            report_block(p, n, how);
        }
        /* errno is not part of posix_memalign's failure contract (glibc
         * happens to set ENOMEM); it must stay unchanged on success. */
        if (posix_ret == 0)
            add_errno(err);
    } else {
        report_block(p, n, how);
        add_errno(err);
    }
    e->release(p);
    finish();
}

/* ---- sizes ------------------------------------------------------------- */

struct named {
    size_t v;
    const char *name;
};
#define NAMED(x) {(x), #x}

/* Around every boundary a size-class allocator has. */
static const struct named class_sizes[] = {
    NAMED(0), NAMED(1), NAMED(8), NAMED(9), NAMED(16), NAMED(17),
    NAMED(1024), NAMED(1025), NAMED(2048), NAMED(32768), NAMED(262144),
    NAMED(262145), NAMED(2*MiB-1), NAMED(2*MiB), NAMED(2*MiB+1), NAMED(4*MiB),
};

/* No allocator can serve these. */
static const struct named huge_sizes[] = {
    NAMED(SIZE_MAX), NAMED(SIZE_MAX-1), NAMED(SIZE_MAX-4095),
    NAMED(SIZE_MAX/2), NAMED(SIZE_MAX/2+1), NAMED(PTRDIFF_MAX),
    NAMED((size_t)-4096), NAMED((size_t)-100),
};

static const struct named bad_alignments[] = {
    NAMED(0), NAMED(3), NAMED(24), NAMED(48), NAMED(sizeof(void*)/2),
    NAMED(SIZE_MAX), NAMED((size_t)1<<63),
};

/* ---- groups ------------------------------------------------------------ */

static const struct entry *current_entry;

/* Every size above through one entry point. */
static void g_sizes(void)
{
    for (size_t i = 0; i < LEN(class_sizes); i++)
        probe(current_entry, 0, "", class_sizes[i].v, class_sizes[i].name);
    for (size_t i = 0; i < LEN(huge_sizes); i++)
        probe(current_entry, 0, "", huge_sizes[i].v, huge_sizes[i].name);
}

/* Every power-of-two alignment 1 .. 2^30 with sizes 1, align-1, align,
 * 3*align+5 (only size 1 for the __libc_ names). */
static void g_alignments(void)
{
    size_t tried = current_entry->foreign ? 1 : 4;
    for (unsigned k = 0; k <= 30; k++) {
        size_t a = (size_t)1 << k;
        const struct named sizes[] = {
            {1, "1"}, {a - 1, "align-1"}, {a, "align"}, {3 * a + 5, "3*align+5"},
        };
        char align_name[16];
        snprintf(align_name, sizeof align_name, "2^%u", k);
        for (size_t i = 0; i < tried; i++) {
            int dup = 0;
            for (size_t j = 0; j < i; j++)
                dup |= sizes[j].v == sizes[i].v;
            if (!dup && sizes[i].v <= MAX_TRY)
                probe(current_entry, a, align_name, sizes[i].v, sizes[i].name);
        }
    }
}

/* Invalid alignments, and valid ones with impossible sizes. */
static void g_bad_alignments(void)
{
    static const struct named sizes[] = {NAMED(1), NAMED(100)};
    static const struct named aligns[] = {NAMED(64), NAMED(4096)};
    for (size_t i = 0; i < LEN(bad_alignments); i++)
        for (size_t j = 0; j < LEN(sizes); j++)
            probe(current_entry, bad_alignments[i].v, bad_alignments[i].name,
                  sizes[j].v, sizes[j].name);
    for (size_t i = 0; i < LEN(aligns); i++)
        for (size_t j = 0; j < LEN(huge_sizes); j++)
            probe(current_entry, aligns[i].v, aligns[i].name, huge_sizes[j].v,
                  huge_sizes[j].name);
}

/* calloc(n, size), or __libc_calloc if `foreign` (glibc's calloc and
 * __libc_calloc are one address, so the pointers cannot tell them apart):
 * overflow is ENOMEM, a block is zeroed. */
static void calloc_case(const char *name, int foreign, size_t n, size_t size)
{
    begin("%s", name);
    if (!isolated())
        return;
    arm();
    void *p = foreign ? __libc_calloc(opaque(n), opaque(size)) : calloc(opaque(n), opaque(size));
    int err = errno;
    /* n*size did not overflow if p is a block. */
    report_block(p, n * size, (struct how){.align = natural(n * size), .zeroed = 1, .foreign = foreign});
    add_errno(err);
    (foreign ? __libc_free : free)(p);
    finish();
}

/* Rounds of: `batch` blocks filled with 0xAA and freed, then `batch`
 * callocs of the same size, which must all be zero. */
static void calloc_dirty(size_t size, int rounds, int batch)
{
    void *v[16];
    int zero = 1, nonnull = 1;
    begin("calloc(1,%zu) over %d rounds of %d freed 0xAA-filled blocks", size, rounds, batch);
    if (!isolated())
        return;
    for (int r = 0; r < rounds; r++) {
        for (int i = 0; i < batch; i++) {
            v[i] = opaque_ptr(malloc(opaque(size)));
            if (v[i])
                memset(v[i], 0xAA, size);
        }
        for (int i = 0; i < batch; i++)
            free(v[i]);
        for (int i = 0; i < batch; i++) {
            v[i] = opaque_ptr(calloc(1, opaque(size)));
            nonnull &= v[i] != NULL;
            zero &= !v[i] || all_zero(v[i], size);
        }
        for (int i = 0; i < batch; i++)
            free(v[i]);
    }
    add("%s %s", nonnull ? "nonnull" : "NULL-seen", zero ? "zeroed" : "NOT-zeroed");
    finish();
}

static void g_calloc(void)
{
    static const struct {
        const char *name;
        int foreign;
        size_t n, size;
    } cases[] = {
        {"calloc(SIZE_MAX,2)", 0, SIZE_MAX, 2},
        {"calloc(2,SIZE_MAX/2+1)", 0, 2, SIZE_MAX / 2 + 1},
        {"calloc(SIZE_MAX/2+1,2)", 0, SIZE_MAX / 2 + 1, 2},
        {"calloc(65536,2^32)", 0, 65536, (size_t)1 << 32},
        {"calloc(0,SIZE_MAX)", 0, 0, SIZE_MAX},
        {"calloc(SIZE_MAX,0)", 0, SIZE_MAX, 0},
        {"calloc(0,0)", 0, 0, 0},
        {"calloc(1000,1000)", 0, 1000, 1000},
        {"__libc_calloc(SIZE_MAX,2)", 1, SIZE_MAX, 2},
        {"__libc_calloc(1000,1000)", 1, 1000, 1000},
    };
    for (size_t i = 0; i < LEN(cases); i++)
        calloc_case(cases[i].name, cases[i].foreign, cases[i].n, cases[i].size);
    static const size_t dirty[] = {8, 24, 100, 1000, 5000, 100000, 3 * MiB};
    for (size_t i = 0; i < LEN(dirty); i++)
        calloc_dirty(dirty[i], dirty[i] > 1 * MiB ? 20 : 50, dirty[i] > 1 * MiB ? 4 : 16);
}

/* Blocks larger than the memory and swap of any machine this runs on:
 * in the kernel's default overcommit mode its heuristic refuses such a
 * mapping, and glibc returns NULL with ENOMEM, not a block whose first
 * touches would get the program killed. A block given is not touched. */
static void g_beyond_memory(void)
{
    static const struct named sizes[] = {
        {(size_t)1 << 40, "2^40"}, {(size_t)1 << 44, "2^44"}, {(size_t)1 << 46, "2^46"},
    };
    for (size_t i = 0; i < LEN(sizes); i++) {
        for (int call = 0; call < 3; call++) {
            static const char *const names[] = {"malloc", "calloc", "aligned_alloc"};
            begin("%s(%s)", names[call], sizes[i].name);
            if (!isolated())
                continue;
            size_t n = opaque(sizes[i].v);
            arm();
            void *p = call == 0 ? malloc(n)
                      : call == 1 ? calloc(opaque(MiB), n / MiB)
                                  : aligned_alloc(opaque(page), n);
            int err = errno;
            add("%s", opaque_ptr(p) ? "nonnull" : "NULL");
            add_errno(err);
            free(p);
            finish();
        }
    }
}

/* realloc(malloc(old), n), or reallocarray(malloc(old), n, size) when size
 * is not 0. A new block keeps the common prefix; a failure leaves the old
 * block intact and freeable; to 0 bytes, NULL means the old block was freed. */
static void realloc_case(const struct named *old, const char *args, size_t n, size_t size)
{
    begin("%s(malloc(%s),%s)", size ? "reallocarray" : "realloc", old->name, args);
    if (!isolated())
        return;
    size_t total = size ? n * size : n; /* meaningful only if q is a block */
    void *p = opaque_ptr(malloc(opaque(old->v)));
    if (!p) {
        add("setup-malloc-failed");
        finish();
    }
    fill(p, old->v, 7);
    arm();
    void *q = size ? reallocarray(p, opaque(n), opaque(size)) : realloc(p, opaque(n));
    int err = errno;
    if (q)
        add("%s", filled(q, old->v < total ? old->v : total, 7) ? "prefix=kept" : "prefix=LOST");
    report_block(q, total, (struct how){.align = natural(total)});
    add_errno(err);
    int to_zero = size ? n == 0 || size == 0 : n == 0;
    if (!q && !to_zero)
        add("old=%s", filled(p, old->v, 7) ? "intact" : "CHANGED");
    free(q ? q : to_zero ? NULL : p);
    finish();
}

static void g_realloc(void)
{
    /* Growth and shrinking across every class boundary (to 0 is below). */
    for (size_t i = 0; i < LEN(class_sizes); i++)
        for (size_t j = 0; j < LEN(class_sizes); j++)
            if (i != j && class_sizes[j].v)
                realloc_case(&class_sizes[i], class_sizes[j].name, class_sizes[j].v, 0);

    static const struct named olds[] = {NAMED(100), NAMED(5000), NAMED(3*MiB)};
    for (size_t i = 0; i < LEN(olds); i++) {
        for (size_t j = 0; j < LEN(huge_sizes); j++)
            realloc_case(&olds[i], huge_sizes[j].name, huge_sizes[j].v, 0);
        realloc_case(&olds[i], "2,SIZE_MAX/2+1", 2, SIZE_MAX / 2 + 1);
        realloc_case(&olds[i], "SIZE_MAX,SIZE_MAX", SIZE_MAX, SIZE_MAX);
    }

    /* Size 0: glibc frees the block and returns NULL. */
    static const struct named zeros[] = {
        NAMED(1), NAMED(100), NAMED(5000), NAMED(300000), NAMED(3*MiB),
    };
    for (size_t i = 0; i < LEN(zeros); i++)
        realloc_case(&zeros[i], "0", 0, 0);
    realloc_case(&olds[0], "0,5", 0, 5);
    realloc_case(&olds[0], "3,1000", 3, 1000);
}

/* ---- free, and mixing glibc's __libc_* names with the public ones ------ */

ADAPT(e_null, NULL)

/* A block from one family handed to a free, a realloc (to `to` bytes) or
 * malloc_usable_size; errno must survive it (glibc >= 2.33 keeps errno
 * across free). */
struct pair {
    const char *name;
    void *(*alloc)(size_t align, size_t n);
    size_t align, n;
    enum { RELEASE, REALLOC, USABLE } op;
    void *(*resize)(void *, size_t);
    size_t to;
    void (*release)(void *); /* what finally frees it */
};

static const struct pair pairs[] = {
    {"free(NULL)", e_null, 0, 0, RELEASE, NULL, 0, free},
    {"free(malloc(16))", e_malloc, 0, 16, RELEASE, NULL, 0, free},
    {"free(malloc(5000))", e_malloc, 0, 5000, RELEASE, NULL, 0, free},
    {"free(malloc(300000))", e_malloc, 0, 300000, RELEASE, NULL, 0, free},
    {"free(malloc(4MiB))", e_malloc, 0, 4 * MiB, RELEASE, NULL, 0, free},
    {"free(memalign(2MiB,2MiB))", e_memalign, 2 * MiB, 2 * MiB, RELEASE, NULL, 0, free},
    {"__libc_free(NULL)", e_null, 0, 0, RELEASE, NULL, 0, __libc_free},
    {"__libc_free(__libc_malloc(16))", e_libc_malloc, 0, 16, RELEASE, NULL, 0, __libc_free},
    {"__libc_free(__libc_malloc(4MiB))", e_libc_malloc, 0, 4 * MiB, RELEASE, NULL, 0, __libc_free},
    /* mixing */
    {"free(__libc_malloc(100))", e_libc_malloc, 0, 100, RELEASE, NULL, 0, free},
    {"free(__libc_malloc(4MiB))", e_libc_malloc, 0, 4 * MiB, RELEASE, NULL, 0, free},
    {"free(__libc_calloc(1,100))", e_libc_calloc, 0, 100, RELEASE, NULL, 0, free},
    {"free(__libc_memalign(64,100))", e_libc_memalign, 64, 100, RELEASE, NULL, 0, free},
    {"free(__libc_valloc(100))", e_libc_valloc, 0, 100, RELEASE, NULL, 0, free},
    {"free(__libc_pvalloc(100))", e_libc_pvalloc, 0, 100, RELEASE, NULL, 0, free},
    {"realloc(__libc_malloc(100),5000)", e_libc_malloc, 0, 100, REALLOC, realloc, 5000, free},
    {"realloc(__libc_malloc(100),50)", e_libc_malloc, 0, 100, REALLOC, realloc, 50, free},
    {"malloc_usable_size(__libc_malloc(100))", e_libc_malloc, 0, 100, USABLE, NULL, 0, __libc_free},
    {"malloc_usable_size(__libc_memalign(4096,100))", e_libc_memalign, 4096, 100, USABLE, NULL, 0, __libc_free},
    {"__libc_free(malloc(100))", e_malloc, 0, 100, RELEASE, NULL, 0, __libc_free},
    {"__libc_free(malloc(4MiB))", e_malloc, 0, 4 * MiB, RELEASE, NULL, 0, __libc_free},
    {"__libc_free(aligned_alloc(64,64))", e_aligned_alloc, 64, 64, RELEASE, NULL, 0, __libc_free},
    {"__libc_realloc(malloc(100),5000)", e_malloc, 0, 100, REALLOC, __libc_realloc, 5000, __libc_free},
};

static void pair_case(const struct pair *m)
{
    begin("%s", m->name);
    if (!isolated())
        return;
    void *p = opaque_ptr(m->alloc(opaque(m->align), opaque(m->n)));
    if (p)
        fill(p, m->n, 5);
    else if (m->n)
        add("setup-alloc-failed");
    arm();
    switch (m->op) {
    case RELEASE:
        m->release(p);
        add_errno(errno);
        break;
    case REALLOC: {
        void *q = opaque_ptr(m->resize(p, opaque(m->to)));
        int err = errno;
        add("%s", q ? "nonnull" : "NULL");
        if (q)
            add("%s", filled(q, m->to < m->n ? m->to : m->n, 5) ? "prefix=kept" : "prefix=LOST");
        add_errno(err);
        m->release(q ? q : p);
        break;
    }
    case USABLE: {
        size_t u = malloc_usable_size(p);
        int err = errno;
        add("usable%s", u >= m->n ? ">=req" : "<req");
        add_errno(err);
        m->release(p);
        break;
    }
    }
    finish();
}

static void g_free_and_mixing(void)
{
    for (size_t i = 0; i < LEN(pairs); i++)
        pair_case(&pairs[i]);
}

/* errno across successful calls. */
static void g_errno(void)
{
    begin("malloc(100) after a failed malloc(SIZE_MAX)");
    if (isolated()) {
        arm();
        void *fail = malloc(opaque(SIZE_MAX));
        void *p = malloc(opaque(100));
        int err = errno;
        add("first=%s", opaque_ptr(fail) ? "nonnull" : "NULL");
        report_block(p, 100, (struct how){.align = 16});
        add_errno(err); /* a success does not clear the failure's ENOMEM */
        free(p);
        finish();
    }
    begin("malloc_usable_size(NULL)");
    if (isolated()) {
        arm();
        size_t u = malloc_usable_size(opaque_ptr(NULL));
        int err = errno;
        add("%s", u == 0 ? "=0" : "nonzero");
        add_errno(err);
        finish();
    }
}

/* ---- statistics: mallinfo, mallinfo2, malloc_stats, malloc_info ------- */

/* What the statistics groups hold while they look: 2000 arena-sized
 * blocks and one block past glibc's mmap threshold. */
#define HOLD_COUNT 2000
#define HOLD_SIZE 10000
#define HOLD_BIG (8 * MiB)
static void *held[HOLD_COUNT + 1];
static const size_t held_bytes = (size_t)HOLD_COUNT * HOLD_SIZE + HOLD_BIG;

static void hold(void)
{
    for (size_t i = 0; i < HOLD_COUNT; i++) {
        held[i] = opaque_ptr(malloc(opaque(HOLD_SIZE)));
        memset(held[i], 1, HOLD_SIZE);
    }
    held[HOLD_COUNT] = opaque_ptr(malloc(opaque(HOLD_BIG)));
    memset(held[HOLD_COUNT], 1, HOLD_BIG);
}

static void unhold(void)
{
    for (size_t i = 0; i <= HOLD_COUNT; i++)
        free(held[i]);
}

/* mallinfo's int fields, widened to compare with mallinfo2's. */
static struct mallinfo2 mallinfo_widened(void)
{
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    struct mallinfo m = mallinfo();
#pragma GCC diagnostic pop
    return (struct mallinfo2){
        .arena = (unsigned)m.arena, .ordblks = (unsigned)m.ordblks,
        .smblks = (unsigned)m.smblks, .hblks = (unsigned)m.hblks,
        .hblkhd = (unsigned)m.hblkhd, .usmblks = (unsigned)m.usmblks,
        .fsmblks = (unsigned)m.fsmblks, .uordblks = (unsigned)m.uordblks,
        .fordblks = (unsigned)m.fordblks, .keepcost = (unsigned)m.keepcost,
    };
}

static void mallinfo_group(const char *name, struct mallinfo2 (*get)(void))
{
    hold();
    begin("%s() holding %d x %d bytes + %zu", name, HOLD_COUNT, HOLD_SIZE, HOLD_BIG);
    struct mallinfo2 m = get();
    size_t in_use = m.uordblks + m.hblkhd;
    add("uordblks+hblkhd>=held:%s", yes(in_use >= held_bytes));
    add("arena==uordblks+fordblks:%s", yes(m.arena == m.uordblks + m.fordblks));
    add("hblks>=1:%s", yes(m.hblks >= 1));
    add("hblkhd>=%zu:%s", HOLD_BIG, yes(m.hblkhd >= HOLD_BIG));
    end();
    unhold();
    begin("%s() after freeing them", name);
    struct mallinfo2 after = get();
    size_t in_use_after = after.uordblks + after.hblkhd;
    add("uordblks+hblkhd_dropped_by>=held/2:%s", yes(in_use_after + held_bytes / 2 <= in_use));
    add("arena==uordblks+fordblks:%s", yes(after.arena == after.uordblks + after.fordblks));
    end();
}

static void g_mallinfo2(void) { mallinfo_group("mallinfo2", mallinfo2); }
static void g_mallinfo(void) { mallinfo_group("mallinfo", mallinfo_widened); }

static void g_mallopt(void)
{
    static const struct {
        const char *name;
        int param, valid, invalid;
    } params[] = {
        {"M_MXFAST", M_MXFAST, 64, 1000},
        {"M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, 256 * 1024, -1},
        {"M_TOP_PAD", M_TOP_PAD, 64 * 1024, -1},
        {"M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, 256 * 1024, 1 << 30},
        {"M_MMAP_MAX", M_MMAP_MAX, 65536, -1},
        {"M_CHECK_ACTION", M_CHECK_ACTION, 3, -1},
        {"M_PERTURB", M_PERTURB, 0, -1},
        {"M_ARENA_TEST", M_ARENA_TEST, 8, 0},
        {"M_ARENA_MAX", M_ARENA_MAX, 2, 0},
    };
    for (size_t i = 0; i < LEN(params); i++) {
        begin("mallopt(%s,%d)", params[i].name, params[i].valid);
        add("ret=%d", mallopt(params[i].param, params[i].valid));
        end();
        begin("mallopt(%s,%d)", params[i].name, params[i].invalid);
        add("ret=%d", mallopt(params[i].param, params[i].invalid));
        end();
    }
    begin("mallopt(12345,1)");
    add("ret=%d", mallopt(12345, 1));
    end();
}

/* mlockall, which hakmem interposes (it gives its untaken chunks back before
 * MCL_CURRENT locks every writable page): the same return values and errno as
 * the system call, and the heap still serves under the lock, from a new
 * chunk (1.5 MiB), a mapping of its own (3 MiB) and a slab (100 B). */
static void g_mlockall(void)
{
    static const struct {
        const char *name;
        int flags;
    } calls[] = {
        {"0", 0},
        {"MCL_ONFAULT", MCL_ONFAULT},
        {"0x80", 0x80},
        {"MCL_CURRENT", MCL_CURRENT},
        {"MCL_FUTURE", MCL_FUTURE},
        {"MCL_CURRENT|MCL_ONFAULT", MCL_CURRENT | MCL_ONFAULT},
        {"MCL_CURRENT|MCL_FUTURE", MCL_CURRENT | MCL_FUTURE},
    };
    /* Unprivileged, the kernel refuses MCL_CURRENT when the process maps
     * more than RLIMIT_MEMLOCK, and hakmem always maps more than 64 MiB (its
     * registry's table, read-only): a difference of the environment,
     * documented in docs/hardening.md, not compared here. */
    int privileged = geteuid() == 0;
    void *before = malloc(100);
    for (size_t i = 0; i < LEN(calls); i++) {
        begin("mlockall(%s)", calls[i].name);
        if (!privileged && (calls[i].flags & MCL_CURRENT)) {
            add("not-run(needs-root)");
            end();
            continue;
        }
        errno = ERRNO_SENTINEL;
        add("ret=%d", mlockall(calls[i].flags));
        add_errno(errno);
        end();
        munlockall();
    }
    begin("malloc(1.5 MiB, 3 MiB, 100) under mlockall(MCL_CURRENT|MCL_FUTURE)");
    if (!privileged) {
        add("not-run(needs-root)");
        end();
        free(before);
        return;
    }
    int locked = mlockall(MCL_CURRENT | MCL_FUTURE);
    char *mid = malloc(1536 << 10);
    char *big = malloc(3 * MiB);
    char *small = malloc(100);
    if (mid)
        memset(mid, 1, 1536 << 10);
    if (big)
        memset(big, 1, 3 * MiB);
    add("locked=%s mid=%s big=%s small=%s", yes(locked == 0), mid ? "nonnull" : "NULL",
        big ? "nonnull" : "NULL", small ? "nonnull" : "NULL");
    free(mid);
    free(big);
    free(small);
    munlockall();
    end();
    free(before);
}

/* The whole of a temporary file, NUL-terminated (malloc'ed). */
static char *slurp(FILE *f)
{
    fflush(f);
    fseek(f, 0, SEEK_END); /* also counts what was written to its fd */
    long n = ftell(f);
    char *s = malloc(n > 0 ? (size_t)n + 1 : 1);
    rewind(f);
    size_t got = n > 0 ? fread(s, 1, (size_t)n, f) : 0;
    s[got] = '\0';
    return s;
}

/* The number after the first '=' that follows `label` at or after `from`. */
static size_t number_after(const char *from, const char *label)
{
    const char *at = from ? strstr(from, label) : NULL;
    const char *eq = at ? strchr(at, '=') : NULL;
    return eq ? strtoull(eq + 1, NULL, 10) : 0;
}

/* One "[needle]:yes|no" item per needle: whether `text` holds it. */
static void add_each_found(const char *text, const char *const *needles, size_t n)
{
    for (size_t i = 0; i < n; i++)
        add("[%s]:%s", needles[i], yes(strstr(text, needles[i]) != NULL));
}

static void g_malloc_stats(void)
{
    hold();
    FILE *tmp = tmpfile();
    fflush(stderr);
    int saved = dup(2);
    dup2(fileno(tmp), 2);
    malloc_stats();
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    char *out = slurp(tmp);

    static const char *const labels[] = {
        "Arena 0:", "system bytes", "in use bytes", "Total (incl. mmap):",
        "max mmap regions", "max mmap bytes",
    };
    begin("malloc_stats() lines");
    add_each_found(out, labels, LEN(labels));
    end();
    begin("malloc_stats() holding %zu bytes", held_bytes);
    size_t total = number_after(strstr(out, "Total (incl. mmap):"), "in use bytes");
    add("total_in_use>=held:%s", yes(total >= held_bytes));
    end();
    free(out);
    fclose(tmp);
    unhold();
}

/* Whether every <tag> is closed by a matching </tag> (or is <tag/>). */
static int xml_balanced(const char *s)
{
    const char *open[64];
    size_t len[64];
    int depth = 0;
    while ((s = strchr(s, '<'))) {
        const char *close = strchr(s, '>');
        if (!close)
            return 0;
        if (s[1] == '/') {
            size_t n = strcspn(s + 2, ">");
            if (!depth || len[depth - 1] != n || strncmp(open[depth - 1], s + 2, n))
                return 0;
            depth--;
        } else if (close[-1] != '/') {
            if (depth == 64)
                return 0;
            open[depth] = s + 1;
            len[depth++] = strcspn(s + 1, " />");
        }
        s = close + 1;
    }
    return depth == 0;
}

/* The size="N" of the last `element` (the process-wide total). */
static size_t last_size(const char *xml, const char *element)
{
    const char *last = NULL;
    for (const char *p = xml; (p = strstr(p, element)); p++)
        last = p;
    const char *sz = last ? strstr(last, "size=\"") : NULL;
    return sz ? strtoull(sz + 6, NULL, 10) : 0;
}

static void g_malloc_info(void)
{
    hold();
    FILE *tmp = tmpfile();
    begin("malloc_info(0,fp)");
    arm();
    int ret = malloc_info(0, tmp);
    int err = errno;
    char *xml = slurp(tmp);
    size_t len = strlen(xml);
    while (len && xml[len - 1] == '\n')
        xml[--len] = '\0';
    add("ret=%s", errname(ret));
    add("starts<malloc version=\"1\">:%s", yes(!strncmp(xml, "<malloc version=\"1\">", 20)));
    add("ends</malloc>:%s", yes(len >= 9 && !strcmp(xml + len - 9, "</malloc>")));
    add("balanced:%s", yes(xml_balanced(xml)));
    add_errno(err);
    end();

    static const char *const elements[] = {
        "<heap nr=\"0\">", "<sizes>", "<total type=\"fast\"", "<total type=\"rest\"",
        "<total type=\"mmap\"", "<system type=\"current\"", "<system type=\"max\"",
        "<aspace type=\"total\"", "<aspace type=\"mprotect\"",
    };
    begin("malloc_info(0,fp) elements");
    add_each_found(xml, elements, LEN(elements));
    end();
    begin("malloc_info(0,fp) holding %zu bytes", held_bytes);
    size_t system = last_size(xml, "<system type=\"current\"");
    size_t mmapped = last_size(xml, "<total type=\"mmap\"");
    add("system_current+total_mmap>=held:%s", yes(system + mmapped >= held_bytes));
    end();
    free(xml);
    fclose(tmp);

    tmp = tmpfile();
    begin("malloc_info(1,fp)");
    arm();
    ret = malloc_info(1, tmp);
    err = errno;
    add("ret=%s", errname(ret));
    add("output=%s", ftell(tmp) == 0 ? "empty" : "written");
    add_errno(err);
    end();
    fclose(tmp);
    unhold();
}

static void g_malloc_trim(void)
{
    hold();
    unhold();
    begin("malloc_trim(0) after freeing %zu bytes", held_bytes);
    arm();
    int ret = malloc_trim(opaque(0));
    int err = errno;
    add("ret=%d", ret);
    add_errno(err);
    end();
}

/* ---- driver ------------------------------------------------------------ */

/* Runs a group of cases in a child; prints how the child ended. */
static void run_group(const char *name, void (*fn)(void), unsigned timeout)
{
    int status;
    if (in_child(timeout, &status)) {
        fn();
        fflush(stdout);
        _exit(0);
    }
    printf("group %s -> %s\n", name, status == -1 ? "fork-failed" : fate(status));
}

/* "memalign(align=%s,size=%s)" -> "memalign" */
static const char *fn_name(const struct entry *e)
{
    static char name[64];
    snprintf(name, sizeof name, "%.*s", (int)strcspn(e->fmt, "("), e->fmt);
    return name;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    page = (size_t)sysconf(_SC_PAGESIZE);
    char name[160];

    for (size_t i = 0; i < LEN(sized_entries); i++) {
        current_entry = &sized_entries[i];
        snprintf(name, sizeof name, "sizes %s", fn_name(current_entry));
        run_group(name, g_sizes, 120);
    }
    for (size_t i = 0; i < LEN(aligned_entries); i++) {
        current_entry = &aligned_entries[i];
        snprintf(name, sizeof name, "alignments %s", fn_name(current_entry));
        run_group(name, g_alignments, 600);
        snprintf(name, sizeof name, "bad alignments %s", fn_name(current_entry));
        run_group(name, g_bad_alignments, 120);
    }
    run_group("calloc", g_calloc, 120);
    run_group("beyond memory", g_beyond_memory, 60);
    run_group("realloc", g_realloc, 300);
    run_group("free and mixing", g_free_and_mixing, 120);
    run_group("errno", g_errno, 60);
    run_group("mallinfo2", g_mallinfo2, 60);
    run_group("mallinfo", g_mallinfo, 60);
    run_group("mallopt", g_mallopt, 60);
    run_group("mlockall", g_mlockall, 60);
    run_group("malloc_stats", g_malloc_stats, 60);
    run_group("malloc_info", g_malloc_info, 60);
    run_group("malloc_trim", g_malloc_trim, 60);
    return 0;
}
