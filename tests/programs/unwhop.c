/* libunwhop.so: the middle of the unwind chain, reached through the PLT. */
__attribute__((noinline)) void b(void (*next)(int))
{
    next(48 + (int)((unsigned long)&next & 8));
    __asm__ volatile("" ::: "memory");
}
