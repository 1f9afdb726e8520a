/*
 * Ring-0 entry, interrupt descriptor table and interrupt handlers of the
 * revirt guest runtime (the demo guest and SDK programs, docs/guest-sdk.md).
 *
 * Ring 0 is emulated instruction by instruction on hosts without VMX/SVM
 * (about 1 us per instruction), so everything here is kept tiny:
 *  - the IDT is built by the assembler at build time (no loop at boot);
 *  - the timer handler is ~50 instructions including the task switch;
 *  - other IRQs just EOI, exceptions report to the panic port.
 *
 * Interrupts are only ever taken from ring 3 (ring 0 runs with IF=0), so the
 * CPU always switches to TSS.rsp0, the top of the current task's kernel stack.
 */

#define TASK_KSP 0
#define TASK_KTOP 8
#define TASK_NEXT 16
#define TASK_STATE 24
#define TASK_FPU 32
#define TASK_RUNNABLE 1

#define TSS_RSP0 0x1084
#define PORT_PIC_EOI 0x520
#define PORT_POWER_OFF 0x550
#define PORT_PANIC 0x554
#define PORT_DEBUG 0x560

#define IMAGE_BASE 0x100000

	.section .text.entry, "ax"

/* Must be the first byte of the image (linker script asserts _start == 0x100000):
 * IDT offsets below are computed relative to it. */
	.globl _start
	.type _start, @function
_start:
	.cfi_startproc
	.cfi_undefined rip
	mov $boot_stack_top, %esp	/* RDI = boot info, left untouched */
	xor %ebp, %ebp
	lidt idt_ptr
	call kmain
	/* kmain never returns; treat it as a panic (vector 0xff, no frame). */
	mov $0xff, %eax
	xor %edi, %edi
	xor %esi, %esi
	jmp panic_report
	.cfi_endproc
	.size _start, . - _start

/* ---- exceptions 0..31: out to the panic port ---- */
.macro EXC vec, has_err
	.balign 16
exc\vec:
	mov $\vec, %eax
	mov $\has_err, %esi
	jmp exc_common
.endm

	EXC 0, 0	/* #DE */

/* #DB. The first instruction must stay a one-byte `nop`: it is what lets the
 * VMM single-step ring 3 on hosts where KVM cannot (kvm_pvm). There the
 * single-step #DB of a ring-3 instruction is delivered here; KVM emulates
 * this ring-0 `nop`, exits to the VMM after it, and the VMM undoes the
 * delivery (src/clock/step.rs), so the rest of the handler never runs for
 * those. A #DB of the guest's own (int1, its own TF or DR7) falls through
 * to the panic report like any other exception. */
	.balign 16
exc1:
	nop
	mov $1, %eax
	xor %esi, %esi
	jmp exc_common

	EXC 2, 0	/* NMI */

/* #BP from an `int3` in ring 3 (in ring 0 KVM cannot emulate int3 here):
 * report to the debug port 0x560 with eax = 3 and rdi = the CPU frame (rip
 * after the int3, cs, rflags, rsp, ss); the interrupted rax, rdx, rdi are
 * saved just below it (rdi-8, rdi-16, rdi-24). The VMM (a GDB stub) may
 * rewrite the frame before resuming, e.g. rip -= 1 after putting the
 * original byte back; resumed untouched, the int3 acts as a 1-byte nop. */
	.balign 16
exc3:
	push %rax
	push %rdx
	push %rdi
	lea 24(%rsp), %rdi
	mov $3, %eax
	mov $PORT_DEBUG, %edx
	out %eax, %dx
	pop %rdi
	pop %rdx
	pop %rax
	iretq

	EXC 4, 0	/* #OF */
	EXC 5, 0	/* #BR */
	EXC 6, 0	/* #UD */
	EXC 7, 0	/* #NM */
	EXC 8, 1	/* #DF */
	EXC 9, 0
	EXC 10, 1	/* #TS */
	EXC 11, 1	/* #NP */
	EXC 12, 1	/* #SS */
	EXC 13, 1	/* #GP */
	EXC 14, 1	/* #PF */
	EXC 15, 0
	EXC 16, 0	/* #MF */
	EXC 17, 1	/* #AC */
	EXC 18, 0	/* #MC */
	EXC 19, 0	/* #XM */
	EXC 20, 0	/* #VE */
	EXC 21, 1	/* #CP */
	EXC 22, 0
	EXC 23, 0
	EXC 24, 0
	EXC 25, 0
	EXC 26, 0
	EXC 27, 0
	EXC 28, 0
	EXC 29, 1	/* #VC */
	EXC 30, 1	/* #SX */
	EXC 31, 0

	.balign 16
	.type exc_common, @function
