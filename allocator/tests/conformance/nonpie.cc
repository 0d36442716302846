/* A position-dependent C++ program that takes the addresses of free,
 * malloc and operator new in its code: the linker gives each a "canonical"
 * PLT entry in the executable, which dlsym(RTLD_DEFAULT) returns for the
 * name although the executable defines none of them. hakmem must still
 * serve the operators (tests/conformance.rs checks its `hakmem-cxx:` line).
 *
 * Build: c++ -std=c++17 -O1 -fno-pic -no-pie nonpie.cc -o nonpie */
#include <stdio.h>
#include <stdlib.h>

#include <new>

__attribute__((noinline)) static void use(void *a, void *b, void *c)
{
    printf("addresses taken -> %s\n", a != b && b != c ? "distinct" : "SAME");
}

int main()
{
    int *p = new int(3);
    delete p;
    use((void *)free, (void *)malloc, (void *)static_cast<void *(*)(size_t)>(::operator new));
    return 0;
}
