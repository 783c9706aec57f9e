/* A thread that blocks in two known places, 3:1 by time.
 *
 * usage: offcpu_blocker SECONDS [TOTALS_FILE]
 *   main > block_sleep > sys3(nanosleep, 30 ms)
 *   main > block_read  > sys3(read) on a pipe that a helper thread writes
 *                        to 10 ms after being asked
 * with a little CPU work after each.  Prints "ready <pid>" once running.
 *
 * With TOTALS_FILE (an existing file of at least 40 bytes), the program
 * waits for a line on stdin before it starts (so that a profiler can be
 * attached first and see every call), and keeps in the file, through a
 * shared mapping (no system calls, so nothing that could block), five
 * native u64s: a sequence number (odd while the others change), the
 * nanoseconds spent so far in each of the two blocking calls, and the start
 * time and kind (1 sleep, 2 read; 0 none) of the call in progress, all
 * CLOCK_MONOTONIC.  That is the ground truth for a profiler, which on a
 * loaded machine may differ from 3:1: the time until the thread runs again
 * includes the wait for a CPU, and the read side also waits for the helper
 * thread to get a CPU, twice.
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
#include <fcntl.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int request[2], response[2];
static volatile unsigned long sink;
static uint64_t dummy_shared[5];
/* [0] seq, [1] ns in block_sleep's call, [2] ns in block_read's call,
 * [3] start of the call in progress, [4] its kind. */
static volatile uint64_t *shared = dummy_shared;

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

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

/* A seqlock write: readers retry while [0] is odd or has changed. */
static void publish(int done, uint64_t ns, uint64_t start, int kind)
{
    shared[0]++;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (done)
        shared[done] += ns;
    shared[3] = start;
    shared[4] = kind;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    shared[0]++;
}

static uint64_t call_begin(int kind)
{
    uint64_t t0 = now_ns();
    publish(0, 0, t0, kind);
    return t0;
}

static void call_end(int kind, uint64_t t0)
{
    publish(kind, now_ns() - t0, 0, 0);
}

__attribute__((noinline)) void block_sleep(void)
{
    struct timespec ts = {0, 30 * 1000 * 1000};
    uint64_t t0 = call_begin(1);
    sys3(SYS_nanosleep, (long)&ts, 0, 0);
    call_end(1, t0);
    __asm__ volatile("" ::: "memory");
}

__attribute__((noinline)) void block_read(void)
{
    char c = 'r';
    if (write(request[1], &c, 1) != 1)
        exit(1);
    uint64_t t0 = call_begin(2);
    sys3(SYS_read, response[0], (long)&c, 1);   /* ~10 ms: the helper sleeps first */
    call_end(2, t0);
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
    if (argc > 2) {
        int fd = open(argv[2], O_RDWR);
        void *m = fd < 0 ? MAP_FAILED
                         : mmap(NULL, 40, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) {
            perror(argv[2]);
            return 1;
        }
        shared = m;
        for (int i = 0; i < 5; i++)
            shared[i] = 0;   /* also faults the page in now */
    }
    pthread_create(&t, NULL, helper, NULL);
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    if (argc > 2) {
        char line[16];
        if (!fgets(line, sizeof line, stdin))
            return 1;
    }
    stop_at = now() + seconds;
    while (now() < stop_at) {
        block_sleep();
        work();
        block_read();
        work();
    }
    return 0;
}
