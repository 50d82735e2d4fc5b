/*
 * User-mode SYSCALL and kernel-mode SYSRET, set up the way Linux does: the kernel's entry page
 * is supervisor-only, and the page-fault entry starts with `clac` (SMAP kernels). On a kvm_pvm
 * host a user `syscall` lands on LSTAR still at CPL3 and faults; vmscope's fallback turns that
 * #PF into the SYSCALL it should have been. The guest checks what its kernel entry saw (CPL0,
 * the kernel CS/SS from STAR, RCX/R11, masked RFLAGS, the user stack) and that SYSRET brought it
 * back to its user code at CPL3, then prints a verdict. (At CPL3 `mov %cs` shows the selector
 * the host really runs user code with, which on kvm_pvm is the host's own, so only the
 * privilege level of it is checked.)
 *
 * Options: rounds=N (syscalls made, default 3).
 */
#include "vmscope_guest.h"

#define MSR_EFER 0xC0000080u
#define MSR_STAR 0xC0000081u
#define MSR_LSTAR 0xC0000082u
#define MSR_FMASK 0xC0000084u
#define KERNEL_ENTRY_ADDRESS 0x400000ul /* its own 2 MiB page, made supervisor-only */

static inline void wrmsr(uint32_t msr, uint64_t value)
{
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((uint32_t)value), "d"((uint32_t)(value >> 32)));
}

uint64_t entry_cs, entry_ss, entry_rcx, entry_r11, entry_rflags, entry_rsp, entry_count;
extern char kernel_entry_start[], kernel_entry_end[], page_fault_entry[], after_syscall[];

/* Copied to KERNEL_ENTRY_ADDRESS: records what SYSCALL delivered, then returns with SYSRET.
 * Absolute addresses only (the guest lives below 2 GiB), so the copy runs anywhere. */
__asm__(".globl kernel_entry_start\n"
        "kernel_entry_start:\n"
        "  movq %rcx, entry_rcx\n  movq %r11, entry_r11\n  movq %rsp, entry_rsp\n"
        "  movq %cs, %rax\n  movq %rax, entry_cs\n  movq %ss, %rax\n  movq %rax, entry_ss\n"
        "  pushfq\n  popq %rax\n  movq %rax, entry_rflags\n"
        "  incq entry_count\n"
        "  movq $42, %rax\n"
        "  sysretq\n"
        ".globl kernel_entry_end\n"
        "kernel_entry_end:\n"
        /* IDT vector 14, as Linux's asm_exc_page_fault begins; an unrepaired fault goes on to the
         * runtime's exception report */
        ".globl page_fault_entry\n"
        "page_fault_entry:\n"
        "  clac\n"
        "  jmp exception_stubs + 16 * 14\n");

extern char exception_stubs[];

static uint64_t returned_cs, returned_rax, returned_ok;

static long user_syscalls(void *arg)
{
    uint64_t rounds = (uint64_t)arg, ok = 0;
    for (uint64_t i = 0; i < rounds; i++) {
        uint64_t rax, cs;
        __asm__ volatile("syscall\n.globl after_syscall\nafter_syscall:\n" : "=a"(rax) : "a"(i) : "rcx", "r11", "memory");
        __asm__ volatile("movq %%cs, %0" : "=r"(cs));
        returned_cs = cs;
        returned_rax = rax;
        ok += rax == 42 && (cs & 3) == 3;
    }
    returned_ok = ok;
    return (long)ok;
}

static void make_supervisor_only(uint64_t address)
{
    uint64_t cr3;
    __asm__ volatile("movq %%cr3, %0" : "=r"(cr3));
    uint64_t *pml4 = (uint64_t *)(cr3 & ~0xFFFul);
    uint64_t *pdpt = (uint64_t *)(pml4[(address >> 39) & 511] & ~0xFFFul);
    uint64_t *pd = (uint64_t *)(pdpt[(address >> 30) & 511] & ~0xFFFul);
    pd[(address >> 21) & 511] &= ~4ul; /* clear U/S */
    __asm__ volatile("movq %0, %%cr3" ::"r"(cr3) : "memory");
}

static void set_idt_gate(unsigned vector, void *handler)
{
    struct __attribute__((packed)) { uint16_t limit; uint64_t base; } idtr;
    __asm__ volatile("sidt %0" : "=m"(idtr));
    uint8_t *gate = (uint8_t *)idtr.base + 16 * vector;
    uint64_t address = (uint64_t)handler;
    gate[0] = address & 0xFF;
    gate[1] = (address >> 8) & 0xFF;
    gate[6] = (address >> 16) & 0xFF;
    gate[7] = (address >> 24) & 0xFF;
    for (int i = 0; i < 4; i++)
        gate[8 + i] = (address >> (32 + 8 * i)) & 0xFF;
}

int guest_main(const char *cmdline)
{
    uint64_t rounds = option_u64(cmdline, "rounds", 3);
    memcpy((void *)KERNEL_ENTRY_ADDRESS, kernel_entry_start, (size_t)(kernel_entry_end - kernel_entry_start));
    make_supervisor_only(KERNEL_ENTRY_ADDRESS);
    set_idt_gate(14, page_fault_entry);
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | 1); /* SCE */
    wrmsr(MSR_STAR, (0x10ul << 48) | (0x08ul << 32)); /* sysret: CS 0x20|3, SS 0x18|3; syscall: CS 0x08, SS 0x10 */
    wrmsr(MSR_LSTAR, KERNEL_ENTRY_ADDRESS);
    wrmsr(MSR_FMASK, 0x200 | 0x100); /* IF, TF */

    long ok = run_in_user_mode(user_syscalls, (void *)rounds);
    printf("pvm_syscall: entries %lu, ok %ld of %lu; entry cs 0x%lx ss 0x%lx rcx 0x%lx (after_syscall %p) "
           "r11 0x%lx rflags 0x%lx rsp 0x%lx; back in user mode with cs 0x%lx rax %lu\n",
           (unsigned long)entry_count, ok, (unsigned long)rounds, (unsigned long)entry_cs,
           (unsigned long)entry_ss, (unsigned long)entry_rcx, after_syscall, (unsigned long)entry_r11,
           (unsigned long)entry_rflags, (unsigned long)entry_rsp, (unsigned long)returned_cs,
           (unsigned long)returned_rax);
    int pass = entry_count == rounds && (uint64_t)ok == rounds && entry_cs == 0x08 && entry_ss == 0x10 &&
               entry_rcx == (uint64_t)after_syscall && !(entry_rflags & 0x300) && (entry_r11 & 0x2) &&
               entry_rsp < KERNEL_ENTRY_ADDRESS && (returned_cs & 3) == 3;
    printf("pvm_syscall: verdict %s\n", pass ? "PASS" : "FAIL");
    return pass ? 0 : 1;
}
