/*
 * exit_loop: the guest of the exit round-trip benchmark (bench/exit_roundtrip).
 *
 * A standalone PVH ELF that never leaves the 32-bit protected mode it is entered in (CPL0, paging
 * off): it reads n=<decimal> from the command line (0 when absent), executes n `outb` to port
 * 0x510, each a userspace PIO exit, and stops with debug_exit(0x10) -> VMM exit status 33.
 * Build: vmscope.guest.build.build_guest("exit_loop", [this file], linker_script=runtime/guest.ld).
 */

#define BENCH_PORT 0x510
#define DEBUG_EXIT_PORT 0xf4
#define HVM_START_MAGIC 0x336ec578
#define START_INFO_CMDLINE_PADDR 24  /* after magic, version, flags, nr_modules (u32) and modlist_paddr (u64) */

    .section .note.Xen, "a", @note
    .balign 4
    .long 4                     /* n_namesz: "Xen\0" */
    .long 8                     /* n_descsz */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad exit_loop_start

    .section .text.entry, "ax"
    .code32
    .globl exit_loop_start
    .type exit_loop_start, @function
exit_loop_start:                /* ebx = struct hvm_start_info * */
    cli
    xorl %ecx, %ecx             /* n */
    cmpl $HVM_START_MAGIC, (%ebx)
    jne run
    movl START_INFO_CMDLINE_PADDR(%ebx), %esi
    testl %esi, %esi
    jz run
    movb $' ', %ah              /* previous character: "n=" must start a word */
scan:
    movb (%esi), %al
    testb %al, %al
    jz run
    cmpb $'n', %al
    jne next
    cmpb $' ', %ah
    jne next
    cmpb $'=', 1(%esi)
    jne next
    addl $2, %esi
digits:
    movzbl (%esi), %eax
    subl $'0', %eax
    cmpl $9, %eax
    ja run
    imull $10, %ecx, %ecx
    addl %eax, %ecx
    incl %esi
    jmp digits
next:
    movb %al, %ah
    incl %esi
    jmp scan

run:
    movl %ecx, exits_requested  /* for a debugger; also gives the ELF a non-empty data segment */
    movl $BENCH_PORT, %edx
    testl %ecx, %ecx
    jz done
    .globl exit_loop
exit_loop:
    outb %al, %dx
    decl %ecx
    jnz exit_loop
done:
    movl $0x10, %eax
    outl %eax, $DEBUG_EXIT_PORT
halt:
    hlt
    jmp halt
    .size exit_loop_start, . - exit_loop_start

    .data
    .balign 4
    .globl exits_requested
exits_requested:
    .long 0

    .section .note.GNU-stack, "", @progbits
