/* One allocation, then mlockall(MCL_CURRENT | MCL_FUTURE) as a real-time
 * program makes at the end of its start-up: prints how much is resident
 * after it ("rss_kib N"). Exit 2 if mlockall is refused. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

int main(void) {
    void *volatile first = malloc(100);
    if (mlockall(MCL_CURRENT | MCL_FUTURE) != 0) {
        perror("mlockall");
        return 2;
    }
    char line[256];
    FILE *status = fopen("/proc/self/status", "r");
    if (!status)
        return 3;
    while (fgets(line, sizeof line, status))
        if (strncmp(line, "VmRSS:", 6) == 0)
            printf("rss_kib %ld\n", strtol(line + 6, NULL, 10));
    fclose(status);
    free(first);
    return 0;
}
