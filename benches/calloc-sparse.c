// calloc-sparse SIZE N: N callocs of SIZE bytes, one byte touched in each;
// prints the resident set after them and their time. A program that
// callocs buffers and fills few of them pays, under an allocator that
// writes every byte of a block it could know reads zero, N * SIZE of RSS.
//
//   gcc -O2 -o calloc-sparse benches/calloc-sparse.c
//   LD_PRELOAD=target/release/libhakmem.so ./calloc-sparse 200000 1000
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: calloc-sparse SIZE N\n");
        return 2;
    }
    size_t size = strtoul(argv[1], NULL, 0);
    int n = atoi(argv[2]);
    if (size == 0 || n <= 0) {
        fprintf(stderr, "calloc-sparse: SIZE and N must be positive\n");
        return 2;
    }
    char **v = malloc(n * sizeof *v);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < n; i++) {
        v[i] = calloc(1, size);
        if (!v[i]) {
            perror("calloc");
            return 1;
        }
        v[i][size / 2] = 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f || fscanf(f, "%ld %ld", &pages, &resident) != 2)
        return 1;
    printf("size %zu n %d: rss %ld MiB, %.1f ms\n", size, n, resident * sysconf(_SC_PAGESIZE) >> 20,
           (b.tv_sec - a.tv_sec) * 1e3 + (b.tv_nsec - a.tv_nsec) / 1e6);
    return 0;
}
