/*
 * PVH entry, so that the same vm.img boots under QEMU (`qemu-system-x86_64
 * -kernel out/vm.img -append 'workload=...'`), e.g. for the QEMU record/replay
 * comparison in docs/performance.md. revirt itself ignores all of this: it
 * enters `_start` in long mode with the machine already built.
 *
 * QEMU's PVH option ROM finds the XEN_ELFNOTE_PHYS32_ENTRY note (type 18)
 * in a PT_NOTE segment and jumps to `pvh_start` in 32-bit protected mode,
 * paging off, EBX = physical address of `struct hvm_start_info`. The stub
 * builds what the revirt VMM would otherwise provide (docs/platform.md): the
 * GDT with the same selectors at 0x1000, the 64-bit TSS with the I/O
 * permission bitmap at 0x1080, the boot-info block at 0x3000 with the
 * command line (from start_info.cmdline_paddr) at 0x4000, identity page
 * tables with 2 MiB user pages at 0x8000, long mode with the same CR0/CR4/
 * EFER, then the revirt entry state (RSP = 0x80000, RDI = 0x3000) and jumps
 * to `_start`. It also masks the legacy 8259 PICs, which exist under QEMU
 * (the firmware leaves IRQ0 = vector 8 unmasked) but not under revirt.
 *
 * RAM is assumed to be PVH_MEM_SIZE (64 MiB, revirt's default): run QEMU
 * with `-m 64M`. Lives in the .backdoor segment after backdoor() so nothing
 * else in the image moves.
 */

#define PVH_MEM_SIZE 0x4000000
#define GDT 0x1000
#define TSS 0x1080
#define TSS_LEN (104 + 257)
#define BOOT_INFO 0x3000
#define CMDLINE 0x4000
#define PML4 0x8000
#define PDPT 0x9000
#define PD 0xA000

	.section .pvhnote, "a", @note
	.balign 4
	.long 4			/* namesz: "Xen\0" */
	.long 4			/* descsz */
	.long 18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long pvh_start
	.balign 4

	.section .pvhboot, "ax"
	.code32
	.globl pvh_start
	.type pvh_start, @function
pvh_start:
	cli
	cld
	mov %ebx, %esi			/* start_info */

	/* Mask both 8259s (QEMU only; revirt has no such ports). */
	mov $0xff, %al
	out %al, $0x21
	out %al, $0xa1

	/* Command line: copy start_info.cmdline_paddr (offset 24) to a scratch
	 * buffer at 0x60000 first (start_info and the command line may lie in
	 * the area cleared below), then to 0x4000. ECX = its length. */
	xor %ecx, %ecx
	mov 24(%esi), %ebx
	test %ebx, %ebx
	jz 3f
2:	mov (%ebx, %ecx), %al
	test %al, %al
	jz 3f
	mov %al, 0x60000(%ecx)
	inc %ecx
	cmp $4095, %ecx
	jb 2b
3:	mov %ecx, %ebp

	/* Zero 0x1000..0x10000 (GDT, TSS, boot info, cmdline, page tables). */
	mov $0x1000, %edi
	mov $((0x10000 - 0x1000) / 4), %ecx
	xor %eax, %eax
	rep stosl

	/* GDT: the same descriptors as src/vmm/boot.rs. */
	movl $0x0000FFFF, GDT + 0x10
	movl $0x00AF9A00, GDT + 0x14
	movl $0x0000FFFF, GDT + 0x18
	movl $0x00CF9200, GDT + 0x1C
	movl $0x0000FFFF, GDT + 0x28
	movl $0x00CFF200, GDT + 0x2C
	movl $0x0000FFFF, GDT + 0x30
	movl $0x00AFFA00, GDT + 0x34
	/* 0x40: 64-bit available TSS, base 0x1080, limit TSS_LEN-1. */
	movl $(((TSS & 0xFFFF) << 16) | (TSS_LEN - 1)), GDT + 0x40
	movl $(((TSS >> 16) & 0xFF) | 0x8900 | (TSS & 0xFF000000)), GDT + 0x44
	/* TSS: rsp0 = top of the initial stack, I/O map base = 104; the bitmap
	 * (zeroed above) allows ports 0..0x7FF, then the 0xFF terminator. */
	movl $0x80000, TSS + 4
	movw $104, TSS + 0x66
	movb $0xff, TSS + 104 + 256

	/* Page tables: PML4[0] -> PDPT, PDPT[0] -> PD, PD: 2 MiB pages over RAM;
	 * present | writable | user at every level (0x7; 0x87 for the pages). */
	movl $(PDPT | 7), PML4
	movl $(PD | 7), PDPT
	mov $PD, %edi
	mov $0x87, %eax
1:	mov %eax, (%edi)
	add $8, %edi
	add $0x200000, %eax
	cmp $(PVH_MEM_SIZE | 0x87), %eax
	jb 1b

	mov $0x60000, %esi
	mov $CMDLINE, %edi
	mov %ebp, %ecx
	rep movsb
	/* Boot info (struct revirt_boot_info). */
	movl $0x49425652, BOOT_INFO + 0
	movl $1, BOOT_INFO + 4
	movl $PVH_MEM_SIZE, BOOT_INFO + 8
	movl $CMDLINE, BOOT_INFO + 16
	mov %ebp, BOOT_INFO + 24
	movl $GDT, BOOT_INFO + 32
	movl $TSS, BOOT_INFO + 40
	movl $PML4, BOOT_INFO + 48
	movl $__image_end, BOOT_INFO + 56

	/* Long mode: CR4 = 0x620, CR3, EFER = LME|NXE... revirt's 0x500 (LME|LMA), CR0. */
	lgdt pvh_gdt_ptr
	mov $0x620, %eax
	mov %eax, %cr4
	mov $PML4, %eax
	mov %eax, %cr3
	mov $0xC0000080, %ecx
	rdmsr
	or $0x100, %eax
	wrmsr
	mov $0x80050033, %eax
	mov %eax, %cr0
	ljmp $0x10, $pvh_long

	.code64
pvh_long:
	mov $0x18, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	xor %eax, %eax
	mov %eax, %fs
	mov %eax, %gs
	mov $0x40, %eax
	ltr %ax
	mov $0x80000, %esp
	push $2
	popf
	mov $BOOT_INFO, %edi
	xor %eax, %eax
	xor %ebx, %ebx
	xor %ecx, %ecx
	xor %edx, %edx
	xor %esi, %esi
	xor %ebp, %ebp
	jmp _start
	.size pvh_start, . - pvh_start

	.balign 8
pvh_gdt_ptr:
	.word 0x4F
	.long GDT

	.section .note.GNU-stack, "", @progbits
