/* echo: a line-oriented serial echo. '\r' is dropped; "quit" or 0x04 ends. */
#include "demo.h"
#include "workloads.h"

#define LINE_MAX 256
#define CTRL_D 0x04

int wl_echo(void)
{
    char line[LINE_MAX];
    size_t n = 0;

    con_puts("echo: ready\n");
    for (;;) {
        int c = con_getc();
        if (c == CTRL_D) {
            if (n) { /* a pending partial line is echoed first */
                line[n] = 0;
                con_printf("echo: %s\n", line);
            }
            break;
        }
        if (c == '\r')
            continue;
        if (c == '\n') {
            line[n] = 0;
            n = 0;
            if (str_eq(line, "quit"))
                break;
            con_printf("echo: %s\n", line);
            continue;
        }
        if (n < LINE_MAX - 1) /* longer lines are truncated */
            line[n++] = (char)c;
    }
    con_puts("echo: bye\n");
    return 0;
}
