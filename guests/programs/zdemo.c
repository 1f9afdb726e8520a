/*
 * zlib inside the guest: compress and decompress data read from the disk,
 * print sizes and checksums. The same file builds for the host against the
 * system's zlib (Makefile: zdemo-host), and tests/sdk.rs compares the two.
 *   guest: revirt run out/zdemo.img --disk DATA [--cmdline 'bytes=N level=L']
 *   host:  out/zdemo-host DATA [bytes=N level=L]
 * bytes defaults to the whole disk (file), level to 6. With gen=N instead of a
 * disk, the input is N bytes of text made up by an LCG (no devices needed:
 * QEMU runs it too, scripts/bench-sdk.sh).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#ifdef __revirt__
#include <revirt.h>
#endif

static long arg(int argc, char **argv, const char *key, long dflt)
{
    size_t k = strlen(key);
    for (int i = 1; i < argc; i++)
        if (!strncmp(argv[i], key, k) && argv[i][k] == '=')
            return strtol(argv[i] + k + 1, 0, 0);
    return dflt;
}

/* gen=N: N bytes of words picked by an LCG (compresses to about a third). */
static unsigned char *generate(size_t n)
{
    static const char *words[] = { "replay ", "record ", "guest ", "kvm ", "exit ",
                                   "timer ", "serial\n", "disk ", "0x1f ", "zlib " };
    unsigned char *buf = malloc(n ? n : 1);
    unsigned long long x = 0x2545F4914F6CDD1DULL;
    size_t i = 0;
    while (buf && i < n) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        for (const char *w = words[(x >> 60) % 10]; *w && i < n; w++)
            buf[i++] = (unsigned char)*w;
    }
    return buf;
}

/* The input: gen=N, else the disk (guest) or the file named by argv[1] (host). */
static unsigned char *load(int argc, char **argv, size_t *len)
{
    long gen = arg(argc, argv, "gen", -1);
    if (gen >= 0) {
        *len = (size_t)gen;
        return generate((size_t)gen);
    }
#ifdef __revirt__
    size_t cap = (size_t)rv_disk_sectors() * RV_SECTOR;
    size_t n = (size_t)arg(argc, argv, "bytes", (long)cap);
    if (n > cap) {
        printf("zdemo: bytes=%zu but the disk has %zu\n", n, cap);
        return 0;
    }
    unsigned char *buf = malloc(n ? n : 1);
    if (!buf || rv_disk_pread(buf, n, 0)) {
        printf("zdemo: cannot read the disk\n");
        return 0;
    }
#else
    FILE *f = argc > 1 ? fopen(argv[1], "rb") : 0;
    if (!f) {
        printf("zdemo: usage: zdemo-host FILE|gen=N [bytes=N] [level=L]\n");
        return 0;
    }
    fseek(f, 0, SEEK_END);
    size_t cap = (size_t)ftell(f);
    rewind(f);
    size_t n = (size_t)arg(argc, argv, "bytes", (long)cap);
    if (n > cap)
        n = cap;
    unsigned char *buf = malloc(n ? n : 1);
    if (!buf || fread(buf, 1, n, f) != n) {
        printf("zdemo: cannot read %s\n", argv[1]);
        return 0;
    }
    fclose(f);
#endif
    *len = n;
    return buf;
}

int main(int argc, char **argv)
{
    size_t n;
    unsigned char *in = load(argc, argv, &n);
    if (!in)
        return 1;
    int level = (int)arg(argc, argv, "level", 6);

    uLong crc = crc32(0L, Z_NULL, 0), adler = adler32(0L, Z_NULL, 0);
    crc = crc32(crc, in, (uInt)n);
    adler = adler32(adler, in, (uInt)n);
    printf("zdemo: zlib %s input bytes=%zu crc32=%08lx adler32=%08lx\n", zlibVersion(), n, crc, adler);

    uLongf zlen = compressBound(n);
    unsigned char *z = malloc(zlen);
    int rc = compress2(z, &zlen, in, n, level);
    if (rc != Z_OK) {
        printf("zdemo: compress2 failed: %d\n", rc);
        return 2;
    }
    printf("zdemo: level=%d compressed bytes=%lu crc32=%08lx\n", level, zlen, crc32(0L, z, (uInt)zlen));

    uLongf back = n;
    unsigned char *out = malloc(n ? n : 1);
    rc = uncompress(out, &back, z, zlen);
    if (rc != Z_OK || back != n || memcmp(in, out, n)) {
        printf("zdemo: round trip FAILED (rc=%d bytes=%lu)\n", rc, back);
        return 3;
    }
    printf("zdemo: uncompressed bytes=%lu round trip ok\n", back);
    return 0;
}
