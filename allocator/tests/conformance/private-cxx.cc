/* A C++ plugin that a C program loads with dlopen(RTLD_LOCAL)
 * (private-cxx-main.c): its C++ runtime is out of the global scope, so
 * hakmem's operator new, which the plugin's calls reach under the preload,
 * must find the runtime by other means to throw std::bad_alloc.
 *
 * Build: c++ -std=c++17 -O1 -shared -fPIC private-cxx.cc -o libprivate-cxx.so */
#include <stdint.h>

#include <new>
#include <string>

static void *volatile sink;

extern "C" const char *plugin_new_huge(void)
{
    try {
        sink = ::operator new[](SIZE_MAX / 2);
        return "returned";
    } catch (const std::bad_alloc &) {
        return "caught bad_alloc";
    } catch (...) {
        return "caught other";
    }
}

extern "C" const char *plugin_strings(void)
{
    std::string s;
    for (int i = 0; i < 10000; i++)
        s += std::to_string(i);
    return s.size() == 38890 ? "strings ok" : "strings WRONG";
}
