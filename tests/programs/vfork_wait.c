/* Target for tests/test_dump.py: a thread in an uninterruptible sleep.
 *
 * A worker thread echoes stdin ("worker LINE"); the main thread then
 * vfork()s a child that only pause()s, so the main thread waits for it in
 * the kernel in TASK_KILLABLE ("D" in /proc) until the child dies.  Prints
 * "ready" before the vfork and "child gone" after it.
 */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

__attribute__((noinline)) static void *worker_start(void *arg)
{
    char buf[256];
    long n;
    (void)arg;
    while ((n = read(0, buf, sizeof buf - 1)) > 0) {
        buf[n] = 0;
        printf("worker %s", buf);
        fflush(stdout);
    }
    return NULL;
}

int main(void)
{
    pthread_t worker;
    if (pthread_create(&worker, NULL, worker_start, NULL) != 0)
        return 1;
    printf("ready\n");
    fflush(stdout);
    if (vfork() == 0) {
        pause();
        _exit(0);
    }
    printf("child gone\n");
    fflush(stdout);
    pthread_join(worker, NULL);
    return 0;
}
