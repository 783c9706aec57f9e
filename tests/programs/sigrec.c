/* Records every SIGUSR1 and SIGRTMIN+1 with its siginfo.
 *
 * As a shared library (loaded by a Python target with ctypes):
 *   sigrec_install(fd)  installs SA_SIGINFO handlers that write, for each
 *                       signal delivered, one line on fd:
 *                       "siginfo SIGNO PID CODE VALUE TID\n"
 *                       and a SIGSEGV handler (that exits 11), for tests
 *                       that check a handler is never reset
 * Built with -DSTANDALONE it is a program that installs them on stdout,
 * prints "ready PID" and sleeps forever (20 ms raw nanosleeps).
 * The handler uses only write(2) (async-signal-safe).
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

static int out_fd = 1;

static char *put_int(char *p, long long v)
{
    char tmp[24];
    int n = 0;
    unsigned long long u = v < 0 ? -(unsigned long long)v : (unsigned long long)v;
    do { tmp[n++] = '0' + u % 10; u /= 10; } while (u);
    if (v < 0) *p++ = '-';
    while (n) *p++ = tmp[--n];
    return p;
}

static void handler(int sig, siginfo_t *info, void *uc)
{
    (void)uc;
    char line[160], *p = line;
    memcpy(p, "siginfo ", 8); p += 8;
    p = put_int(p, sig); *p++ = ' ';
    p = put_int(p, info->si_pid); *p++ = ' ';
    p = put_int(p, info->si_code); *p++ = ' ';
    p = put_int(p, (long long)info->si_value.sival_int); *p++ = ' ';
    p = put_int(p, (long long)syscall(SYS_gettid)); *p++ = '\n';
    write(out_fd, line, p - line);
}

static void segv(int sig)
{
    (void)sig;
    _exit(11);
}

int sigrec_install(int fd)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = handler;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    out_fd = fd;
    if (sigaction(SIGUSR1, &sa, 0) || sigaction(SIGRTMIN + 1, &sa, 0))
        return -1;
    if (signal(SIGSEGV, segv) == SIG_ERR)
        return -1;
    return SIGRTMIN + 1;
}

#ifdef STANDALONE
#include <stdio.h>
int main(void)
{
    sigrec_install(1);
    char line[32];
    int n = snprintf(line, sizeof line, "ready %d\n", (int)getpid());
    write(1, line, n);
    struct timespec ts = {0, 20000000};
    for (;;)
        syscall(SYS_nanosleep, &ts, 0);
}
#endif
