/* Differential conformance probe for the C++ allocation operators.
 *
 * Walks the contract of every form of operator new and delete (plain,
 * array, nothrow, aligned, sized) as libstdc++ keeps it and prints one line
 * per case, "<case> -> <observed behaviour>", normalised as contract.c's
 * are: never an address, only nonnull/NULL, the alignment asked for, what
 * was thrown, how often the new-handler ran. allocator/tests/conformance.rs
 * runs it plainly and under LD_PRELOAD=libhakmem.so and compares the two.
 * Every case runs in a forked child, so a crash costs only that case
 * ("<case> -> crashed(signal N)").
 *
 * On stderr (not compared) it says which library each operator's name
 * resolves to: "operator <mangled name> from: <path>".
 *
 * Build: c++ -std=c++17 -O1 -Wall -Werror contract.cc -o contract-cxx -ldl */
#include <dlfcn.h>
#include <malloc.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstddef>
#include <map>
#include <new>
#include <string>
#include <vector>

#include "opaque.h"

static const size_t SIZE_MAXV = SIZE_MAX;
static const size_t HUGE_SIZES[] = {SIZE_MAXV, SIZE_MAXV - 1, SIZE_MAXV / 2 + 1,
                                    (size_t)PTRDIFF_MAX, (size_t)1 << 62};
static const size_t SIZES[] = {0, 1, 8, 16, 24, 1024, 1025, 16384, 65536, (size_t)1 << 20,
                               (size_t)64 << 20};


static std::string result;

/* Runs `body` in a forked child that prints "<name> -> <result>"; a child
 * that dies prints nothing, so the parent prints how it died. */
template <class F> static void run_case(const std::string &name, F body)
{
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        alarm(60);
        result.clear();
        body();
        printf("%s -> %s\n", name.c_str(), result.c_str());
        fflush(stdout);
        _exit(0);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid) {
        printf("%s -> fork-failed\n", name.c_str());
    } else if (WIFSIGNALED(status)) {
        printf("%s -> crashed(signal %d)\n", name.c_str(), WTERMSIG(status));
    } else if (WEXITSTATUS(status) != 0) {
        printf("%s -> exit=%d\n", name.c_str(), WEXITSTATUS(status));
    }
}

static void add(const std::string &s)
{
    if (!result.empty())
        result += ' ';
    result += s;
}

/* What a block came back as: nonnull, aligned to `align`, writable over n
 * bytes (filled), usable size at least n. */
static void report(void *p, size_t n, size_t align)
{
    p = opaque_ptr(p);
    if (!p) {
        add("NULL");
        return;
    }
    add("nonnull");
    add(std::string((uintptr_t)p % align ? "MISaligned" : "aligned") + std::to_string(align));
    add(malloc_usable_size(p) >= n ? "usable>=req" : "usable<req");
    memset(p, 0x5A, n);
}

/* Runs `body`, which allocates, and says what it threw, if anything. */
template <class F> static void catching(F body)
{
    try {
        body();
    } catch (const std::bad_array_new_length &) {
        add("threw bad_array_new_length");
    } catch (const std::bad_alloc &) {
        add("threw bad_alloc");
    } catch (int v) {
        add("threw int " + std::to_string(v));
    } catch (...) {
        add("threw other");
    }
}

static std::string hex(size_t v)
{
    char b[32];
    snprintf(b, sizeof b, "%#zx", v);
    return b;
}

/* A new-handler that counts its calls and uninstalls itself at the third,
 * so that the next failure throws. */
static int handler_calls;
static void counting_handler()
{
    if (++handler_calls == 3)
        std::set_new_handler(nullptr);
}
static void throwing_handler()
{
    ++handler_calls;
    throw 42;
}

static const size_t DEFAULT_ALIGN = __STDCPP_DEFAULT_NEW_ALIGNMENT__;

