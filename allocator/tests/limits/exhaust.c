/* Allocates until the allocator refuses, in each tier (tiny, mid, large,
 * chunk-aligned), then frees everything and allocates once more. With
 * "touch" it writes every byte it gets, so that a cgroup is charged for it.
 * The blocks are chained through their first word: no memory besides them.
 * Prints one line per tier; exits 0 if every refusal was NULL with ENOMEM
 * and every allocation after the frees succeeded. Run by tests/limits.rs. */
#define _POSIX_C_SOURCE 200112L
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct tier {
    const char *name;
    size_t size;
    size_t align; /* 0: malloc */
};

/* Enough to exhaust any limit the tests set, and a bound where none bites. */
#define MAX_BYTES ((size_t)64 << 30)

static void *get(const struct tier *t) {
    if (t->align == 0)
        return malloc(t->size);
    void *p = NULL;
    errno = posix_memalign(&p, t->align, t->size);
    return p;
}

int main(int argc, char **argv) {
    int touch = argc > 1 && strcmp(argv[1], "touch") == 0;
    static const struct tier tiers[] = {
        {"tiny", 64, 0},
        {"mid", 20000, 0},
        {"large", 3 << 20, 0},
        {"aligned", 1 << 20, 2 << 20},
    };
    int ok = 1;
    for (size_t i = 0; i < sizeof tiers / sizeof *tiers; i++) {
        const struct tier *t = &tiers[i];
        void *head = NULL;
        size_t n = 0;
        int err = 0;
        for (;;) {
            if ((n + 1) * t->size > MAX_BYTES) {
                err = -1;
                break;
            }
            errno = 0;
            void *p = get(t);
            if (p == NULL) {
                err = errno;
                break;
            }
            if (touch)
                memset(p, 0x5a, t->size);
            *(void **)p = head;
            head = p;
            n++;
        }
        while (head != NULL) {
            void *next = *(void **)head;
            free(head);
            head = next;
        }
        void *again = get(t);
        int refused_right = err == ENOMEM;
        printf("%s: %zu blocks of %zu, then %s; after freeing them: %s\n", t->name, n, t->size,
               err == -1 ? "no refusal within 64 GiB" : err == ENOMEM ? "NULL with ENOMEM" : strerror(err),
               again != NULL ? "allocates again" : "still refused");
        fflush(stdout);
        ok &= refused_right && again != NULL;
        free(again);
    }
    return ok ? 0 : 1;
}
