/* A target for unwinding through signal frames, built with -O2 -fomit-frame-pointer.
 *
 * main > outer_a > outer_b > interrupted spins; every 20 ms SIGALRM (installed
 * with sigaction, so the kernel returns through glibc's __restore_rt) runs
 * on_alarm > handler_a > handler_b > handler_spin for a few milliseconds
 * (10M iterations: about 6 ms, a third of the time, so alarms do not pile up
 * on a loaded machine).
 * A sample taken in the handler must unwind
 *   handler_spin < handler_b < handler_a < on_alarm < __restore_rt
 *   < interrupted < outer_b < outer_a < main
 * Exits after SIGNALS alarms (about 2 s), or after DEADLINE seconds however
 * few came (a starved run must not keep a test waiting), with SIGALRM
 * blocked from then on.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#define NOINLINE __attribute__((noinline))
#define NO_TAIL_CALL() __asm__ volatile("" ::: "memory")
#define SIGNALS 100
#define DEADLINE 8

volatile unsigned long sink;
static volatile sig_atomic_t alarms;

NOINLINE void handler_spin(void)
{
    for (unsigned long i = 0; i < 10000000; i++)
        sink += i * i;
}

NOINLINE void handler_b(void) { handler_spin(); NO_TAIL_CALL(); }
NOINLINE void handler_a(void) { handler_b(); NO_TAIL_CALL(); }

NOINLINE static void on_alarm(int sig)
{
    (void)sig;
    handler_a();
    alarms++;
    NO_TAIL_CALL();
}

NOINLINE void interrupted(void)
{
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (unsigned long i = 1; alarms < SIGNALS; i++) {
        sink++;
        if ((i & 0xfffff) == 0) {   /* a clock read every ~1M rounds: rare in the samples */
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (now.tv_sec - start.tv_sec >= DEADLINE)
                break;
        }
    }
    /* No more alarms: on a loaded machine a pending one would otherwise
     * keep interrupting the exit path for a while. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGALRM);
    sigprocmask(SIG_BLOCK, &set, NULL);
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
}

NOINLINE void outer_b(void) { interrupted(); NO_TAIL_CALL(); }
NOINLINE void outer_a(void) { outer_b(); NO_TAIL_CALL(); }

int main(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGALRM, &sa, NULL) != 0)
        return 1;
    struct itimerval it = {{0, 20000}, {0, 20000}};
    if (setitimer(ITIMER_REAL, &it, NULL) != 0)
        return 1;
    outer_a();
    printf("done %d\n", (int)alarms);
    return 0;
}
