/* A thread that cannot be stopped for a while: a vfork parent waits for
 * its child in a killable (not interruptible) sleep, which PTRACE_INTERRUPT
 * does not end.
 *
 * As a shared library: hold_in_vfork(ms) vforks a child that sleeps `ms`
 * milliseconds and exits; returns when it has.  Built with -DSTANDALONE:
 * "vforker MS" prints "ready PID", does that, prints "after" and exits 0.
 */
#define _GNU_SOURCE
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int hold_in_vfork(int ms)
{
    pid_t pid = vfork();
    if (pid == 0) {
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
        syscall(SYS_nanosleep, &ts, 0);
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return status;
}

#ifdef STANDALONE
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv)
{
    char line[32];
    int n = snprintf(line, sizeof line, "ready %d\n", (int)getpid());
    write(1, line, n);
    struct timespec ts = {0, 200000000};
    nanosleep(&ts, 0);  /* time for the test to see "ready" */
    hold_in_vfork(argc > 1 ? atoi(argv[1]) : 2000);
    write(1, "after\n", 6);
    return 0;
}
#endif