static void plain_forms()
{
    for (size_t n : SIZES) {
        run_case("new(" + std::to_string(n) + ")", [n] {
            void *p = ::operator new(opaque(n));
            report(p, n, DEFAULT_ALIGN);
            ::operator delete(p);
        });
        run_case("new[](" + std::to_string(n) + ") sized delete[]", [n] {
            void *p = ::operator new[](opaque(n));
            report(p, n, DEFAULT_ALIGN);
            ::operator delete[](p, n);
        });
        run_case("new(" + std::to_string(n) + ", nothrow)", [n] {
            void *p = ::operator new(opaque(n), std::nothrow);
            report(p, n, DEFAULT_ALIGN);
            ::operator delete(p, std::nothrow);
        });
    }
    run_case("new(0) twice: distinct", [] {
        void *a = ::operator new(opaque(0)), *b = ::operator new(opaque(0));
        add(a && b && a != b ? "distinct nonnull" : "same or NULL");
        ::operator delete(a, (size_t)0);
        ::operator delete(b);
    });
    for (size_t n : HUGE_SIZES) {
        std::string s = hex(n);
        run_case("new(" + s + ")", [n] {
            catching([n] { add(::operator new(opaque(n)) ? "nonnull" : "NULL"); });
        });
        run_case("new[](" + s + ")", [n] {
            catching([n] { add(::operator new[](opaque(n)) ? "nonnull" : "NULL"); });
        });
        run_case("new(" + s + ", nothrow)", [n] {
            catching([n] { add(::operator new(opaque(n), std::nothrow) ? "nonnull" : "NULL"); });
        });
        run_case("new[](" + s + ", nothrow)", [n] {
            catching([n] { add(::operator new[](opaque(n), std::nothrow) ? "nonnull" : "NULL"); });
        });
    }
    run_case("new[] expression, length overflows", [] {
        catching([] {
            size_t count = opaque(SIZE_MAXV / 4);
            add(new uint64_t[count] ? "nonnull" : "NULL");
        });
    });
}

static void handler_forms()
{
    run_case("new(SIZE_MAX), handler gives up at its 3rd call", [] {
        std::set_new_handler(counting_handler);
        catching([] { add(::operator new(opaque(SIZE_MAXV)) ? "nonnull" : "NULL"); });
        add("calls=" + std::to_string(handler_calls));
    });
    run_case("new[](SIZE_MAX, nothrow), handler gives up at its 3rd call", [] {
        std::set_new_handler(counting_handler);
        catching([] { add(::operator new[](opaque(SIZE_MAXV), std::nothrow) ? "nonnull" : "NULL"); });
        add("calls=" + std::to_string(handler_calls));
    });
    run_case("new(SIZE_MAX, align 64), handler gives up at its 3rd call", [] {
        std::set_new_handler(counting_handler);
        catching([] {
            add(::operator new(opaque(SIZE_MAXV), std::align_val_t(64)) ? "nonnull" : "NULL");
        });
        add("calls=" + std::to_string(handler_calls));
    });
    run_case("new(1<<62, align 64), handler gives up at its 3rd call", [] {
        // A size that fits the rounding: the aligned runtime operator's own
        // loop (a wrong alignment or size passed on would show here).
        std::set_new_handler(counting_handler);
        catching([] {
            add(::operator new(opaque((size_t)1 << 62), std::align_val_t(opaque(64))) ? "nonnull"
                                                                                        : "NULL");
        });
        add("calls=" + std::to_string(handler_calls));
    });
    run_case("new[](1<<62, align 4096, nothrow), handler gives up at its 3rd call", [] {
        std::set_new_handler(counting_handler);
        catching([] {
            void *p = ::operator new[](opaque((size_t)1 << 62), std::align_val_t(opaque(4096)),
                                       std::nothrow);
            add(p ? "nonnull" : "NULL");
        });
        add("calls=" + std::to_string(handler_calls));
    });
    run_case("new(SIZE_MAX), handler throws int", [] {
        std::set_new_handler(throwing_handler);
        catching([] { add(::operator new(opaque(SIZE_MAXV)) ? "nonnull" : "NULL"); });
        add("calls=" + std::to_string(handler_calls));
    });
    run_case("new(64) with a handler set: handler not called", [] {
        std::set_new_handler(counting_handler);
        void *p = ::operator new(opaque(64));
        report(p, 64, DEFAULT_ALIGN);
        add("calls=" + std::to_string(handler_calls));
        ::operator delete(p);
    });
}

