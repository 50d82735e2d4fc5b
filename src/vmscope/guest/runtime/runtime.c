/*
 * vmscope guest runtime services: CPU tables, serial console, formatting, options, user mode,
 * interrupt handlers and the legacy PC timer/interrupt hardware (8259 PIC, 8254 PIT, CMOS RTC,
 * local APIC).
 *
 * runtime_start() runs at CPL0 right after entry.S switched to long mode. Keep what runs at CPL0
 * short: on software-virtualization hosts every CPL0 instruction is emulated (hundreds of ns).
 */
#include "vmscope_guest.h"

#define KERNEL_CS 0x08
#define TSS_SELECTOR 0x28
#define IDT_ENTRIES 256
#define FIRST_EXTERNAL_VECTOR 32

#define COM1_THR 0
#define COM1_IER 1
#define COM1_FCR_IIR 2
#define COM1_LCR 3
#define COM1_LSR 5
#define LSR_THRE 0x20

#define CMDLINE_MAX 4096

/* A fixed canary: random values need an entropy source and would have to be set before the first
 * protected function runs. The zero low byte stops string overflows (the "terminator canary"). */
uintptr_t __stack_chk_guard = 0x5eca1d0c0ffe2b00ul;

void __stack_chk_fail(void)
{
    printf("stack smashing detected (canary overwritten), return address %p\n", __builtin_return_address(0));
    debug_exit(RUNTIME_EXIT_STACK_SMASH);
}

/* From entry.S */
extern uint64_t runtime_start_info_paddr;
extern uint64_t gdt_tss_descriptor[2];
extern char exception_stubs[];
extern char interrupt_stubs[];
extern char exception_stack_top[];
extern char invalid_opcode_entry[];
extern void user_halt(void);

struct __attribute__((packed)) tss64 {
    uint32_t reserved0;
    uint64_t rsp[3];
    uint64_t reserved1;
    uint64_t ist[7];
    uint64_t reserved2;
    uint16_t reserved3;
    uint16_t iomap_base;
    /* One bit per port, set = denied; the extra byte must be all ones (the CPU reads 2 bytes). */
    uint8_t iomap[8192 + 1];
};

struct idt_gate {
    uint16_t offset_low;
    uint16_t selector;
    uint8_t ist;
    uint8_t type_attr;
    uint16_t offset_mid;
    uint32_t offset_high;
    uint32_t reserved;
};

/* Pushed by exception_common in entry.S, lowest address first. */
struct exception_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error_code;
    uint64_t rip, cs, rflags, rsp, ss;
};

/* Static, fully initialized: no run-time loop at CPL0 to deny the 65536 ports. */
static struct tss64 runtime_tss __attribute__((aligned(16))) = {
    .iomap_base = __builtin_offsetof(struct tss64, iomap),
    .iomap = {[0 ... 8192] = 0xff},
};
/* Vectors 32-255 start not present: an interrupt nobody asked for raises #NP, which reports it. */
static struct idt_gate runtime_idt[IDT_ENTRIES] __attribute__((aligned(16)));
/* Read by interrupt_common in entry.S; only vectors with a present gate are ever looked up. */
interrupt_handler interrupt_handlers[IDT_ENTRIES];
static const struct hvm_start_info *runtime_start_info;
static char runtime_cmdline[CMDLINE_MAX];
static unsigned serial_fifo_depth = 1;
static unsigned serial_fifo_room;

static void set_gate(unsigned vector, const void *handler)
{
    uint64_t address = (uint64_t)handler;
    struct idt_gate *gate = &runtime_idt[vector];
    gate->offset_low = (uint16_t)address;
    gate->selector = KERNEL_CS;
    gate->ist = 0;
    gate->type_attr = 0x8e; /* present 64-bit interrupt gate, DPL0 */
    gate->offset_mid = (uint16_t)(address >> 16);
    gate->offset_high = (uint32_t)(address >> 32);
    gate->reserved = 0;
}

static void setup_idt(void)
{
    for (unsigned vector = 0; vector < 32; vector++)
        set_gate(vector, exception_stubs + 16 * vector);
    set_gate(6, invalid_opcode_entry); /* also the way back from CPL3, see entry.S */
    struct __attribute__((packed)) {
        uint16_t limit;
        uint64_t base;
    } descriptor = {sizeof(runtime_idt) - 1, (uint64_t)runtime_idt};
    __asm__ volatile("lidt %0" ::"m"(descriptor));
}

