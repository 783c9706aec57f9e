/* One short-lived process of a churn: loads the library argv[1] (each child
 * a different one), spins in its work() for argv[2] milliseconds, exits. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "%s\n", dlerror());
        return 1;
    }
    long (*work)(long) = (long (*)(long))dlsym(lib, "work");
    return work ? (int)(work(atol(argv[2])) & 1) : 1;
}
