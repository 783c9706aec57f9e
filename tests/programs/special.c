/* Targets for frames that are neither plain ELF nor kernel.
 *
 * usage: special jitreuse SECONDS - as jit, but on SIGUSR1 the same address
 *                                is named again (jit_second), as a JIT
 *                                reusing freed code memory would
 *        special jit SECONDS   - runs generated code in an anonymous
 *                                executable mapping and names it in
 *                                /tmp/perf-PID.map, as a JIT would
 *        special vdso SECONDS  - calls clock_gettime in a loop (vDSO code)
 * Prints "ready <pid> <jit address>" once running.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t renamed;

static void on_usr1(int sig)
{
    (void)sig;
    renamed = 1;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "jit";
    double stop_at = now() + (argc > 2 ? atof(argv[2]) : 5.0);

    if (strcmp(mode, "jit") == 0 || strcmp(mode, "jitreuse") == 0) {
        int reuse = strcmp(mode, "jitreuse") == 0;
        if (reuse)
            signal(SIGUSR1, on_usr1);
        /* mov $2000000,%ecx; 1: dec %ecx; jnz 1b; ret */
        static const unsigned char code[] = {0xb9, 0x80, 0x84, 0x1e, 0x00, 0xff, 0xc9, 0x75, 0xfc, 0xc3};
        unsigned char *mem = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC,
                                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        char path[64];
        FILE *map;
        if (mem == MAP_FAILED)
            return 1;
        memcpy(mem, code, sizeof code);
        snprintf(path, sizeof path, "/tmp/perf-%d.map", (int)getpid());
        map = fopen(path, "w");
        fprintf(map, "%lx %zx jit_spin_loop\n", (unsigned long)mem, sizeof code);
        fclose(map);
        printf("ready %d %lx\n", (int)getpid(), (unsigned long)mem);
        fflush(stdout);
        while (now() < stop_at) {
            ((void (*)(void))mem)();
            if (reuse && renamed) {
                reuse = 0;
                map = fopen(path, "a");
                fprintf(map, "%lx %zx jit_second\n", (unsigned long)mem, sizeof code);
                fclose(map);
            }
        }
        unlink(path);
    } else {
        struct timespec ts;
        printf("ready %d 0\n", (int)getpid());
        fflush(stdout);
        while (now() < stop_at)
            for (int i = 0; i < 1000; i++)
                clock_gettime(CLOCK_MONOTONIC, &ts);
    }
    return 0;
}
