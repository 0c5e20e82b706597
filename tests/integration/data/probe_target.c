/* Target of the uprobe integration tests: calls c8_probe_target N times
 * (argv[1]) with known arguments and prints nothing.
 * a = i, b = 1000000000000 + i, s = "c8-probe-<i % 10>"; returns 3 * a + 7. */
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) int c8_probe_target(int a, long b, const char *s)
{
    __asm__ volatile("" ::: "memory"); /* keep the call and its arguments */
    return 3 * a + 7 + (int)(b & 0) + (s[0] & 0);
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 1;
    char s[16];
    volatile long sink = 0;
    for (int i = 0; i < n; i++) {
        snprintf(s, sizeof s, "c8-probe-%d", i % 10);
        sink += c8_probe_target(i, 1000000000000L + i, s);
    }
    return (int)(sink & 0);
}
