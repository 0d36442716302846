/* Allocates through `new` under a wrapper preloaded before hakmem
 * (wrapper-new.cc): a thousand objects, then a size that cannot be served,
 * which must throw bad_alloc through the wrapper. Prints one line per case.
 *
 * Build: c++ -std=c++17 -O1 -Wall -Werror wrapped.cc -o wrapped */
#include <cstdint>
#include <cstdio>
#include <new>
#include "opaque.h"

int main()
{
    long sum = 0;
    for (int i = 0; i < 1000; i++) {
        long *p = new long(i);
        sum += *static_cast<long *>(opaque_ptr(p));
        delete p;
    }
    std::printf("1000 new long -> sum=%ld\n", sum);
    try {
        void *p = ::operator new(opaque(SIZE_MAX / 2));
        std::printf("new(SIZE_MAX / 2) -> nonnull %d\n", p != nullptr);
    } catch (const std::bad_alloc &) {
        std::printf("new(SIZE_MAX / 2) -> threw bad_alloc\n");
    }
    return 0;
}
