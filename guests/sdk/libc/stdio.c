/*
 * stdio on the serial console: musl's stdio (printf family, fgets, getchar,
 * puts...) with its read and write back ends replaced by ones that poll the
 * UART (fd 0 reads it, every other stream writes it). There is no file system: fopen fails with ENOENT (read
 * files from the disk with rv_disk_read).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <sys/types.h>
#include "rt.h"
#include "libc.h"

#define CTRL_D 0x04

/* The leading fields of musl's struct _IO_FILE (src/internal/stdio_impl.h,
 * musl 1.2.3 as in Debian 12; unchanged since 1.1). musl's own stdin, stdout
 * and stderr objects are kept; only the functions that would make system
 * calls are replaced below. __rv_stdio_init checks the layout at start. */
struct musl_file {
    unsigned flags;
    unsigned char *rpos, *rend;
    int (*close)(FILE *);
    unsigned char *wend, *wpos;
    unsigned char *mustbezero_1;
    unsigned char *wbase;
    size_t (*read)(FILE *, unsigned char *, size_t);
    size_t (*write)(FILE *, const unsigned char *, size_t);
    off_t (*seek)(FILE *, off_t, int);
    unsigned char *buf;
    size_t buf_size;
    FILE *prev, *next;
    int fd;
};
#define F_EOF 16
#define F_ERR 32

static void con_write(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        con_putc((char)p[i]);
}

size_t __stdio_write(FILE *file, const unsigned char *buf, size_t len)
{
    struct musl_file *f = (struct musl_file *)file;
    con_write(f->wbase, (size_t)(f->wpos - f->wbase));
    con_write(buf, len);
    f->wend = f->buf + f->buf_size;
    f->wpos = f->wbase = f->buf;
    return len;
}

/* stdout stays line buffered: the console is a terminal. */
size_t __stdout_write(FILE *f, const unsigned char *buf, size_t len)
{
    return __stdio_write(f, buf, len);
}

/* Blocks for the first byte, then takes what is already there, up to a
 * newline. A Ctrl-D (0x04) as the first byte is end of file: a serial line
 * has none. Fills buf, then the FILE's buffer, like musl's readv does. */
size_t __stdio_read(FILE *file, unsigned char *buf, size_t len)
{
    struct musl_file *f = (struct musl_file *)file;
    size_t first = len - !!f->buf_size, total = first + f->buf_size, cnt = 0;
    for (;;) {
        int c;
        if (cnt == 0) {
            c = con_getc();
        } else if (cnt < total && (inb(COM1_LSR) & LSR_DATA_READY)) {
            c = inb(COM1_DATA);
        } else {
            break;
        }
        if (c == CTRL_D)
            break;
        if (cnt < first)
            buf[cnt] = (unsigned char)c;
        else
            f->buf[cnt - first] = (unsigned char)c;
        cnt++;
        if (c == '\n')
            break;
    }
    if (!cnt) {
        f->flags |= F_EOF;
        return 0;
    }
    if (cnt <= first)
        return cnt;
    cnt -= first;
    f->rpos = f->buf;
    f->rend = f->buf + cnt;
    if (f->buf_size)
        buf[len - 1] = *f->rpos++;
    return len;
}

off_t __stdio_seek(FILE *f, off_t off, int whence)
{
    (void)f;
    (void)off;
    (void)whence;
    errno = ESPIPE;
    return -1;
}

int __stdio_close(FILE *f)
{
    (void)f;
    return 0;
}

void __rv_stdio_init(void)
{
    const struct musl_file *i = (const void *)stdin, *o = (const void *)stdout,
                           *e = (const void *)stderr;
    if (i->fd != 0 || o->fd != 1 || e->fd != 2 || o->buf_size != BUFSIZ) {
        con_puts("revirt sdk: musl's FILE layout is not the one libc/stdio.c expects\n");
        power_off(127);
    }
}

/* No file system. */
FILE *fopen(const char *path, const char *mode)
{
    (void)path;
    (void)mode;
    errno = ENOENT;
    return 0;
}

FILE *freopen(const char *path, const char *mode, FILE *f)
{
    (void)path;
    (void)mode;
    (void)f;
    errno = ENOENT;
    return 0;
}

FILE *tmpfile(void)
{
    errno = ENOSYS;
    return 0;
}

int remove(const char *path)
{
    (void)path;
    errno = ENOENT;
    return -1;
}

int rename(const char *a, const char *b)
{
    (void)a;
    (void)b;
    errno = ENOENT;
    return -1;
}

/* One task runs the C library at a time (tasks switch at timer ticks, and
 * the SDK's library is not reentrant across them), so stdio's and the
 * library's internal locks are no-ops; musl's versions would use futexes. */
int __lockfile(FILE *f)
{
    (void)f;
    return 0;
}

void __unlockfile(FILE *f)
{
    (void)f;
}

void __lock(volatile int *l)
{
    (void)l;
}

void __unlock(volatile int *l)
{
    (void)l;
}

/* Character I/O through fread/fwrite: musl's versions fall back to a futex
 * wait for a locked FILE (a system call). */
int fgetc(FILE *f)
{
    unsigned char c;
    return fread(&c, 1, 1, f) == 1 ? c : EOF;
}
int getc(FILE *f) __attribute__((alias("fgetc")));
int getc_unlocked(FILE *f) __attribute__((alias("fgetc")));
int fgetc_unlocked(FILE *f) __attribute__((alias("fgetc")));
int _IO_getc(FILE *f) __attribute__((alias("fgetc")));

int getchar(void)
{
    return fgetc(stdin);
}
int getchar_unlocked(void) __attribute__((alias("getchar")));

int fputc(int c, FILE *f)
{
    unsigned char ch = (unsigned char)c;
    return fwrite(&ch, 1, 1, f) == 1 ? ch : EOF;
}
int putc(int c, FILE *f) __attribute__((alias("fputc")));
int putc_unlocked(int c, FILE *f) __attribute__((alias("fputc")));
int fputc_unlocked(int c, FILE *f) __attribute__((alias("fputc")));
int _IO_putc(int c, FILE *f) __attribute__((alias("fputc")));

int putchar(int c)
{
    return fputc(c, stdout);
}
int putchar_unlocked(int c) __attribute__((alias("putchar")));

char *tmpnam(char *buf)
{
    (void)buf;
    return 0; /* no file system */
}