static void aligned_forms()
{
    for (size_t align = 1; align <= ((size_t)1 << 22); align <<= 1) {
        for (size_t n : {(size_t)0, (size_t)1, align, 3 * align + 1}) {
            if (n == align && align == 1)
                continue; /* printed as n = 1 */
            std::string args = std::to_string(n) + ", align " + std::to_string(align);
            run_case("new(" + args + ")", [n, align] {
                void *p = ::operator new(opaque(n), std::align_val_t(align));
                report(p, n, align);
                ::operator delete(p, n, std::align_val_t(align));
            });
            run_case("new[](" + args + ", nothrow)", [n, align] {
                void *p = ::operator new[](opaque(n), std::align_val_t(align), std::nothrow);
                report(p, n, align);
                ::operator delete[](p, std::align_val_t(align), std::nothrow);
            });
        }
    }
    for (size_t align : {(size_t)3, (size_t)24, (size_t)48, (size_t)4097}) {
        std::string a = std::to_string(align);
        run_case("new(64, align " + a + "): not a power of two", [align] {
            catching([align] {
                add(::operator new(opaque(64), std::align_val_t(opaque(align))) ? "nonnull" : "NULL");
            });
        });
        run_case("new[](64, align " + a + ", nothrow): not a power of two", [align] {
            catching([align] {
                void *p = ::operator new[](opaque(64), std::align_val_t(opaque(align)), std::nothrow);
                add(p ? "nonnull" : "NULL");
            });
        });
    }
    for (size_t n : HUGE_SIZES) {
        std::string s = hex(n);
        run_case("new(" + s + ", align 4096)", [n] {
            catching([n] { add(::operator new(opaque(n), std::align_val_t(4096)) ? "nonnull" : "NULL"); });
        });
        run_case("new[](" + s + ", align 64, nothrow)", [n] {
            catching([n] {
                add(::operator new[](opaque(n), std::align_val_t(64), std::nothrow) ? "nonnull" : "NULL");
            });
        });
    }
}

static void delete_forms()
{
    run_case("every delete of nullptr", [] {
        ::operator delete(nullptr);
        ::operator delete[](nullptr);
        ::operator delete(nullptr, (size_t)8);
        ::operator delete[](nullptr, (size_t)8);
        ::operator delete(nullptr, std::nothrow);
        ::operator delete[](nullptr, std::nothrow);
        ::operator delete(nullptr, std::align_val_t(64));
        ::operator delete[](nullptr, std::align_val_t(64));
        ::operator delete(nullptr, (size_t)8, std::align_val_t(64));
        ::operator delete[](nullptr, (size_t)8, std::align_val_t(64));
        ::operator delete(nullptr, std::align_val_t(64), std::nothrow);
        ::operator delete[](nullptr, std::align_val_t(64), std::nothrow);
        add("returned");
    });
    run_case("delete twice", [] {
        void *p = ::operator new(opaque(48));
        void *volatile again = p;
        ::operator delete(p);
        ::operator delete(again);
        add("returned");
    });
    run_case("delete of a pointer from the stack", [] {
        char local[64];
        ::operator delete(opaque_ptr(local + 16));
        add("returned");
    });
    run_case("new, then free(); malloc, then delete", [] {
        // Not C++'s contract, but glibc's operators are malloc and free, and
        // programs rely on it; so must ours.
        void *p = ::operator new(opaque(100));
        free(opaque_ptr(p));
        void *q = malloc(opaque(100));
        ::operator delete(opaque_ptr(q));
        add("returned");
    });
    run_case("containers: vector, string, map of 100000", [] {
        std::vector<std::string> v;
        std::map<size_t, std::vector<char>> m;
        for (size_t i = 0; i < 100000; i++) {
            v.push_back(std::string(i % 300, 'x'));
            m[i * 7919 % 100003].resize(i % 5000);
        }
        size_t total = 0;
        for (auto &s : v)
            total += s.size();
        for (auto &e : m)
            total += e.second.size();
        add("total=" + std::to_string(total));
    });
}

/* Every operator's mangled name: where each resolves goes to stderr. */
static const char *const OPERATORS[] = {
    "_Znwm", "_Znam", "_ZnwmRKSt9nothrow_t", "_ZnamRKSt9nothrow_t", "_ZnwmSt11align_val_t",
    "_ZnamSt11align_val_t", "_ZnwmSt11align_val_tRKSt9nothrow_t",
    "_ZnamSt11align_val_tRKSt9nothrow_t", "_ZdlPv", "_ZdaPv", "_ZdlPvm", "_ZdaPvm",
    "_ZdlPvRKSt9nothrow_t", "_ZdaPvRKSt9nothrow_t", "_ZdlPvSt11align_val_t",
    "_ZdaPvSt11align_val_t", "_ZdlPvmSt11align_val_t", "_ZdaPvmSt11align_val_t",
    "_ZdlPvSt11align_val_tRKSt9nothrow_t", "_ZdaPvSt11align_val_tRKSt9nothrow_t",
};

int main()
{
    for (const char *name : OPERATORS) {
        Dl_info info;
        void *sym = dlsym(RTLD_DEFAULT, name);
        fprintf(stderr, "operator %s from: %s\n", name,
                sym && dladdr(sym, &info) && info.dli_fname ? info.dli_fname : "(unknown)");
    }
    plain_forms();
    handler_forms();
    aligned_forms();
    delete_forms();
    return 0;
}
