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

/* ---- exit values the runtime itself uses (process exit status = (value << 1) | 1) ---- */
#define RUNTIME_EXIT_EXCEPTION 0x7e   /* unexpected CPU exception: status 253 */
#define RUNTIME_EXIT_BAD_START 0x7d   /* start info missing or bad magic: status 251 */

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
