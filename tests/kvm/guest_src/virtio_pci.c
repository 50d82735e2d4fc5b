/*
 * virtio-pci test guest: finds a virtio-rng (1af4:1044) on PCI bus 0 through configuration
 * mechanism #1 (ports 0xcf8/0xcfc), sizes its BAR 0, walks its capability list to the virtio
 * structures, brings it up through the common configuration with one 4-entry queue, asks for
 * RNG_BYTES random bytes and waits for the used ring.
 *
 * irq=msix (default): MSI-X enabled, vector 0 (config) and 1 (queue 0) to this CPU's LAPIC as
 *   vectors 0x40/0x41; the guest waits for vector 0x41.
 * irq=intx: no MSI-X; the IO-APIC pin of the device's GSI (16 + slot % 8, what vmscope wires) is
 *   programmed level-triggered to vector 0x42; the handler reads the ISR (read-to-clear) and EOIs.
 * irq=poll: no interrupt, the guest polls the used index.
 * The wait is bounded: 5000 x 1 ms on PIT channel 2.
 *
 * Serial output, one line each:
 *   "virtio-pci: found 1af4:1044 at 00:<slot>.0 bar0=0x<addr> size=0x<size> mult=<n> caps=<n>"
 *   "virtio-pci: irq=<mode> interrupts=<n> isr=0x<first isr read> used_len=<n> buffer=0x<addr> bytes=<hex>"
 * Exit: 0x10 -> status 33 success; 0x11 no device; 0x12 bad BAR; 0x13 missing capability;
 *       0x14 feature negotiation failed; 0x15 queue set-up failed; 0x16 timeout; 0x17 bad used entry;
 *       0x18 bad command line; 0x19 no LAPIC.
 */
#include "vmscope_guest.h"

#define EXIT_OK 0x10
#define EXIT_NO_DEVICE 0x11
#define EXIT_BAD_BAR 0x12
#define EXIT_NO_CAPABILITY 0x13
#define EXIT_FEATURES 0x14
#define EXIT_QUEUE 0x15
#define EXIT_TIMEOUT 0x16
#define EXIT_BAD_USED 0x17
#define EXIT_BAD_OPTION 0x18
#define EXIT_NO_LAPIC 0x19

#define RNG_BYTES 16
#define QUEUE_SIZE 4
#define CONFIG_VECTOR 0x40
#define QUEUE_VECTOR 0x41
#define INTX_VECTOR 0x42
#define IOAPIC_BASE 0xfec00000u

/* virtio 1.2, 4.1.4 */
struct virtio_pci_common_cfg {
    uint32_t device_feature_select;
    uint32_t device_feature;
    uint32_t driver_feature_select;
    uint32_t driver_feature;
    uint16_t msix_config;
    uint16_t num_queues;
    uint8_t device_status;
    uint8_t config_generation;
    uint16_t queue_select;
    uint16_t queue_size;
    uint16_t queue_msix_vector;
    uint16_t queue_enable;
    uint16_t queue_notify_off;
    uint32_t queue_desc_lo, queue_desc_hi;
    uint32_t queue_driver_lo, queue_driver_hi;
    uint32_t queue_device_lo, queue_device_hi;
};

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[QUEUE_SIZE];
    uint16_t used_event;
};

struct vring_used {
    uint16_t flags;
    uint16_t idx;
    struct {
        uint32_t id;
        uint32_t len;
    } ring[QUEUE_SIZE];
    uint16_t avail_event;
};

static struct vring_desc desc[QUEUE_SIZE] __attribute__((aligned(4096)));
static struct vring_avail avail __attribute__((aligned(4096)));
static struct vring_used used __attribute__((aligned(4096)));
static uint8_t buffer[RNG_BYTES] __attribute__((aligned(64)));

static volatile uint32_t interrupts;
static volatile uint8_t first_isr = 0xff;
static volatile uint8_t *isr_register;

