/* Ring 3 start of an SDK program: heap, stdio, argv from the command line,
 * then exit(main(argc, argv, envp)). */
#include <stdlib.h>
#include <string.h>
#include "rt.h"
#include "libc.h"

#define MAX_ARGS 64

extern struct revirt_boot_info *__rv_boot_info;
int main(int argc, char **argv, char **envp);

static char cmdline_copy[4096];
static char *argv_buf[MAX_ARGS + 1];
static char *envp_buf[1];
static char prog_name[] = "main";

void __rv_start(u64 boot_info)
{
    struct revirt_boot_info *bi = (struct revirt_boot_info *)boot_info;
    __rv_heap_init(bi);
    __rv_stdio_init();

    int argc = 0;
    argv_buf[argc++] = prog_name;
    if (bi && bi->magic == RVBI_MAGIC && bi->cmdline_addr) {
        strncpy(cmdline_copy, (const char *)bi->cmdline_addr, sizeof(cmdline_copy) - 1);
        char *s = cmdline_copy;
        while (*s && argc < MAX_ARGS) {
            while (*s == ' ' || *s == '\t' || *s == '\n')
                *s++ = 0;
            if (!*s)
                break;
            argv_buf[argc++] = s;
            while (*s && *s != ' ' && *s != '\t' && *s != '\n')
                s++;
        }
    }
    argv_buf[argc] = 0;
    exit(main(argc, argv_buf, envp_buf));
}
