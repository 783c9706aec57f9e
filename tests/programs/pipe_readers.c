/* Target for tests/test_dump.py: two threads blocked in read() on pipes.
 *
 * The main thread reads lines from stdin (a pipe the test holds) and passes
 * each one to a worker thread through a pipe of its own; the worker reads
 * that pipe.  Both print what they read ("main LINE", "worker LINE"), so a
 * test can check that they still run after a dump.  SIGUSR1 and SIGUSR2
 * print "usr1" / "usr2" (SA_RESTART: the reads carry on).  Built with -O2
 * and without frame pointers; the functions a test looks for are noinline
 * and do work after their calls (no tail calls), so each is a frame.
 * Prints "ready" once the worker runs.
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int to_worker[2];

static void on_signal(int sig)
{
    const char *msg = sig == SIGUSR1 ? "usr1\n" : "usr2\n";
    (void)!write(1, msg, 5);
}

/* One line (or what one read() returns) from fd; -1 at EOF or error. */
__attribute__((noinline)) static long read_line(int fd, char *buf, size_t size)
{
    long n = read(fd, buf, size - 1);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    return n;
}

__attribute__((noinline)) static void worker_loop(void)
{
    char buf[256];
    while (read_line(to_worker[0], buf, sizeof buf) > 0)
        printf("worker %s", buf), fflush(stdout);
}

__attribute__((noinline)) static void *worker_start(void *arg)
{
    (void)arg;
    worker_loop();
    printf("worker done\n");
    return NULL;
}

__attribute__((noinline)) static void main_loop(void)
{
    char buf[256];
    long n;
    while ((n = read_line(0, buf, sizeof buf)) > 0) {
        printf("main %s", buf), fflush(stdout);
        (void)!write(to_worker[1], buf, (size_t)n);
    }
}

int main(void)
{
    struct sigaction sa;
    pthread_t worker;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGUSR2, &sa, NULL);
    if (pipe(to_worker) != 0 || pthread_create(&worker, NULL, worker_start, NULL) != 0)
        return 1;
    printf("ready\n");
    fflush(stdout);
    main_loop();
    close(to_worker[1]);
    pthread_join(worker, NULL);
    return 0;
}
