/* Loads the C++ plugin privately (RTLD_LOCAL) and calls it: see
 * private-cxx.cc. Prints one line per call.
 *
 * Build: cc -std=c11 -O1 -Wall -Werror private-cxx-main.c -o private-cxx-main
 * Run: private-cxx-main PATH-TO-libprivate-cxx.so */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>

int main(int argc, char **argv)
{
    if (argc != 2)
        return 2;
    void *plugin = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!plugin) {
        printf("dlopen failed: %s\n", dlerror());
        return 1;
    }
    const char *(*strings)(void) = (const char *(*)(void))dlsym(plugin, "plugin_strings");
    const char *(*huge)(void) = (const char *(*)(void))dlsym(plugin, "plugin_new_huge");
    printf("plugin strings -> %s\n", strings());
    fflush(stdout);
    printf("plugin new[](SIZE_MAX / 2) -> %s\n", huge());
    return 0;
}
