/*
 * Timer test guest: counts timer interrupts over one second of the CMOS real-time clock.
 *
 * source=pit (default): remaps the 8259 PIC to vectors 0x20-0x2f, unmasks only IRQ 0, and runs
 * PIT channel 0 in mode 2 at hz=N (default 1000). The handler on vector 0x20 counts the tick
 * and sends the PIC its EOI; the first time, it also reads the PIC's in-service register, which
 * must show IRQ 0 (proof that the interrupt came through the PIC, not some other path).
 * source=lapic: masks the PIC, calibrates the local APIC timer (divide by 16) against PIT
 * channel 2 (the least of CALIBRATE_ROUNDS runs of CALIBRATE_US), and runs it in periodic mode
 * on vector 0x30 at hz=N; the handler counts and sends the LAPIC its EOI.
 *
 * The guest waits with `hlt` for a change of the RTC seconds register (0x70/0x71; the VMM's
 * CMOS reports the host's real time), counts ticks until the next change, and reports:
 *   outl TIMER_REPORT_PORT (0x512): ticks in that second;
 *   outw TIMER_ISR_PORT (0x513): the PIC in-service register seen in the first IRQ 0 (pit only);
 *   outl TIMER_CALIBRATION_PORT (0x514): LAPIC timer initial count chosen for hz (lapic only);
 *   serial: "timer: <source> <hz> Hz programmed, <ticks> ticks in one RTC second".
 * Exit: 0x10 -> status 33 after reporting (the test judges the count);
 *       0x11 -> status 35 bad command line; 0x12 -> status 37 no timer interrupt within 100 ms;
 *       0x13 -> status 39 the RTC seconds did not change within 3 s worth of ticks;
 *       0x14 -> status 41 the local APIC cannot be used.
 */
#include "vmscope_guest.h"

#define TIMER_REPORT_PORT 0x512
#define TIMER_ISR_PORT 0x513
#define TIMER_CALIBRATION_PORT 0x514
#define PIC_VECTOR_BASE 0x20
#define PIT_VECTOR PIC_VECTOR_BASE /* IRQ 0 */
#define PIC_SPURIOUS_VECTOR (PIC_VECTOR_BASE + 7)
#define LAPIC_TIMER_VECTOR 0x30
#define LAPIC_DIVIDE_BY_16 0x3
#define CALIBRATE_US 10000u
#define CALIBRATE_ROUNDS 5
#define EXIT_OK 0x10
#define EXIT_BAD_OPTION 0x11
#define EXIT_NO_INTERRUPTS 0x12
#define EXIT_RTC_STUCK 0x13
#define EXIT_NO_LAPIC 0x14

static volatile uint64_t ticks;
static volatile uint16_t first_isr;
static volatile int isr_sampled;
static volatile uint64_t spurious;

static void pit_tick(uint8_t vector)
{
    (void)vector;
    if (!isr_sampled) { /* once: the in-service register costs four more port accesses */
        first_isr = pic_in_service();
        isr_sampled = 1;
    }
    ticks++;
    pic_eoi(0);
}

static void pic_spurious(uint8_t vector)
{
    (void)vector; /* IRQ 7 without a request: no EOI */
    spurious++;
}

static void lapic_tick(uint8_t vector)
{
    (void)vector;
    ticks++;
    lapic_eoi();
}

/* Halt until the RTC seconds register changes; 0 when it did not within max_ticks ticks. */
static int wait_for_next_second(uint64_t max_ticks)
{
    uint8_t start = cmos_read(CMOS_RTC_SECONDS); /* leaves the index on the seconds register */
    uint64_t first_tick = ticks;
    while (ticks - first_tick < max_ticks) {
        wait_for_interrupt();
        if (inb(CMOS_DATA_PORT) != start)
            return 1;
    }
    return 0;
}

static int start_pit(uint32_t hz)
{
    pic_remap(PIC_VECTOR_BASE, PIC_VECTOR_BASE + 8);
    set_interrupt_handler(PIT_VECTOR, pit_tick);
    set_interrupt_handler(PIC_SPURIOUS_VECTOR, pic_spurious);
    if (!pit_start_periodic(hz))
        return -1;
    pic_set_mask((uint16_t)~1u); /* IRQ 0 only */
    return 0;
}

