/* Console and device helpers of the runtime (serial, idle, clock, power).
 * Freestanding: runs in ring 3 and in ring 0 (the demo's ring0 workload). */
#include "rt.h"

void con_putc(char c)
{
    while (!(inb(COM1_LSR) & LSR_THR_EMPTY))
        ;
    outb(COM1_DATA, (u8)c);
}

void con_puts(const char *s)
{
    while (*s)
        con_putc(*s++);
}

static void put_u64(u64 v, unsigned base, int width, char pad)
{
    char buf[24];
    int n = 0;
    do {
        unsigned d = (unsigned)(v % base);
        buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v);
    while (n < width && n < (int)sizeof(buf))
        buf[n++] = pad;
    while (n)
        con_putc(buf[--n]);
}

/* A small printf: %s %c %d %u %x %%, optional '0' flag, width and 'l'. */
void con_vprintf(const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            con_putc(*fmt);
            continue;
        }
        char pad = ' ';
        int width = 0, lng = 0;
        fmt++;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') {
            lng = 1;
            fmt++;
        }
        switch (*fmt) {
        case 's': {
            const char *s = va_arg(ap, const char *);
            con_puts(s ? s : "(null)");
            break;
        }
        case 'c':
            con_putc((char)va_arg(ap, int));
            break;
        case 'd': {
            long v = lng ? va_arg(ap, long) : va_arg(ap, int);
            if (v < 0) {
                con_putc('-');
                put_u64(-(u64)v, 10, width ? width - 1 : 0, pad);
            } else {
                put_u64((u64)v, 10, width, pad);
            }
            break;
        }
        case 'u':
        case 'x': {
            u64 v = lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned);
            put_u64(v, *fmt == 'x' ? 16 : 10, width, pad);
            break;
        }
        case '%':
            con_putc('%');
            break;
        case 0:
            return;
        default:
            con_putc('%');
            con_putc(*fmt);
            break;
        }
    }
}

void con_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    con_vprintf(fmt, ap);
    va_end(ap);
}

void idle(void)
{
    outl(PORT_IDLE, 0);
}

int con_getc(void)
{
    while (!(inb(COM1_LSR) & LSR_DATA_READY))
        idle(); /* returns when input is ready or an IRQ is pending */
    return inb(COM1_DATA);
}

void power_off(u32 status)
{
    for (;;)
        outl(PORT_POWER_OFF, status);
}

u64 clock_ns(void)
{
    u64 lo = inl(PORT_CLOCK_LO); /* latches the high half */
    u64 hi = inl(PORT_CLOCK_HI);
    return hi << 32 | lo;
}
