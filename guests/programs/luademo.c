/*
 * Lua 5.4 inside the guest: runs a script from the disk (the text, up to the
 * first NUL byte or the end) or given on the command line after `-e`. The
 * same file builds for the host from the same Lua sources (Makefile:
 * luademo-host), and tests/sdk.rs compares the two outputs.
 *   guest: revirt run out/luademo.img --disk SCRIPT    (or --cmdline '-e CODE')
 *   host:  out/luademo-host SCRIPT                      (or -e CODE)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lua.h"
#include "lauxlib.h"
#include "lualib.h"
#ifdef __revirt__
#include <revirt.h>
#endif

/* The words after -e, joined by single spaces (the guest's command line
 * arrives split at spaces). */
static char *join(int argc, char **argv, size_t *len)
{
    size_t n = 0;
    for (int i = 2; i < argc; i++)
        n += strlen(argv[i]) + 1;
    char *s = malloc(n + 1), *p = s;
    for (int i = 2; i < argc; i++) {
        size_t k = strlen(argv[i]);
        memcpy(p, argv[i], k);
        p += k;
        *p++ = ' ';
    }
    *p = 0;
    *len = (size_t)(p - s);
    return s;
}

static char *load_script(int argc, char **argv, size_t *len)
{
    if (argc > 1 && !strcmp(argv[1], "-e"))
        return join(argc, argv, len);
#ifdef __revirt__
    size_t cap = (size_t)rv_disk_sectors() * RV_SECTOR;
    char *s = malloc(cap + 1);
    if (!cap || !s || rv_disk_pread(s, cap, 0))
        return 0;
    s[cap] = 0;
    *len = strlen(s);
    return s;
#else
    FILE *f = argc > 1 ? fopen(argv[1], "rb") : 0;
    if (!f)
        return 0;
    fseek(f, 0, SEEK_END);
    long cap = ftell(f);
    rewind(f);
    char *s = malloc((size_t)cap + 1);
    if (!s || fread(s, 1, (size_t)cap, f) != (size_t)cap)
        return 0;
    fclose(f);
    s[cap] = 0;
    *len = strlen(s);
    return s;
#endif
}

int main(int argc, char **argv)
{
    size_t len;
    char *code = load_script(argc, argv, &len);
    if (!code) {
        printf("luademo: no script (give a disk with the script, or -e CODE)\n");
        return 1;
    }
    lua_State *L = luaL_newstate();
    if (!L) {
        printf("luademo: cannot create the Lua state\n");
        return 1;
    }
    luaL_openlibs(L);
    int rc = luaL_loadbuffer(L, code, len, "=script") || lua_pcall(L, 0, 0, 0);
    if (rc) {
        printf("luademo: error: %s\n", lua_tostring(L, -1));
        lua_close(L);
        return 1;
    }
    lua_close(L);
    fflush(stdout);
    return 0;
}
