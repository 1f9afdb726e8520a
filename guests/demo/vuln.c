/*
 * vuln: the forensic demo. serve() reads a line into a 32-byte stack buffer
 * without a bounds check; a long enough line overwrites its saved return
 * address. backdoor() sits at a fixed address (0x200000, see link.ld) so an
 * exploit can jump to it. README.md gives the exact payload.
 */
#include "demo.h"
#include "workloads.h"

/* Kept out of line and with a frame pointer so the stack layout is stable:
 * name[] at rbp-0x30 (checked by objdump in README.md). '\r' is dropped. */
NOINLINE __attribute__((optimize("no-omit-frame-pointer"))) void serve(void)
{
    char name[32];
    size_t n = 0;
    for (;;) {
        int c = con_getc();
        if (c == '\n')
            break;
        if (c == '\r')
            continue;
        name[n++] = (char)c; /* BUG: no bounds check */
    }
    name[n] = 0;
    con_printf("vuln: hello, %s\n", name);
}

/* Never called by the program: only reachable by hijacking control flow. */
__attribute__((section(".backdoor"), noinline, used)) NORETURN void backdoor(void)
{
    con_puts("vuln: PWNED - backdoor reached\n");
    power_off(66);
}

int wl_vuln(void)
{
    con_puts("vuln: name?\n");
    serve();
    con_puts("vuln: bye\n");
    return 0;
}
