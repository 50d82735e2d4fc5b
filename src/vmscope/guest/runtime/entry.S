/*
 * PVH entry of the vmscope guest runtime.
 *
 * The VMM enters pvh_start32 in 32-bit protected mode with paging off and ebx = the physical
 * address of struct hvm_start_info. We switch to long mode on static page tables (identity map
 * of the low 4 GiB with 2 MiB pages, user-accessible so CPL3 code can run anywhere), load our
 * GDT, and call runtime_start() in runtime.c. Everything here runs at CPL0, which some hosts
 * emulate instruction by instruction: the page tables are therefore built by the assembler,
 * not by a loop at run time.
 */

#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS 0x18
#define USER_CS 0x20

/* ---- XEN_ELFNOTE_PHYS32_ENTRY: the linker script puts this section in a PT_NOTE header ----
 * 4-byte alignment on purpose: QEMU aligns the note name to the PT_NOTE p_align, so p_align 8
 * would make it read the entry 4 bytes too far. The 8-byte entry matches Linux's note. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* n_namesz: "Xen\0" */
    .long 8                 /* n_descsz */
    .long 18                /* n_type: XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start32

/* ---- 32-bit entry ---- */
    .section .text.entry, "ax"
    .code32
    .globl pvh_start32
    .type pvh_start32, @function
pvh_start32:
    cli
    cld
    movl %ebx, runtime_start_info_paddr   /* upper half of the .quad stays 0 */
    lgdt gdt_descriptor                   /* 32-bit base: the GDT lies below 4 GiB */
    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax                       /* CR4.PAE */
    movl %eax, %cr4
    movl $0xc0000080, %ecx                /* IA32_EFER */
    rdmsr
    orl $0x100, %eax                      /* EFER.LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax                 /* CR0.PG | CR0.PE */
    movl %eax, %cr0
    ljmp $KERNEL_CS, $long_mode_entry
    .size pvh_start32, . - pvh_start32

    .code64
long_mode_entry:
    movl $KERNEL_DS, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    leaq kernel_stack_top(%rip), %rsp
    xorl %ebp, %ebp                       /* ends frame-pointer backtraces */
    call runtime_start                    /* does not return */
1:  cli
    hlt
    jmp 1b

/* ---- exceptions: 32 stubs, 16 bytes apart, so runtime.c can compute each address ---- */
    .text
    .balign 16
    .globl exception_stubs
exception_stubs:
    .set vector, 0
    .rept 32
    .balign 16
    /* vectors 8, 10-14, 17, 21, 29, 30 push an error code; push a 0 for the others */
    .if ((0x60227d00 >> vector) & 1) == 0
    pushq $0
    .endif
    pushq $vector
    jmp exception_common
    .set vector, vector + 1
    .endr

exception_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi                       /* struct exception_frame * */
    andq $-16, %rsp
    call runtime_exception                /* does not return */
2:  cli
    hlt
    jmp 2b

/* ---- external interrupts: stubs for vectors 32-255, 16 bytes apart (see set_interrupt_handler) ----
 * Short on purpose: on PVM hosts every instruction of an interrupt at CPL0 is emulated. Only the
 * caller-saved registers are kept; the C handler preserves the rest. */
    .balign 16
    .globl interrupt_stubs
interrupt_stubs:
    .set vector, 32
    .rept 224
    .balign 16
    pushq $vector
    jmp interrupt_common
    .set vector, vector + 1
    .endr

interrupt_common:
    /* The CPU aligned rsp to 16 before its 5-word frame; the vector and these 10 pushes keep it
     * 16-byte aligned at the call, as the ABI wants. */
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %rbp
    movq 80(%rsp), %rdi                   /* the vector: the handler's argument */
    call *interrupt_handlers(, %rdi, 8)
    popq %rbp
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    addq $8, %rsp                         /* the vector */
    iretq

/* ---- user mode ---- */

/* long run_in_user_mode(long (*fn)(void *), void *arg): iretq to CPL3, come back through #UD */
    .globl run_in_user_mode
    .type run_in_user_mode, @function
