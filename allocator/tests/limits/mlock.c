/* One allocation, then mlockall(MCL_CURRENT | MCL_FUTURE) as a real-time
 * program makes at the end of its start-up, or with the argument "first"
 * before it by the system call itself (no library's mlockall: hakmem's would
 * make its registry read-only first), as a library constructor or a program
 * that locks itself in first thing might: prints how
 * much is resident after both ("rss_kib N"). With "current", mlockall
 * (MCL_CURRENT) only, then a 1.5 MiB block written through: prints how much
 * of the mapping holding it is locked ("locked_kib_of_block N"; memory
 * mapped after an MCL_CURRENT lock is not locked). Exit 2 if mlockall is
 * refused. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The "Locked:" figure (KiB) of the mapping holding `p` in
 * /proc/self/smaps, or -1. */
static long locked_kib_at(const void *p) {
    char line[256];
    long kib = -1;
    int inside = 0;
    FILE *smaps = fopen("/proc/self/smaps", "r");
    if (!smaps)
        return -1;
    while (fgets(line, sizeof line, smaps)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' '))
            inside = (unsigned long)p >= lo && (unsigned long)p < hi;
        else if (inside && strncmp(line, "Locked:", 7) == 0)
            kib = strtol(line + 7, NULL, 10);
    }
    fclose(smaps);
    return kib;
}

/* The figure of /proc/self/status's line `key` in KiB, or -1. */
static long status_kib(const char *key) {
    char line[256];
    long kib = -1;
    FILE *status = fopen("/proc/self/status", "r");
    if (!status)
        return -1;
    while (fgets(line, sizeof line, status))
        if (strncmp(line, key, strlen(key)) == 0)
            kib = strtol(line + strlen(key), NULL, 10);
    fclose(status);
    return kib;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    int first = strcmp(mode, "first") == 0;
    int flags = strcmp(mode, "current") == 0 ? MCL_CURRENT : MCL_CURRENT | MCL_FUTURE;
    if (first && syscall(SYS_mlockall, flags) != 0) {
        perror("mlockall");
        return 2;
    }
    void *volatile block = malloc(100);
    if (!first && mlockall(flags) != 0) {
        perror("mlockall");
        return 2;
    }
    printf("rss_kib %ld\n", status_kib("VmRSS:"));
    if (flags == MCL_CURRENT) {
        char *big = malloc(1536 << 10);
        if (!big)
            return 3;
        memset(big, 1, 1536 << 10);
        printf("locked_kib_of_block %ld\n", locked_kib_at(big));
        free(big);
    }
    free(block);
    return 0;
}