/* Returns the initial count programmed, or 0 when the LAPIC cannot be used. */
static uint32_t start_lapic_timer(uint32_t hz)
{
    pic_remap(PIC_VECTOR_BASE, PIC_VECTOR_BASE + 8); /* all masked: nothing comes through LINT0 */
    set_interrupt_handler(PIC_SPURIOUS_VECTOR, pic_spurious);
    if (lapic_enable())
        return 0;
    set_interrupt_handler(LAPIC_TIMER_VECTOR, lapic_tick);
    lapic_write(LAPIC_TIMER_DIVIDE, LAPIC_DIVIDE_BY_16);
    lapic_write(LAPIC_LVT_TIMER, LAPIC_LVT_MASKED | LAPIC_TIMER_VECTOR); /* one-shot, masked */
    lapic_write(LAPIC_TIMER_INITIAL, 0xffffffffu);
    /* A host that deschedules the vCPU mid-measurement can only make it longer: keep the least. */
    uint32_t elapsed = 0xffffffffu;
    for (int round = 0; round < CALIBRATE_ROUNDS; round++) {
        uint32_t before = lapic_read(LAPIC_TIMER_CURRENT);
        pit_delay_us(CALIBRATE_US);
        uint32_t took = before - lapic_read(LAPIC_TIMER_CURRENT);
        if (took < elapsed)
            elapsed = took;
    }
    uint64_t initial = (uint64_t)elapsed * 1000000u / CALIBRATE_US / hz;
    if (initial == 0 || initial > 0xffffffffu)
        return 0;
    lapic_write(LAPIC_TIMER_INITIAL, 0);
    lapic_write(LAPIC_LVT_TIMER, LAPIC_TIMER_PERIODIC | LAPIC_TIMER_VECTOR);
    lapic_write(LAPIC_TIMER_INITIAL, (uint32_t)initial);
    return (uint32_t)initial;
}

int guest_main(const char *cmdline)
{
    uint64_t hz = option_u64(cmdline, "hz", 1000);
    const char *source;
    size_t source_len;
    int use_lapic = 0;
    if (option_find(cmdline, "source", &source, &source_len)) {
        if (source_len == 5 && !strncmp(source, "lapic", 5))
            use_lapic = 1;
        else if (!(source_len == 3 && !strncmp(source, "pit", 3)))
            return EXIT_BAD_OPTION;
    }
    if (hz < 19 || hz > 10000) {
        printf("timer: hz=%lu is out of range (19-10000)\n", hz);
        return EXIT_BAD_OPTION;
    }
    if (use_lapic) {
        uint32_t initial = start_lapic_timer((uint32_t)hz);
        if (!initial) {
            printf("timer: the local APIC timer cannot be used\n");
            return EXIT_NO_LAPIC;
        }
        outl(TIMER_CALIBRATION_PORT, initial);
    } else if (start_pit((uint32_t)hz)) {
        return EXIT_BAD_OPTION;
    }

    interrupts_enable();
    pit_delay_us(100000); /* polls PIT channel 2 with interrupts on: ticks must arrive meanwhile */
    if (ticks == 0) {
        interrupts_disable();
        printf("timer: no %s interrupt within 100 ms\n", use_lapic ? "LAPIC timer" : "PIT");
        return EXIT_NO_INTERRUPTS;
    }
    /* Start at a seconds transition, count until the next one. */
    if (!wait_for_next_second(3 * hz)) {
        interrupts_disable();
        printf("timer: the RTC seconds register did not change\n");
        return EXIT_RTC_STUCK;
    }
    uint64_t start = ticks;
    int changed = wait_for_next_second(3 * hz);
    uint64_t counted = ticks - start;
    interrupts_disable();
    if (!changed) {
        printf("timer: the RTC seconds register did not change\n");
        return EXIT_RTC_STUCK;
    }
    if (use_lapic)
        lapic_write(LAPIC_LVT_TIMER, LAPIC_LVT_MASKED | LAPIC_TIMER_VECTOR);
    pic_set_mask(0xffff);

    outl(TIMER_REPORT_PORT, (uint32_t)counted);
    if (!use_lapic)
        outw(TIMER_ISR_PORT, first_isr);
    printf("timer: %s %lu Hz programmed, %lu ticks in one RTC second (first ISR 0x%x, %lu spurious)\n",
           use_lapic ? "lapic" : "pit", hz, counted, first_isr, spurious);
    return EXIT_OK;
}