static void setup_tss(void)
{
    uint64_t base = (uint64_t)&runtime_tss;
    uint64_t limit = sizeof(runtime_tss) - 1;
    runtime_tss.rsp[0] = (uint64_t)exception_stack_top;
    gdt_tss_descriptor[0] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ull << 40) /* present, 64-bit TSS */
                            | (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    gdt_tss_descriptor[1] = base >> 32;
    __asm__ volatile("ltr %w0" ::"r"(TSS_SELECTOR));
}

int set_interrupt_handler(uint8_t vector, interrupt_handler handler)
{
    if (vector < FIRST_EXTERNAL_VECTOR)
        return -1;
    if (!handler) {
        runtime_idt[vector].type_attr = 0; /* not present */
        interrupt_handlers[vector] = NULL;
        return 0;
    }
    interrupt_handlers[vector] = handler;
    __asm__ volatile("" ::: "memory"); /* the handler first, then the gate that leads to it */
    set_gate(vector, interrupt_stubs + 16 * (vector - FIRST_EXTERNAL_VECTOR));
    return 0;
}

void allow_user_port_io(uint16_t first, uint32_t count)
{
    for (uint32_t port = first; port < (uint32_t)first + count && port <= 0xffff; port++)
        runtime_tss.iomap[port / 8] &= (uint8_t) ~(1u << (port % 8));
}

/* ---- serial ---- */

static void serial_init(void)
{
    outb(SERIAL_PORT + COM1_IER, 0x00);     /* no interrupts: we poll */
    outb(SERIAL_PORT + COM1_LCR, 0x03);     /* 8N1 */
    outb(SERIAL_PORT + COM1_FCR_IIR, 0x07); /* enable and clear the FIFOs */
    /* IIR bits 7:6 = 11 when the FIFOs are on (16550A): THRE then means 16 free bytes */
    serial_fifo_depth = (inb(SERIAL_PORT + COM1_FCR_IIR) & 0xc0) == 0xc0 ? 16 : 1;
}

static void serial_send(uint8_t byte)
{
    if (serial_fifo_room == 0) {
        while (!(inb(SERIAL_PORT + COM1_LSR) & LSR_THRE))
            ;
        serial_fifo_room = serial_fifo_depth;
    }
    outb(SERIAL_PORT + COM1_THR, byte);
    serial_fifo_room--;
}

void serial_putc(char c)
{
    if (c == '\n')
        serial_send('\r');
    serial_send((uint8_t)c);
}

void serial_write(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        serial_putc(s[i]);
}

void serial_puts(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

/* ---- formatting ---- */

struct format_sink {
    char *buf;      /* NULL: write to the serial port */
    size_t size;
    size_t length;  /* characters produced so far (may exceed size) */
};

static void sink_put(struct format_sink *sink, char c)
{
    if (!sink->buf)
        serial_putc(c);
    else if (sink->length + 1 < sink->size)
        sink->buf[sink->length] = c;
    sink->length++;
}

static void format_number(struct format_sink *sink, uint64_t value, unsigned base, int negative, unsigned width,
                          char pad, int upper)
{
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    char tmp[24];
    unsigned n = 0;
    do {
        tmp[n++] = digits[value % base];
        value /= base;
    } while (value);
    unsigned total = n + (negative ? 1u : 0u);
    if (negative && pad == '0')
        sink_put(sink, '-');
    for (; total < width; total++)
        sink_put(sink, pad);
    if (negative && pad != '0')
        sink_put(sink, '-');
    while (n)
        sink_put(sink, tmp[--n]);
}

static int format(struct format_sink *sink, const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            sink_put(sink, *fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        unsigned width = 0;
        int longs = 0;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (unsigned)(*fmt++ - '0');
        while (*fmt == 'l' || *fmt == 'z') {
            longs++;
            fmt++;
        }
        switch (*fmt) {
        case 'd':
        case 'i': {
            int64_t v = longs ? va_arg(ap, int64_t) : va_arg(ap, int);
            format_number(sink, v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v, 10, v < 0, width, pad, 0);
            break;
        }
        case 'u':
        case 'x':
        case 'X': {
            uint64_t v = longs ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
            format_number(sink, v, *fmt == 'u' ? 10 : 16, 0, width, pad, *fmt == 'X');
            break;
        }
        case 'p':
            sink_put(sink, '0');
            sink_put(sink, 'x');
            format_number(sink, (uint64_t)va_arg(ap, void *), 16, 0, width, pad, 0);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            size_t len = strlen(s);
            for (; len < width; width--)
                sink_put(sink, ' ');
            while (*s)
                sink_put(sink, *s++);
            break;
        }
        case 'c':
            sink_put(sink, (char)va_arg(ap, int));
            break;
        case '%':
            sink_put(sink, '%');
            break;
        case '\0':
            fmt--;
            break;
        default:
            sink_put(sink, '%');
            sink_put(sink, *fmt);
        }
    }
    if (sink->buf && sink->size)
        sink->buf[sink->length < sink->size ? sink->length : sink->size - 1] = '\0';
    return (int)sink->length;
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct format_sink sink = {buf, size, 0};
    return format(&sink, fmt, ap);
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

int vprintf(const char *fmt, va_list ap)
{
    struct format_sink sink = {NULL, 0, 0};
    return format(&sink, fmt, ap);
}

int printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}

