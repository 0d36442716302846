/* A program that replaces only operator new(size_t) and operator
 * delete(void*), as C++ allows, with a bump arena that free() would not
 * know: every other form (sized and array deletes, new[], nothrow) must
 * still reach the replacements, under hakmem as under libstdc++, whose
 * forms call the two (tests/conformance.rs compares both runs; before
 * hakmem forwarded, a sized delete of an arena block reached its free()
 * and aborted). One line per case, "<case> -> <result>".
 *
 * Build: c++ -std=c++17 -O1 -Wall -Werror replaced.cc -o replaced */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <new>
#include <string>
#include <vector>

alignas(64) static char arena[8 << 20];
static size_t used;
static int news, deletes;

void *operator new(size_t n)
{
    ++news;
    n = (n + 15) & ~(size_t)15;
    if (n > sizeof arena - used)
        throw std::bad_alloc();
    void *p = arena + used;
    used += n ? n : 16;
    return p;
}

void operator delete(void *p) noexcept
{
    if (p)
        ++deletes;
}

static void *volatile sink;

static const char *in_arena(const void *p)
{
    return (const char *)p >= arena && (const char *)p < arena + sizeof arena ? "in-arena"
                                                                                : "NOT-in-arena";
}

/* Prints the case with what it did to the two counters. */
static void report(const char *name, const void *p)
{
    static int last_news, last_deletes;
    printf("%s -> %s news+%d deletes+%d\n", name, p ? in_arena(p) : "-", news - last_news,
           deletes - last_deletes);
    last_news = news;
    last_deletes = deletes;
}

int main()
{
    report("start", nullptr);
    int *one = new int(5);
    sink = one;
    report("new int", one);
    delete one; /* sized delete: operator delete(void*, size_t) */
    report("delete int (sized)", nullptr);

    int *many = new int[10];
    sink = many;
    report("new int[10]", many);
    delete[] many;
    report("delete[] int[10]", nullptr);

    int *quiet = new (std::nothrow) int(7);
    sink = quiet;
    report("new (nothrow) int", quiet);
    ::operator delete(quiet, std::nothrow);
    report("delete (nothrow)", nullptr);

    void *sized = ::operator new[](100);
    sink = sized;
    report("operator new[](100)", sized);
    ::operator delete[](sized, 100);
    report("operator delete[](p, 100)", nullptr);

    {
        std::vector<std::string> v;
        for (int i = 0; i < 1000; i++)
            v.push_back(std::string(100 + i % 50, 'x'));
        sink = v.data();
        report("vector of 1000 strings", v.data());
    }
    report("vector destroyed", nullptr);

    /* Not replaced: the runtime's aligned forms, over aligned_alloc and free. */
    void *aligned = ::operator new(256, std::align_val_t(128));
    sink = aligned;
    printf("aligned new (not replaced) -> %s aligned128=%d\n", aligned ? "nonnull" : "NULL",
           (int)((uintptr_t)aligned % 128 == 0));
    ::operator delete(aligned, std::align_val_t(128));
    report("aligned delete", nullptr);
    return 0;
}
