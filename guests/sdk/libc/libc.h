/* Internal to the SDK's C library layer (guests/sdk/libc). */
#ifndef REVIRT_SDK_LIBC_H
#define REVIRT_SDK_LIBC_H
struct revirt_boot_info;
void __rv_heap_init(struct revirt_boot_info *bi);
void __rv_stdio_init(void);
#endif
