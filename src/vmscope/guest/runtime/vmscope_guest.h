/*
 * vmscope guest runtime: the API a bundled test guest is written against.
 *
 * The runtime is a freestanding PVH ELF entry (entry.S) plus a few services (runtime.c).
 * A guest provides `int guest_main(const char *cmdline)`; the runtime calls it in 64-bit
 * long mode at CPL0 with its own GDT, IDT, TSS and an identity map of the low 4 GiB
 * (2 MiB pages, user-accessible), and ends the run with debug_exit(<return value>).
 *
 * Code at CPL0 is emulated instruction by instruction on software-virtualization hosts
 * (see docs on PVM): do the heavy work through run_in_user_mode(), where it runs natively.
 */
#ifndef VMSCOPE_GUEST_H
#define VMSCOPE_GUEST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* ---- well-known ports ---- */
#define SERIAL_PORT 0x3f8       /* COM1, 16550A */
#define DEBUG_EXIT_PORT 0xf4    /* QEMU isa-debug-exit: VMM exits with status (value << 1) | 1 */
#define SCRATCH_PORT 0x510      /* writes are counted by VMMs and ignored; used by tests and benches */
#define ACPI_PM1A_CNT_PORT 0x604 /* the FADT's PM1a control block: SLP_TYP=5 | SLP_EN is soft-off (S5) */

/* ---- exit values the runtime itself uses (process exit status = (value << 1) | 1) ---- */
#define RUNTIME_EXIT_EXCEPTION 0x7e   /* unexpected CPU exception: status 253 */
#define RUNTIME_EXIT_BAD_START 0x7d   /* start info missing or bad magic: status 251 */
#define RUNTIME_EXIT_STACK_SMASH 0x7c /* a stack canary was overwritten: status 249 */

/* ---- PVH start info (Xen public/arch-x86/hvm/start_info.h) ---- */
#define HVM_START_MAGIC 0x336ec578u

struct hvm_start_info {
    uint32_t magic;
    uint32_t version;
    uint32_t flags;
    uint32_t nr_modules;
    uint64_t modlist_paddr;
    uint64_t cmdline_paddr;
    uint64_t rsdp_paddr;
    uint64_t memmap_paddr;     /* version >= 1 */
    uint32_t memmap_entries;   /* version >= 1 */
    uint32_t reserved;
};

struct hvm_memmap_table_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;             /* 1 = RAM (e820 types) */
    uint32_t reserved;
};

/* The start info the VMM passed in ebx, or NULL when it was absent or had a bad magic. */
const struct hvm_start_info *start_info(void);
/* Memory map from the start info (NULL and *count = 0 when the VMM gave none). */
const struct hvm_memmap_table_entry *start_info_memmap(uint32_t *count);