/* ---- command-line options ---- */

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

int option_find(const char *cmdline, const char *key, const char **value, size_t *len)
{
    size_t key_len = strlen(key);
    const char *p = cmdline;
    while (p && *p) {
        while (is_space(*p))
            p++;
        const char *word = p;
        while (*p && !is_space(*p))
            p++;
        size_t word_len = (size_t)(p - word);
        if (word_len >= key_len && strncmp(word, key, key_len) == 0) {
            if (word_len == key_len) {
                *value = word + word_len;
                *len = 0;
                return 1;
            }
            if (word[key_len] == '=') {
                *value = word + key_len + 1;
                *len = word_len - key_len - 1;
                return 1;
            }
        }
    }
    return 0;
}

uint64_t option_u64(const char *cmdline, const char *key, uint64_t fallback)
{
    const char *v;
    size_t len;
    if (!option_find(cmdline, key, &v, &len) || len == 0)
        return fallback;
    unsigned base = 10;
    if (len > 2 && v[0] == '0' && (v[1] == 'x' || v[1] == 'X')) {
        base = 16;
        v += 2;
        len -= 2;
    }
    uint64_t result = 0;
    for (size_t i = 0; i < len; i++) {
        char c = v[i];
        unsigned digit;
        if (c >= '0' && c <= '9')
            digit = (unsigned)(c - '0');
        else if (base == 16 && c >= 'a' && c <= 'f')
            digit = (unsigned)(c - 'a' + 10);
        else if (base == 16 && c >= 'A' && c <= 'F')
            digit = (unsigned)(c - 'A' + 10);
        else
            return fallback;
        result = result * base + digit;
    }
    return result;
}

static int word_equals(const char *v, size_t len, const char *word)
{
    return strlen(word) == len && strncmp(v, word, len) == 0;
}

int option_flag(const char *cmdline, const char *key, int fallback)
{
    const char *v;
    size_t len;
    if (!option_find(cmdline, key, &v, &len))
        return fallback;
    return len == 0 || word_equals(v, len, "1") || word_equals(v, len, "yes") || word_equals(v, len, "on") ||
           word_equals(v, len, "true");
}

/* ---- 8259 PIC, 8254 PIT, CMOS RTC, local APIC ---- */

#define PIC_ICW1_INIT_ICW4 0x11 /* edge triggered, cascaded, ICW4 follows */
#define PIC_ICW4_8086 0x01
#define PIC_OCW3_READ_ISR 0x0b
#define PIT_COMMAND 0x43
#define PIT_CHANNEL0 0x40
#define PIT_CHANNEL2 0x42
#define PORT_61 0x61            /* bit 0: PIT channel 2 gate, bit 1: speaker, bit 5: channel 2 output */

void pic_remap(uint8_t master_base, uint8_t slave_base)
{
    outb(PIC_MASTER_COMMAND, PIC_ICW1_INIT_ICW4);
    outb(PIC_SLAVE_COMMAND, PIC_ICW1_INIT_ICW4);
    outb(PIC_MASTER_DATA, master_base); /* ICW2: vector of IRQ 0 */
    outb(PIC_SLAVE_DATA, slave_base);   /* ICW2: vector of IRQ 8 */
    outb(PIC_MASTER_DATA, 1u << 2);     /* ICW3: slave on IRQ 2 */
    outb(PIC_SLAVE_DATA, 2);            /* ICW3: cascade identity */
    outb(PIC_MASTER_DATA, PIC_ICW4_8086);
    outb(PIC_SLAVE_DATA, PIC_ICW4_8086);
    pic_set_mask(0xffff);
}

