/* A CPU-bound target with a known call chain: main > a > b > c > leaf.
 *
 * usage: chain SECONDS [THREADS [LATE_DELAY_SECONDS]]
 *   THREADS extra threads ("worker") run the same chain from their own
 *   start routine; with LATE_DELAY_SECONDS, one more thread named "late" is
 *   started that long after the program starts.
 * Prints "ready <pid>" once running.  Built with frame pointers and without
 * sibling-call optimisation so that every level is a real frame.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long sink;
static double stop_at;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Called once per leaf() so that leaf is not a leaf function: gcc omits
 * the frame-pointer prologue of true leaf functions even with
 * -fno-omit-frame-pointer, which would hide c() from the kernel's walk. */
__attribute__((noinline)) void tick(void) { __asm__ volatile("" ::: "memory"); }

__attribute__((noinline)) void leaf(void)
{
    for (unsigned long i = 0; i < 2000000; i++)
        sink += i * i;
    tick();
}

__attribute__((noinline)) void c(void) { leaf(); __asm__ volatile("" ::: "memory"); }
__attribute__((noinline)) void b(void) { c(); __asm__ volatile("" ::: "memory"); }
__attribute__((noinline)) void a(void) { b(); __asm__ volatile("" ::: "memory"); }

static void spin(void)
{
    while (now() < stop_at)
        a();
}

static void *worker(void *name)
{
    pthread_setname_np(pthread_self(), (const char *)name);
    spin();
    return NULL;
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 5.0;
    int threads = argc > 2 ? atoi(argv[2]) : 0;
    double late = argc > 3 ? atof(argv[3]) : -1.0;
    pthread_t t[64], late_thread;
    double start = now();

    stop_at = start + seconds;
    for (int i = 0; i < threads && i < 64; i++)
        pthread_create(&t[i], NULL, worker, "worker");
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    if (late >= 0) {
        while (now() < start + late)
            a();
        pthread_create(&late_thread, NULL, worker, "late");
    }
    spin();
    for (int i = 0; i < threads && i < 64; i++)
        pthread_join(t[i], NULL);
    if (late >= 0)
        pthread_join(late_thread, NULL);
    return 0;
}
