/* Targets for the DWARF unwinder, built with -O2 -fomit-frame-pointer.
 *
 * usage: unwind MODE SECONDS
 *   chain:  main > a > b > c > d > leaf, where c uses alloca (its CFA is
 *           on rbp) and b is reached through the PLT (it lives in
 *           libunwhop.so, which calls c back through a pointer)
 *   qsort:  main > a > qsort (libc) > ... > compare > leaf
 * Prints "ready <pid>" once running.
 */
#include <alloca.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void b(void (*next)(int));   /* in libunwhop.so */

volatile unsigned long sink;

__attribute__((noinline)) void leaf(void)
{
    for (unsigned long i = 0; i < 300000; i++)
        sink += i * i;
}

__attribute__((noinline)) void d(void) { leaf(); __asm__ volatile("" ::: "memory"); }

__attribute__((noinline)) void c(int n)
{
    char *p = alloca(n);
    memset(p, (int)n, n);
    d();
    sink += p[n - 1];
}

__attribute__((noinline)) static int compare(const void *x, const void *y)
{
    leaf();
    return *(const int *)x - *(const int *)y;
}

__attribute__((noinline)) void a(const char *mode)
{
    if (strcmp(mode, "qsort") == 0) {
        int v[16];
        for (int i = 0; i < 16; i++)
            v[i] = (i * 7919) % 16;
        qsort(v, 16, sizeof v[0], compare);
    } else {
        b(c);
    }
    __asm__ volatile("" ::: "memory");
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "chain";
    double stop_at = now() + (argc > 2 ? atof(argv[2]) : 5.0);
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    while (now() < stop_at)
        a(mode);
    return 0;
}