exc_common:
	mov %rsp, %rdi		/* [error code,] rip, cs, rflags, rsp, ss */
panic_report:
	mov $PORT_PANIC, %edx
	out %eax, %dx
	/* The VMM stops at the panic port; should it ever continue, power off. */
	mov $0xff, %eax
	mov $PORT_POWER_OFF, %edx
	out %eax, %dx
1:	hlt
	jmp 1b
	.size exc_common, . - exc_common

/* ---- IRQ 0 (vector 0x20): tick, EOI, round-robin task switch ---- */
	.balign 16
	.globl irq_timer
	.type irq_timer, @function
irq_timer:
	push %r15
	push %r14
	push %r13
	push %r12
	push %r11
	push %r10
	push %r9
	push %r8
	push %rbp
	push %rdi
	push %rsi
	push %rdx
	push %rcx
	push %rbx
	push %rax			/* now RSP = struct int_frame */
	incq ticks
	mov $PORT_PIC_EOI, %edx
	out %eax, %dx
	mov cur_task, %rax
	mov %rsp, TASK_KSP(%rax)
	mov TASK_NEXT(%rax), %rcx
1:	cmpq $TASK_RUNNABLE, TASK_STATE(%rcx)	/* the main task is always runnable */
	je 2f
	mov TASK_NEXT(%rcx), %rcx
	jmp 1b
2:
#ifdef RT_SAVE_FPU
	/* SDK programs use SSE/x87 in every task: switch FXSAVE areas too. */
	cmp %rax, %rcx
	je 3f
	mov TASK_FPU(%rax), %rdx
	fxsave64 (%rdx)
	mov TASK_FPU(%rcx), %rdx
	fxrstor64 (%rdx)
3:
#endif
	mov %rcx, cur_task
	mov TASK_KSP(%rcx), %rsp
	mov TASK_KTOP(%rcx), %rax
	mov %rax, TSS_RSP0
	.globl irq_return
irq_return:
	pop %rax
	pop %rbx
	pop %rcx
	pop %rdx
	pop %rsi
	pop %rdi
	pop %rbp
	pop %r8
	pop %r9
	pop %r10
	pop %r11
	pop %r12
	pop %r13
	pop %r14
	pop %r15
	iretq
	.size irq_timer, . - irq_timer

/* ---- other IRQs (vectors 0x21..0x2f; serial is 0x24): just EOI ---- */
	.balign 16
	.globl irq_other
	.type irq_other, @function
irq_other:
	push %rax
	push %rdx
	mov $PORT_PIC_EOI, %edx
	out %eax, %dx
	pop %rdx
	pop %rax
	iretq
	.size irq_other, . - irq_other

/* void task_enter(u64 ksp): start (ring 0 -> ring 3) the task whose kernel
 * stack holds a struct int_frame at ksp. TSS.rsp0 must already be set. */
	.balign 16
	.globl task_enter
	.type task_enter, @function
task_enter:
	mov %rdi, %rsp
	jmp irq_return
	.size task_enter, . - task_enter

	.globl __entry_end
__entry_end:

/* ---- ring 3: first code of every task. RDI = arg, RSI = function ---- */
	.text
	.globl task_trampoline
	.type task_trampoline, @function
task_trampoline:
	.cfi_startproc
	.cfi_undefined rip
	xor %ebp, %ebp
	call *%rsi
	call task_exit
	ud2
	.cfi_endproc
	.size task_trampoline, . - task_trampoline

/* ---- IDT, built at assembly time ----
 * Every handler lies in .text.entry, which starts at IMAGE_BASE (0x100000)
 * and is smaller than 64 KiB, so offset[15:0] = handler - _start and
 * offset[31:16] = 0x0010, offset[63:32] = 0. */
.macro GATE handler
	.word (\handler - _start)	/* offset 15:0 */
	.word 0x10			/* kernel CS */
	.byte 0				/* IST */
	.byte 0x8e			/* present, DPL 0, 64-bit interrupt gate */
	.word (IMAGE_BASE >> 16)	/* offset 31:16 */
	.long 0				/* offset 63:32 */
	.long 0
.endm

	.section .rodata
	.balign 16
	.globl idt
idt:
	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	GATE exc\v
	.endr
	GATE irq_timer		/* 0x20: IRQ 0, timer */
	.rept 15
	GATE irq_other		/* 0x21..0x2f: IRQ 1..15 (0x24 = serial) */
	.endr
idt_end:

	.balign 16
	.word 0
	.globl idt_ptr
idt_ptr:
	.word idt_end - idt - 1
	.quad idt

/* ---- boot stack (ring 0 until the first task is entered) ---- */
	.bss
	.balign 16
boot_stack:
	.skip 8192
boot_stack_top:

	.section .note.GNU-stack, "", @progbits