static inline uint16_t inw(uint16_t port)
{
    uint16_t value;
    __asm__ volatile("inw %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static inline uint32_t conf1(unsigned slot, unsigned offset)
{
    return 0x80000000u | (slot << 11) | (offset & 0xfcu);
}
static uint32_t cfg_read32(unsigned slot, unsigned offset)
{
    outl(0xcf8, conf1(slot, offset));
    return inl(0xcfc);
}
static uint16_t cfg_read16(unsigned slot, unsigned offset)
{
    outl(0xcf8, conf1(slot, offset));
    return inw((uint16_t)(0xcfc + (offset & 2)));
}
static uint8_t cfg_read8(unsigned slot, unsigned offset)
{
    outl(0xcf8, conf1(slot, offset));
    return inb((uint16_t)(0xcfc + (offset & 3)));
}
static void cfg_write32(unsigned slot, unsigned offset, uint32_t value)
{
    outl(0xcf8, conf1(slot, offset));
    outl(0xcfc, value);
}
static void cfg_write16(unsigned slot, unsigned offset, uint16_t value)
{
    outl(0xcf8, conf1(slot, offset));
    outw((uint16_t)(0xcfc + (offset & 2)), value);
}

static void ioapic_write(uint32_t reg, uint32_t value)
{
    *(volatile uint32_t *)(uintptr_t)IOAPIC_BASE = reg;
    *(volatile uint32_t *)(uintptr_t)(IOAPIC_BASE + 0x10) = value;
}

static void on_queue_vector(uint8_t vector)
{
    (void)vector;
    interrupts++;
    lapic_eoi();
}

static void on_intx(uint8_t vector)
{
    (void)vector;
    uint8_t isr = *isr_register; /* read-to-clear: lowers the line before the EOI */
    if (first_isr == 0xff)
        first_isr = isr;
    interrupts++;
    lapic_eoi();
}

int guest_main(const char *cmdline)
{
    enum { MSIX, INTX, POLL } mode = MSIX;
    const char *value;
    size_t len;
    if (option_find(cmdline, "irq", &value, &len)) {
        if (len == 4 && !strncmp(value, "intx", 4))
            mode = INTX;
        else if (len == 4 && !strncmp(value, "poll", 4))
            mode = POLL;
        else if (!(len == 4 && !strncmp(value, "msix", 4)))
            return EXIT_BAD_OPTION;
    }

    /* 1. scan bus 0 */
    unsigned slot = 32;
    for (unsigned s = 0; s < 32; s++) {
        if (cfg_read32(s, 0) == 0xffffffffu) /* nobody at this slot */
            continue;
        if (cfg_read16(s, 0) == 0x1af4 && cfg_read16(s, 2) == 0x1044) {
            slot = s;
            break;
        }
    }
    if (slot == 32)
        return EXIT_NO_DEVICE;

    /* 2. BAR 0: 64-bit memory; size it (decoding is still off) */
    uint32_t low = cfg_read32(slot, 0x10);
    if ((low & 0x7) != 0x4)
        return EXIT_BAD_BAR;
    uint64_t bar0 = (low & ~0xfu) | ((uint64_t)cfg_read32(slot, 0x14) << 32);
    cfg_write32(slot, 0x10, 0xffffffffu);
    uint32_t size = ~(cfg_read32(slot, 0x10) & ~0xfu) + 1;
    cfg_write32(slot, 0x10, low);
    if (!bar0 || bar0 >> 32 || cfg_read32(slot, 0x10) != low)
        return EXIT_BAD_BAR;
    cfg_write16(slot, 0x04, 0x6); /* Memory Space + Bus Master */

    /* 3. capabilities */
    volatile struct virtio_pci_common_cfg *common = 0;
    uintptr_t notify_base = 0, isr = 0;
    uint32_t multiplier = 0;
    unsigned msix_cap = 0, caps = 0;
    for (unsigned pos = cfg_read8(slot, 0x34) & ~3u; pos; pos = cfg_read8(slot, pos + 1) & ~3u) {
        caps++;
        uint8_t id = cfg_read8(slot, pos);
        if (id == 0x11) {
            msix_cap = pos;
            continue;
        }
        if (id != 0x09 || cfg_read8(slot, pos + 4) != 0)
            continue;
        uintptr_t where = (uintptr_t)bar0 + cfg_read32(slot, pos + 8);
        switch (cfg_read8(slot, pos + 3)) {
        case 1: common = (volatile struct virtio_pci_common_cfg *)where; break;
        case 2: notify_base = where; multiplier = cfg_read32(slot, pos + 16); break;
        case 3: isr = where; break;
        }
    }
    if (!common || !notify_base || !isr || !msix_cap)
        return EXIT_NO_CAPABILITY;
    isr_register = (volatile uint8_t *)isr;
    printf("virtio-pci: found 1af4:1044 at 00:%02x.0 bar0=0x%lx size=0x%x mult=%u caps=%u\n", slot, bar0, size,
           multiplier, caps);

    /* 4. MSI-X table: entry 0 config, entry 1 queue 0, to this CPU */
    pic_remap(0x20, 0x28);
    if (mode != POLL && lapic_enable())
        return EXIT_NO_LAPIC;
    if (mode == MSIX) {
        volatile uint32_t *table = (volatile uint32_t *)(uintptr_t)(bar0 + (cfg_read32(slot, msix_cap + 4) & ~7u));
        uint32_t address = 0xfee00000u | ((uint32_t)lapic_id() << 12);
        uint32_t vectors[2] = {CONFIG_VECTOR, QUEUE_VECTOR};
        for (int v = 0; v < 2; v++) {
            table[4 * v + 0] = address;
            table[4 * v + 1] = 0;
            table[4 * v + 2] = vectors[v];
            table[4 * v + 3] = 0; /* unmask */
        }
        cfg_write16(slot, msix_cap + 2, 0x8000); /* MSI-X enable */
        set_interrupt_handler(QUEUE_VECTOR, on_queue_vector);
    } else if (mode == INTX) {
        unsigned gsi = 16 + slot % 8;
        ioapic_write(0x10 + 2 * gsi + 1, (uint32_t)lapic_id() << 24);
        ioapic_write(0x10 + 2 * gsi, INTX_VECTOR | (1u << 15)); /* level, active high, unmasked */
        set_interrupt_handler(INTX_VECTOR, on_intx);
    }

    /* 5. device initialisation (virtio 1.2, 3.1.1) */
    common->device_status = 0;
    while (common->device_status)
        cpu_relax();
    common->device_status = 1;     /* ACKNOWLEDGE */
    common->device_status = 1 | 2; /* DRIVER */
    common->device_feature_select = 1;
    if (!(common->device_feature & 1)) /* VIRTIO_F_VERSION_1 */
        return EXIT_FEATURES;
    common->driver_feature_select = 0;
    common->driver_feature = 0;
    common->driver_feature_select = 1;
    common->driver_feature = 1;
    common->device_status = 1 | 2 | 8; /* FEATURES_OK */
    if (!(common->device_status & 8))
        return EXIT_FEATURES;
    if (mode == MSIX) {
        common->msix_config = 0;
        if (common->msix_config != 0)
            return EXIT_QUEUE;
    }

    common->queue_select = 0;
    if (common->queue_size < QUEUE_SIZE || common->queue_enable)
        return EXIT_QUEUE;
    common->queue_size = QUEUE_SIZE;
    common->queue_desc_lo = (uint32_t)(uintptr_t)desc;
    common->queue_desc_hi = 0;
    common->queue_driver_lo = (uint32_t)(uintptr_t)&avail;
    common->queue_driver_hi = 0;
    common->queue_device_lo = (uint32_t)(uintptr_t)&used;
    common->queue_device_hi = 0;
    uint16_t vector = mode == MSIX ? 1 : 0xffff;
    common->queue_msix_vector = vector;
    if (common->queue_msix_vector != vector)
        return EXIT_QUEUE;
    volatile uint16_t *notify = (volatile uint16_t *)(notify_base + common->queue_notify_off * multiplier);
    common->queue_enable = 1;
    common->device_status = 1 | 2 | 8 | 4; /* DRIVER_OK */
    if (common->device_status != (1 | 2 | 8 | 4))
        return EXIT_QUEUE;

    /* 6. one device-writable buffer */
    desc[0].addr = (uint64_t)(uintptr_t)buffer;
    desc[0].len = RNG_BYTES;
    desc[0].flags = 2; /* VIRTQ_DESC_F_WRITE */
    desc[0].next = 0;
    avail.ring[0] = 0;
    __asm__ volatile("" ::: "memory");
    avail.idx = 1;
    __asm__ volatile("mfence" ::: "memory");
    if (mode != POLL)
        interrupts_enable();
    *notify = 0;

    /* 7. wait (bounded) for the used entry and, with an interrupt mode, its interrupt */
    for (int ms = 0; ms < 5000; ms++) {
        if (*(volatile uint16_t *)&used.idx == 1 && (mode == POLL || interrupts))
            break;
        pit_delay_us(1000);
    }
    interrupts_disable();
    if (*(volatile uint16_t *)&used.idx != 1 || (mode != POLL && !interrupts)) {
        printf("virtio-pci: timeout (used idx %u, %u interrupts)\n", *(volatile uint16_t *)&used.idx, interrupts);
        return EXIT_TIMEOUT;
    }
    if (used.ring[0].id != 0 || used.ring[0].len != RNG_BYTES)
        return EXIT_BAD_USED;

    static const char *names[] = {"msix", "intx", "poll"};
    printf("virtio-pci: irq=%s interrupts=%u isr=0x%x used_len=%u buffer=0x%lx bytes=", names[mode], interrupts,
           first_isr, used.ring[0].len, (uint64_t)(uintptr_t)buffer);
    for (int i = 0; i < RNG_BYTES; i++)
        printf("%02x", buffer[i]);
    printf("\n");
    return EXIT_OK;
}
