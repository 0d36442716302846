/* One allocation, then mlockall(MCL_CURRENT | MCL_FUTURE) as a real-time
 * program makes at the end of its start-up, or with the argument "first"
 * before it, as one that locks itself in first thing in main: prints how
 * much is resident after both ("rss_kib N"). Exit 2 if mlockall is
 * refused. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

static int lock_all(void) {
    if (mlockall(MCL_CURRENT | MCL_FUTURE) != 0) {
        perror("mlockall");
        return 0;
    }
    return 1;
}

int main(int argc, char **argv) {
    int first = argc > 1 && strcmp(argv[1], "first") == 0;
    if (first && !lock_all())
        return 2;
    void *volatile block = malloc(100);
    if (!first && !lock_all())
        return 2;
    char line[256];
    FILE *status = fopen("/proc/self/status", "r");
    if (!status)
        return 3;
    while (fgets(line, sizeof line, status))
        if (strncmp(line, "VmRSS:", 6) == 0)
            printf("rss_kib %ld\n", strtol(line + 6, NULL, 10));
    fclose(status);
    free(block);
    return 0;
}
