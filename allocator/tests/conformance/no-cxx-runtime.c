/* A C program, no C++ runtime loaded, that calls hakmem's operator new
 * (found with dlsym) with a size no allocator can serve: hakmem cannot throw
 * std::bad_alloc and no other library defines the operator, so it must abort
 * with a message naming the operator (tests/conformance.rs). A size it can
 * serve first, to show the operator works without a C++ runtime.
 *
 * Build: cc -std=c11 -O1 -Wall -Werror no-cxx-runtime.c -o no-cxx-runtime */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>

int main(void)
{
    void *(*new_)(size_t) = (void *(*)(size_t))dlsym(RTLD_DEFAULT, "_Znwm");
    void (*delete_)(void *) = (void (*)(void *))dlsym(RTLD_DEFAULT, "_ZdlPv");
    if (!new_ || !delete_) {
        printf("no operator new in the process\n");
        return 2;
    }
    void *p = new_(100);
    printf("new(100) -> %s\n", p ? "nonnull" : "NULL");
    delete_(p);
    fflush(stdout);
    volatile size_t huge = SIZE_MAX;
    p = new_(huge);
    printf("new(SIZE_MAX) returned %p\n", p);
    return 0;
}