void pic_set_mask(uint16_t mask)
{
    outb(PIC_MASTER_DATA, (uint8_t)mask);
    outb(PIC_SLAVE_DATA, (uint8_t)(mask >> 8));
}

uint16_t pic_in_service(void)
{
    outb(PIC_MASTER_COMMAND, PIC_OCW3_READ_ISR);
    outb(PIC_SLAVE_COMMAND, PIC_OCW3_READ_ISR);
    uint16_t isr = (uint16_t)(inb(PIC_MASTER_COMMAND) | (inb(PIC_SLAVE_COMMAND) << 8));
    outb(PIC_MASTER_COMMAND, 0x0a); /* back to reading the IRR, the power-on default */
    outb(PIC_SLAVE_COMMAND, 0x0a);
    return isr;
}

uint32_t pit_start_periodic(uint32_t hz)
{
    if (hz == 0)
        return 0;
    uint32_t divisor = (PIT_FREQUENCY_HZ + hz / 2) / hz;
    if (divisor < 2 || divisor > 0xffff)
        return 0;
    outb(PIT_COMMAND, 0x34); /* channel 0, low then high byte, mode 2 (rate generator), binary */
    outb(PIT_CHANNEL0, (uint8_t)divisor);
    outb(PIT_CHANNEL0, (uint8_t)(divisor >> 8));
    return divisor;
}

void pit_delay_us(uint32_t us)
{
    /* Channel 2 in mode 0 (its output rises at terminal count), polled through port 0x61: no
     * interrupt, and channel 0 stays free for the guest. At most 50 ms per programming. */
    while (us) {
        uint32_t chunk = us > 50000 ? 50000 : us;
        uint32_t count = (uint32_t)(((uint64_t)chunk * PIT_FREQUENCY_HZ + 999999) / 1000000);
        outb(PORT_61, (uint8_t)((inb(PORT_61) & ~0x02u) | 0x01u)); /* gate on, speaker off */
        outb(PIT_COMMAND, 0xb0); /* channel 2, low then high byte, mode 0, binary */
        outb(PIT_CHANNEL2, (uint8_t)count);
        outb(PIT_CHANNEL2, (uint8_t)(count >> 8));
        while (!(inb(PORT_61) & 0x20))
            cpu_relax();
        us -= chunk;
    }
}

uint8_t cmos_read(uint8_t reg)
{
    outb(CMOS_INDEX_PORT, reg & 0x7f);
    return inb(CMOS_DATA_PORT);
}

static void ignore_spurious_interrupt(uint8_t vector)
{
    (void)vector; /* a spurious LAPIC interrupt takes no EOI */
}

int lapic_enable(void)
{
    uint64_t apic_base = rdmsr(MSR_IA32_APIC_BASE);
    /* The runtime maps only the default base (uncached); a moved or disabled APIC is not used. */
    if ((apic_base & 0xfffff000u) != LAPIC_DEFAULT_BASE || !(apic_base & (1u << 11)))
        return -1;
    set_interrupt_handler(LAPIC_SPURIOUS_VECTOR, ignore_spurious_interrupt);
    lapic_write(LAPIC_SVR, 0x100u | LAPIC_SPURIOUS_VECTOR);
    return 0;
}

int lapic_send_ipi(uint8_t destination, uint32_t icr_low)
{
    lapic_write(LAPIC_ICR_HIGH, (uint32_t)destination << 24);
    lapic_write(LAPIC_ICR_LOW, icr_low); /* this write sends it */
    for (uint32_t polls = 0; polls < 100000; polls++) {
        if (!(lapic_read(LAPIC_ICR_LOW) & LAPIC_ICR_DELIVERY_PENDING))
            return 0;
        cpu_relax();
    }
    return -1;
}

/* ---- start info ---- */

const struct hvm_start_info *start_info(void) { return runtime_start_info; }

const struct hvm_memmap_table_entry *start_info_memmap(uint32_t *count)
{
    const struct hvm_start_info *info = runtime_start_info;
    *count = 0;
    /* memmap fields exist from version 1; the table must lie in the identity map */
    if (!info || info->version < 1 || !info->memmap_paddr || info->memmap_entries == 0 ||
        info->memmap_paddr >= (1ull << 32) - 4096 || info->memmap_entries > 128)
        return NULL;
    *count = info->memmap_entries;
    return (const struct hvm_memmap_table_entry *)info->memmap_paddr;
}

