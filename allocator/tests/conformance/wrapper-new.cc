/* A tool preloaded before hakmem that wraps `operator new` and `delete`
 * (plain and sized) and forwards each to the next definition with
 * RTLD_NEXT, as heap profilers do: the next is hakmem's. hakmem must then
 * forward its own operators to the C++ runtime's, not look the operator up
 * from the start again (which finds this wrapper: an endless loop).
 * Prints how many calls it saw at exit.
 *
 * Build: c++ -std=c++17 -O1 -shared -fPIC wrapper-new.cc -o libwrapper-new.so -ldl */
#include <dlfcn.h>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <new>

static std::atomic<long> news, deletes;

template <typename F> static F next(const char *name)
{
    void *f = dlsym(RTLD_NEXT, name);
    if (!f) {
        std::fprintf(stderr, "wrapper-new: no next %s\n", name);
        std::abort();
    }
    return reinterpret_cast<F>(f);
}

void *operator new(std::size_t n)
{
    static auto up = next<void *(*)(std::size_t)>("_Znwm");
    news++;
    return up(n);
}

void operator delete(void *p) noexcept
{
    static auto up = next<void (*)(void *)>("_ZdlPv");
    deletes++;
    up(p);
}

void operator delete(void *p, std::size_t n) noexcept
{
    static auto up = next<void (*)(void *, std::size_t)>("_ZdlPvm");
    deletes++;
    up(p, n);
}

__attribute__((destructor)) static void report()
{
    std::fprintf(stderr, "wrapper-new: news=%ld deletes=%ld\n", news.load(), deletes.load());
}
