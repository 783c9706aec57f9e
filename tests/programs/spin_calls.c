/* Target for tests/test_dump.py: a thread often stopped in an epilogue.
 *
 * main -> spin_loop calls step() in a tight loop; step() keeps values in
 * callee-saved registers (rbx, rbp, r12) across a call to mix(), so it
 * pushes and pops them.  Stopped after one of its pops, its CFI rows (as
 * GCC writes them) still say the register is saved, at a slot now below
 * the stack pointer, outside any stack copy.  spin_loop keeps a frame
 * pointer, so its CFA is rbp-based: an unwinder that loses step()'s rbp
 * there cannot get past spin_loop.  Built -O2 without frame pointers
 * (but spin_loop's).  Prints "ready".
 */
#include <stdio.h>

volatile long sink;

__attribute__((noipa)) static long mix(long v)
{
    return (v * 0x9e3779b97f4a7c15L) ^ (v >> 7);
}

__attribute__((noipa)) static long step(long x)
{
    long a = x * 3, b = x ^ 0x55, c = x + 11;
    a += mix(b);
    return a + b + c;
}

__attribute__((noinline, optimize("no-omit-frame-pointer"))) static void spin_loop(void)
{
    long total = 1;
    for (;;) {
        total += step(total);
        sink = total;
    }
}

int main(void)
{
    printf("ready\n");
    fflush(stdout);
    spin_loop();
    return 0;
}