/* ---- port I/O and CPU helpers (usable at CPL0 and, for allowed ports, CPL3) ---- */
static inline void outb(uint16_t port, uint8_t value) { __asm__ volatile("outb %0, %1" ::"a"(value), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t value) { __asm__ volatile("outw %0, %1" ::"a"(value), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t value) { __asm__ volatile("outl %0, %1" ::"a"(value), "Nd"(port)); }
static inline uint8_t inb(uint16_t port)
{
    uint8_t value;
    __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}
static inline uint32_t inl(uint16_t port)
{
    uint32_t value;
    __asm__ volatile("inl %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

struct cpuid_result {
    uint32_t eax, ebx, ecx, edx;
};
static inline struct cpuid_result cpuid(uint32_t leaf, uint32_t subleaf)
{
    struct cpuid_result r;
    __asm__ volatile("cpuid" : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx) : "a"(leaf), "c"(subleaf));
    return r;
}
static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
/* CPL0 only */
static inline uint64_t rdmsr(uint32_t msr)
{
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((uint64_t)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
/* Current privilege level (0 or 3), from the low bits of CS. */
static inline unsigned current_cpl(void)
{
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return cs & 3u;
}

/* Stop the VM through isa-debug-exit; the VMM exits with status (value << 1) | 1. Never returns
 * (halts if the VMM has no debug-exit device). */
__attribute__((noreturn)) void debug_exit(uint32_t value);

/* Power the machine off through ACPI S5 (the VMM exits with status 0, as after Linux's poweroff).
 * Call at CPL0. Halts if nothing answers the port. */
__attribute__((noreturn)) void acpi_power_off(void);

/* ---- serial console (COM1) ---- */
void serial_putc(char c);                      /* '\n' is sent as "\r\n" */
void serial_write(const char *s, size_t len);
void serial_puts(const char *s);               /* no newline appended */

/* ---- formatting: %s %c %d %i %u %x %X %p %%, 'l'/'ll'/'z' sizes, '0' flag and width ---- */
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);

/* ---- command line: whitespace-separated "key=value" words (a bare "key" has an empty value) ---- */
/* Returns 1 and sets *value and *len (value not NUL-terminated) when key is present, else 0. */
int option_find(const char *cmdline, const char *key, const char **value, size_t *len);
/* Decimal or 0x-hex value of key; `fallback` when absent or not a number. */
uint64_t option_u64(const char *cmdline, const char *key, uint64_t fallback);
/* 1 for "key", "key=1", "key=yes", "key=on", "key=true"; 0 for other values; `fallback` when absent. */
int option_flag(const char *cmdline, const char *key, int fallback);

/* ---- user mode ---- */
/* Let CPL3 code do port I/O on [first, first + count) through the TSS I/O permission bitmap.
 * Call at CPL0. Allowed by default: the serial port (0x3f8-0x3ff), debug-exit (0xf4-0xf7) and
 * the scratch range 0x510-0x51f. */
void allow_user_port_io(uint16_t first, uint32_t count);
/* Run fn(arg) at CPL3 on the user stack and return its result (the way back is a `ud2`
 * the #UD handler recognises). fn may also end the run itself with debug_exit(). Call at CPL0; not reentrant. */
long run_in_user_mode(long (*fn)(void *), void *arg);

/* ---- interrupts (CPL0) ----
 * The runtime runs with interrupts off (run_in_user_mode() too: CPL3 code is never interrupted).
 * A handler runs on the interrupted stack with interrupts off and must send the EOI its interrupt
 * controller needs (pic_eoi, lapic_eoi). A vector without a handler that arrives anyway ends the
 * run with an exception report (#NP naming the vector). */
typedef void (*interrupt_handler)(uint8_t vector);
/* Call handler(vector) for interrupts on vector (32-255); NULL removes it. Returns -1 for an
 * exception vector (0-31), else 0. */
int set_interrupt_handler(uint8_t vector, interrupt_handler handler);
static inline void interrupts_enable(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void interrupts_disable(void) { __asm__ volatile("cli" ::: "memory"); }
/* Enable interrupts and halt until one arrives (sti's one-instruction shadow closes the race);
 * interrupts stay enabled afterwards. */
static inline void wait_for_interrupt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }
/* Halt with interrupts off, for good (an AP or a finished CPU parks here). */
__attribute__((noreturn)) static inline void park_cpu(void)
{
    for (;;)
        __asm__ volatile("cli; hlt" ::: "memory");
}

/* ---- 8259 PIC pair ----
 * After reset KVM's PIC delivers IRQ n on vector n, on top of the CPU exceptions: remap it
 * before enabling interrupts. */
#define PIC_MASTER_COMMAND 0x20
#define PIC_MASTER_DATA 0x21
#define PIC_SLAVE_COMMAND 0xa0
#define PIC_SLAVE_DATA 0xa1
/* Initialize both PICs (ICW1-ICW4, edge triggered, slave on IRQ 2) with IRQ 0-7 on vectors
 * master_base.. and IRQ 8-15 on slave_base..; leaves every IRQ masked. */
void pic_remap(uint8_t master_base, uint8_t slave_base);
/* Bit n set = IRQ n masked (bits 8-15: the slave). */
void pic_set_mask(uint16_t mask);
/* The in-service register of both PICs (bit n = IRQ n being handled). */
uint16_t pic_in_service(void);
/* Non-specific EOI for irq, to the slave too for IRQ 8-15. */
static inline void pic_eoi(unsigned irq)
{
    if (irq >= 8)
        outb(PIC_SLAVE_COMMAND, 0x20);
    outb(PIC_MASTER_COMMAND, 0x20);
}

/* ---- 8254 PIT (IRQ 0) ---- */
#define PIT_FREQUENCY_HZ 1193182u
/* Channel 0 in mode 2 (rate generator) at about hz: returns the divisor programmed
 * (PIT_FREQUENCY_HZ / hz, rounded), or 0 when hz is out of range (19 Hz to 596591 Hz). */
uint32_t pit_start_periodic(uint32_t hz);
/* Busy-wait at least us microseconds on channel 2 (polled through port 0x61, no interrupt). */
void pit_delay_us(uint32_t us);

/* ---- CMOS RTC ---- */
#define CMOS_INDEX_PORT 0x70
#define CMOS_DATA_PORT 0x71     /* reads the register last selected at CMOS_INDEX_PORT */
#define CMOS_RTC_SECONDS 0x00
uint8_t cmos_read(uint8_t reg);

/* ---- local APIC (xAPIC, MMIO at the default base; the runtime maps it uncached) ---- */
#define MSR_IA32_APIC_BASE 0x1b
#define LAPIC_DEFAULT_BASE 0xfee00000u
#define LAPIC_ID 0x020             /* bits 31:24 */
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0            /* spurious vector; bit 8 enables the APIC */
#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310       /* bits 31:24: destination APIC id */
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_CURRENT 0x390
#define LAPIC_TIMER_DIVIDE 0x3e0
#define LAPIC_SPURIOUS_VECTOR 0xff
/* ICR low word */
#define LAPIC_ICR_INIT (5u << 8)
#define LAPIC_ICR_STARTUP (6u << 8)             /* low byte: the start page number */
#define LAPIC_ICR_DELIVERY_PENDING (1u << 12)
#define LAPIC_ICR_ASSERT (1u << 14)
#define LAPIC_ICR_LEVEL (1u << 15)
#define LAPIC_ICR_ALL_EXCLUDING_SELF (3u << 18)
/* LVT timer */
#define LAPIC_TIMER_PERIODIC (1u << 17)
#define LAPIC_LVT_MASKED (1u << 16)
static inline uint32_t lapic_read(uint32_t reg)
{
    return *(volatile uint32_t *)(uintptr_t)(LAPIC_DEFAULT_BASE + reg);
}
static inline void lapic_write(uint32_t reg, uint32_t value)
{
    *(volatile uint32_t *)(uintptr_t)(LAPIC_DEFAULT_BASE + reg) = value;
}
static inline uint8_t lapic_id(void) { return (uint8_t)(lapic_read(LAPIC_ID) >> 24); }
static inline void lapic_eoi(void) { lapic_write(LAPIC_EOI, 0); }
/* Software-enable this CPU's LAPIC (spurious vector 0xff, handled as a no-op). Returns -1 when
 * the APIC is disabled or not at the default base (IA32_APIC_BASE), else 0. */
int lapic_enable(void);
/* Send an IPI (icr_low: vector, delivery mode, shorthand...) and wait for its delivery-status bit
 * to clear. Returns 0, or -1 when it stayed pending for 100000 polls. */
int lapic_send_ipi(uint8_t destination, uint32_t icr_low);

/* ---- stack protector ----
 * For guests built with -fstack-protector-* and -mstack-protector-guard=global: the canary
 * every protected function copies into its frame, and what a mismatch calls (prints the
 * caller's address, ends the run with RUNTIME_EXIT_STACK_SMASH). The default TLS guard
 * (%fs:0x28) is not set up: the runtime has no thread-local storage. */
extern uintptr_t __stack_chk_guard;
__attribute__((noreturn)) void __stack_chk_fail(void);

/* ---- provided by the guest ---- */
int guest_main(const char *cmdline);

/* ---- freestanding libc bits the compiler may call ---- */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);

#endif