static const char *copy_cmdline(const struct hvm_start_info *info)
{
    if (!info || !info->cmdline_paddr || info->cmdline_paddr >= (1ull << 32) - CMDLINE_MAX)
        return runtime_cmdline; /* empty */
    const char *src = (const char *)info->cmdline_paddr;
    size_t i = 0;
    for (; i < CMDLINE_MAX - 1 && src[i]; i++)
        runtime_cmdline[i] = src[i];
    runtime_cmdline[i] = '\0';
    return runtime_cmdline;
}

/* ---- exit, exceptions, start ---- */

void acpi_power_off(void)
{
    outw(ACPI_PM1A_CNT_PORT, (uint16_t)((5u << 10) | (1u << 13)));  /* SLP_TYP=5 (S5), SLP_EN */
    for (;;)
        __asm__ volatile("cli; hlt");
}

void debug_exit(uint32_t value)
{
    outl(DEBUG_EXIT_PORT, value);
    /* Still here: the VMM has no debug-exit device. hlt is privileged: CPL3 asks CPL0 to halt. */
    if (current_cpl() == 3)
        user_halt();
    for (;;)
        __asm__ volatile("cli; hlt");
}

static const char *const exception_names[32] = {
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS", "#GP", "#PF", "?15",
    "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "?22", "?23", "?24", "?25", "?26", "?27", "#HV", "#VC", "#SX", "?31",
};

__attribute__((noreturn)) void runtime_exception(const struct exception_frame *frame);

void runtime_exception(const struct exception_frame *frame)
{
    uint64_t cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    serial_fifo_room = 0;
    printf("\nvmscope-guest: exception %lu (%s) error 0x%lx at rip 0x%lx (cpl %lu)\n", frame->vector,
           exception_names[frame->vector & 31], frame->error_code, frame->rip, frame->cs & 3);
    if (frame->vector == 11 && (frame->error_code & 2)) /* #NP on an IDT gate */
        printf("  interrupt vector %lu arrived and has no handler (set_interrupt_handler)\n",
               (frame->error_code >> 3) & 0xff);
    printf("  rsp 0x%lx rbp 0x%lx cr2 0x%lx rax 0x%lx rdi 0x%lx rsi 0x%lx\n", frame->rsp, frame->rbp, cr2,
           frame->rax, frame->rdi, frame->rsi);
    /* frame-pointer backtrace, trusting only aligned addresses inside the identity map */
    uint64_t rbp = frame->rbp;
    for (int depth = 0; depth < 16 && rbp && !(rbp & 7) && rbp < (1ull << 30); depth++) {
        const uint64_t *saved = (const uint64_t *)rbp;
        printf("  #%d 0x%lx\n", depth, saved[1]);
        if (saved[0] <= rbp)
            break;
        rbp = saved[0];
    }
    debug_exit(RUNTIME_EXIT_EXCEPTION);
}

__attribute__((noreturn)) void runtime_start(void);

void runtime_start(void)
{
    setup_idt();
    setup_tss();
    allow_user_port_io(SERIAL_PORT, 8);
    allow_user_port_io(DEBUG_EXIT_PORT, 4);
    allow_user_port_io(SCRATCH_PORT, 16);
    serial_init();
    const struct hvm_start_info *info = (const struct hvm_start_info *)runtime_start_info_paddr;
    if (!info || runtime_start_info_paddr >= (1ull << 32) - sizeof(*info) || info->magic != HVM_START_MAGIC) {
        printf("vmscope-guest: no PVH start info at 0x%lx (ebx at entry)\n", runtime_start_info_paddr);
        debug_exit(RUNTIME_EXIT_BAD_START);
    }
    runtime_start_info = info;
    debug_exit((uint32_t)guest_main(copy_cmdline(info)));
}

/* ---- freestanding libc ---- */

void *memset(void *dst, int c, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n)::"memory");
    return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (d <= s || d >= s + n)
        return memcpy(dst, src, n);
    while (n--)
        d[n] = s[n];
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] < y[i] ? -1 : 1;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return (unsigned char)*a - (unsigned char)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (a[i] != b[i] || !a[i])
            return (unsigned char)a[i] - (unsigned char)b[i];
    }
    return 0;
}
