/* The smallest SDK program: `guests/sdk/rvcc -o hello.img examples/hello.c`,
 * then `revirt run hello.img --cmdline 'hello world'`. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <revirt.h>

int main(int argc, char **argv)
{
    printf("hello from revirt: %d args\n", argc);
    for (int i = 1; i < argc; i++)
        printf("  argv[%d] = %s\n", i, argv[i]);
    char *p = malloc(100);
    snprintf(p, 100, "%.14g %5.2f %e", 3.14159265358979, 2.5, 1e-10);
    printf("float: %s, strtod: %g\n", p, strtod("6.02214076e23", 0));
    printf("clock: %llu ns, disk: %u sectors\n", (unsigned long long)rv_clock_ns(), rv_disk_sectors());
    free(p);
    return 3;
}
