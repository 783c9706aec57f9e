/* A thread that blocks in two known places, 3:1 by time.
 *
 * usage: offcpu_blocker SECONDS
 *   main > block_sleep > sys3(nanosleep, 30 ms)
 *   main > block_read  > sys3(read) on a pipe that a helper thread writes
 *                        to 10 ms after being asked
 * with a little CPU work after each.  Prints "ready <pid>" once running.
 *
 * The system calls go through sys3(), a function with a frame of its own,
 * rather than libc's wrappers: those are built without frame pointers, and
 * a frame-pointer walk from inside one skips its caller (the return address
 * into block_sleep is on the wrapper's stack, not in any frame record), so
 * block_sleep / block_read would vanish from the user stacks.
 * Build with -fno-omit-frame-pointer -mno-omit-leaf-frame-pointer
 * -fno-optimize-sibling-calls.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int request[2], response[2];
static volatile unsigned long sink;

/* Called by sys3 so that sys3 is not a leaf function: gcc omits the
 * frame-pointer prologue of true leaf functions even with
 * -mno-omit-leaf-frame-pointer, and without a frame of its own sys3 would
 * hide its caller just like a libc wrapper. */
__attribute__((noinline)) void not_leaf(void) { __asm__ volatile("" ::: "memory"); }

__attribute__((noinline)) long sys3(long nr, long a, long b, long c)
{
    long ret;
#if defined(__x86_64__)
    __asm__ volatile("syscall" : "=a"(ret) : "a"(nr), "D"(a), "S"(b), "d"(c)
                     : "rcx", "r11", "memory");
#elif defined(__aarch64__)
    register long x8 __asm__("x8") = nr;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2) : "memory");
    ret = x0;
#else
    ret = syscall(nr, a, b, c);
#endif
    not_leaf();
    return ret;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) void block_sleep(void)
{
    struct timespec ts = {0, 30 * 1000 * 1000};
    sys3(SYS_nanosleep, (long)&ts, 0, 0);
    __asm__ volatile("" ::: "memory");
}

__attribute__((noinline)) void block_read(void)
{
    char c = 'r';
    if (write(request[1], &c, 1) != 1)
        exit(1);
    sys3(SYS_read, response[0], (long)&c, 1);   /* ~10 ms: the helper sleeps first */
    __asm__ volatile("" ::: "memory");
}

__attribute__((noinline)) void work(void)
{
    for (unsigned long i = 0; i < 100000; i++)
        sink += i * i;
}

/* Answers each request 10 ms later. */
static void *helper(void *unused)
{
    char c;
    struct timespec ts = {0, 10 * 1000 * 1000};
    (void)unused;
    while (read(request[0], &c, 1) == 1) {
        nanosleep(&ts, NULL);
        if (write(response[1], &c, 1) != 1)
            break;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 5.0;
    double stop_at;
    pthread_t t;

    if (pipe(request) || pipe(response))
        return 1;
    pthread_create(&t, NULL, helper, NULL);
    stop_at = now() + seconds;
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    while (now() < stop_at) {
        block_sleep();
        work();
        block_read();
        work();
    }
    return 0;
}