run_in_user_mode:
    pushq %rbp
    movq %rsp, %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, saved_kernel_rsp(%rip)
    movl $(USER_DS | 3), %eax
    movl %eax, %ds
    movl %eax, %es
    pushq $(USER_DS | 3)                  /* ss */
    leaq user_stack_top(%rip), %rax
    pushq %rax                            /* rsp */
    pushq $0x2                            /* rflags: IF=0, IOPL=0 (CPL3 port I/O goes through the TSS bitmap) */
    pushq $(USER_CS | 3)                  /* cs */
    leaq user_mode_trampoline(%rip), %rax
    pushq %rax                            /* rip */
    iretq
    .size run_in_user_mode, . - run_in_user_mode

    .type user_mode_trampoline, @function
user_mode_trampoline:                     /* CPL3; rdi = fn, rsi = arg */
    movq %rdi, %rax
    movq %rsi, %rdi
    xorl %ebp, %ebp
    call *%rax
    movq %rax, %rdi
    /* Back to CPL0 through #UD: PVM hosts turn every `int $n` at CPL3 into #UD, so a software
     * interrupt gate cannot be used; invalid_opcode_entry recognises this address. */
    .globl user_return_point
user_return_point:
    ud2
    .size user_mode_trampoline, . - user_mode_trampoline

/* CPL3 half of debug_exit() when the VMM has no debug-exit device: stop in the CPL0 halt loop */
    .globl user_halt
    .type user_halt, @function
user_halt:
    .globl user_halt_point
user_halt_point:
    ud2
    .size user_halt, . - user_halt

/* IDT vector 6 (#UD): the two deliberate ud2s at CPL3 above, else an ordinary exception */
    .globl invalid_opcode_entry
invalid_opcode_entry:
    testb $3, 8(%rsp)                     /* CS of the interrupted code */
    jz 4f
    cmpq $user_return_point, (%rsp)       /* RIP */
    je user_return
    cmpq $user_halt_point, (%rsp)
    je halt_forever
4:  jmp exception_stubs + 16 * 6

/* Back at CPL0 on the TSS rsp0 stack; rdi = fn's result: return from run_in_user_mode */
user_return:
    movl $KERNEL_DS, %eax
    movl %eax, %ss
    movl %eax, %ds
    movl %eax, %es
    movq saved_kernel_rsp(%rip), %rsp
    movq %rdi, %rax
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret

halt_forever:
3:  cli
    hlt
    jmp 3b

/* ---- data ---- */
    .data
    .balign 8
    .globl runtime_start_info_paddr
runtime_start_info_paddr:
    .quad 0
saved_kernel_rsp:
    .quad 0

    .balign 16
    .globl gdt
gdt:
    .quad 0
    .quad 0x00af9b000000ffff              /* 0x08 kernel code, 64-bit */
    .quad 0x00cf93000000ffff              /* 0x10 kernel data */
    .quad 0x00cff3000000ffff              /* 0x18 user data (DPL3) */
    .quad 0x00affb000000ffff              /* 0x20 user code, 64-bit (DPL3) */
    .globl gdt_tss_descriptor
gdt_tss_descriptor:
    .quad 0, 0                            /* 0x28 64-bit TSS, filled in by runtime.c */
gdt_end:
    .balign 8
gdt_descriptor:
    .word gdt_end - gdt - 1
    .quad gdt

/* Identity map of the low 4 GiB: PML4 -> PDPT -> 4 page directories of 2 MiB pages.
 * All levels have U set (CPL3 code uses the same map); 3-4 GiB (MMIO) is uncached. */
    .section .data.pagetables, "aw"
    .balign 4096
pml4:
    .quad pdpt + 0x27                     /* P RW US A */
    .fill 511, 8, 0
pdpt:
    .quad page_directories + 0x0000 + 0x27
    .quad page_directories + 0x1000 + 0x27
    .quad page_directories + 0x2000 + 0x27
    .quad page_directories + 0x3000 + 0x27
    .fill 508, 8, 0
page_directories:
    .set address, 0
    .rept 2048
    .if address < 0xc0000000
    .quad address | 0xe7                  /* P RW US A D PS */
    .else
    .quad address | 0xff                  /* ... PWT PCD */
    .endif
    .set address, address + 0x200000
    .endr

/* ---- stacks (the ELF loader zero-fills .bss) ---- */
    .section .bss.stacks, "aw", @nobits
    .balign 4096
kernel_stack:
    .skip 16384
    .globl kernel_stack_top
kernel_stack_top:
    .skip 8192
    .globl exception_stack_top
exception_stack_top:
    .skip 65536
    .globl user_stack_top
user_stack_top:

    .section .note.GNU-stack, "", @progbits
