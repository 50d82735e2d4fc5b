/*
 * SMP test guest: the BSP starts the application processors with INIT-SIPI-SIPI through its
 * local APIC, and each AP reports in from real mode.
 *
 * The BSP copies a 16-bit trampoline to AP_START_PAGE (0x8000, SIPI vector 0x08) and broadcasts
 * INIT, then two STARTUP IPIs, to all CPUs but itself (Intel MP spec B.4: 10 ms after INIT,
 * 200 us between the SIPIs). Each AP starts in real mode at 0x0800:0000, reads its initial APIC
 * id (CPUID leaf 1, EBX[31:24]), writes it with `outb` to AP_REPORT_PORT, sets its bit in a
 * mask and increments a counter in the trampoline page with locked instructions, and parks
 * (cli; hlt). The BSP waits until the counter reaches cpus - 1, waits a little more to catch an
 * AP that reports twice, prints one line and exits.
 *
 * Command line: cpus=N (CPUs in the VM; default: CPUID leaf 1 EBX[23:16]), ap_timeout_ms=T
 * (how long to wait for the APs, default 2000).
 * Exit: 0x10 -> status 33 when exactly cpus - 1 APs reported, each once;
 *       0x11 -> status 35 when the APs that reported are not the expected APIC ids 1..cpus-1,
 *               or one reported twice;
 *       0x12 -> status 37 when fewer than cpus - 1 APs arrived within the timeout;
 *       0x13 -> status 39 when the LAPIC could not be used (disabled, moved, IPI stuck).
 */
#include "vmscope_guest.h"

#define AP_START_PAGE 0x8000u
#define AP_REPORT_PORT 0x511
#define SMP_EXIT_OK 0x10
#define SMP_EXIT_WRONG_APS 0x11
#define SMP_EXIT_AP_TIMEOUT 0x12
#define SMP_EXIT_NO_LAPIC 0x13
#define POLL_INTERVAL_US 500u
#define SETTLE_US 20000u /* after the last AP: time for a duplicate report to show */

/* The trampoline: position-independent 16-bit code, run by each AP with CS = AP_START_PAGE >> 4
 * and IP = 0. Its data words live in the copy, addressed relative to CS (DS = CS). */
__asm__(".section .rodata.ap_trampoline, \"a\"\n"
        ".code16\n"
        ".globl ap_trampoline_start\n"
        "ap_trampoline_start:\n"
        "    cli\n"
        "    movw %cs, %ax\n"
        "    movw %ax, %ds\n"
        "    movl $1, %eax\n"
        "    xorl %ecx, %ecx\n"
        "    cpuid\n"
        "    shrl $24, %ebx\n" /* initial APIC id */
        "    movl %ebx, %eax\n"
        "    movw $0x511, %dx\n"
        "    outb %al, %dx\n"
        "    lock btsl %ebx, ap_trampoline_mask - ap_trampoline_start\n"
        "    lock incl ap_trampoline_count - ap_trampoline_start\n"
        "1:  cli\n"
        "    hlt\n"
        "    jmp 1b\n"
        "    .balign 4\n"
        ".globl ap_trampoline_count\n"
        "ap_trampoline_count: .long 0\n"
        ".globl ap_trampoline_mask\n"
        "ap_trampoline_mask: .fill 8, 4, 0\n" /* one bit per APIC id 0-255 */
        ".globl ap_trampoline_end\n"
        "ap_trampoline_end:\n"
        ".code64\n"
        ".previous\n");

extern const char ap_trampoline_start[], ap_trampoline_end[];
extern const uint32_t ap_trampoline_count, ap_trampoline_mask[8];

/* The trampoline's data as the copy at AP_START_PAGE holds it. */
static volatile uint32_t *copied(const void *symbol)
{
    return (volatile uint32_t *)(uintptr_t)(AP_START_PAGE + ((const char *)symbol - ap_trampoline_start));
}

static int start_aps(void)
{
    /* INIT to every other CPU, then two SIPIs (the second is ignored by a started AP). */
    if (lapic_send_ipi(0, LAPIC_ICR_ALL_EXCLUDING_SELF | LAPIC_ICR_INIT | LAPIC_ICR_ASSERT | LAPIC_ICR_LEVEL))
        return -1;
    pit_delay_us(10000);
    for (int sipi = 0; sipi < 2; sipi++) {
        if (lapic_send_ipi(0, LAPIC_ICR_ALL_EXCLUDING_SELF | LAPIC_ICR_STARTUP | (AP_START_PAGE >> 12)))
            return -1;
        pit_delay_us(200);
    }
    return 0;
}

int guest_main(const char *cmdline)
{
    struct cpuid_result leaf1 = cpuid(1, 0);
    uint32_t cpuid_cpus = (leaf1.edx & (1u << 28)) ? (leaf1.ebx >> 16) & 0xff : 1; /* HTT: count valid */
    uint64_t cpus = option_u64(cmdline, "cpus", cpuid_cpus ? cpuid_cpus : 1);
    uint64_t timeout_us = option_u64(cmdline, "ap_timeout_ms", 2000) * 1000;
    uint32_t bsp_id = leaf1.ebx >> 24;
    if (cpus < 1 || cpus > 255) {
        printf("smp: cpus=%lu is out of range (1-255)\n", cpus);
        return SMP_EXIT_WRONG_APS;
    }
    uint32_t expected = (uint32_t)cpus - 1;

    size_t size = (size_t)(ap_trampoline_end - ap_trampoline_start);
    memcpy((void *)(uintptr_t)AP_START_PAGE, ap_trampoline_start, size);
    volatile uint32_t *count = copied(&ap_trampoline_count);
    volatile uint32_t *mask = copied(ap_trampoline_mask);

    if (lapic_enable() || start_aps()) {
        printf("smp: the local APIC cannot send IPIs (IA32_APIC_BASE 0x%lx)\n", rdmsr(MSR_IA32_APIC_BASE));
        return SMP_EXIT_NO_LAPIC;
    }
    uint64_t waited_us = 0;
    while (*count < expected && waited_us < timeout_us) {
        pit_delay_us(POLL_INTERVAL_US);
        waited_us += POLL_INTERVAL_US;
    }
    pit_delay_us(SETTLE_US);
    uint32_t arrived = *count;

    /* Expected: APIC ids 0..cpus-1 minus the BSP's own (KVM's APIC id is the vCPU id). */
    int ids_ok = !(mask[bsp_id / 32] & (1u << (bsp_id % 32)));
    uint32_t seen = 0;
    for (uint32_t id = 0; id < 256; id++) {
        if (mask[id / 32] & (1u << (id % 32))) {
            seen++;
            ids_ok &= id < cpus;
        }
    }
    printf("smp: bsp apic id %u, %u of %u AP(s) reported within %lu us, apic id mask %08x%08x\n", bsp_id,
           arrived, expected, waited_us, mask[1], mask[0]);
    if (arrived < expected)
        return SMP_EXIT_AP_TIMEOUT;
    if (arrived != expected || seen != expected || !ids_ok)
        return SMP_EXIT_WRONG_APS;
    printf("smp: OK\n");
    return SMP_EXIT_OK;
}
