/*
 * virtio test guest: a minimal freestanding virtio-mmio (version 2) driver for blk, net,
 * console and rng, plus a deliberately malformed queue and benchmark loops.
 *
 * Devices come from the command line's `virtio_mmio.device=<size>@<base>:<irq>` entries (vmscope
 * appends them; so does QEMU microvm with acpi=off). Each entry is probed: MagicValue "virt" and
 * Version 2, else EXIT_NO_DEVICE; a mode uses the first device with its DeviceID (0 = an empty
 * window, never matched). A device is started as virtio 1.2
 * section 3.1.1 says, accepting VIRTIO_F_VERSION_1 only (plus VIRTIO_BLK_F_FLUSH on a disk, as
 * the blk mode sends FLUSH requests), with split virtqueues in guest memory. Notifications are
 * QueueNotify writes (an ioeventfd with vmscope's I/O threads). Completions are polled on the
 * used ring, or with irq=1 waited for with `sti; hlt` and only the devices' IRQs unmasked on
 * the 8259 PIC: no timer runs, so every wake-up is a device interrupt (the irqfd path). The
 * handler reads InterruptStatus, writes it to InterruptACK and sends the EOI.
 *
 * Command line: mode=M[,M...] with M one of
 *   blk      GET_ID, write blocks=N (8) 4 KiB blocks from sector=S (0), each 8-byte word at
 *            absolute disk offset o holding (seed << 48) | o (seed=1), FLUSH, read back, compare.
 *            park=1: stop after the FLUSH (print "blk: flushed", then halt for good).
 *   net      send a frame with payload=TEXT every 20 ms until the peer's frame arrived and the
 *            peer confirmed ours (timeout_ms=T, 10000); prints the peer's payload.
 *   console  writes "text=TEXT" (underscores become spaces) plus a newline through virtio-console.
 *   rng      reads 64 bytes and prints them in hex.
 *   evil     posts a blk request whose header lies outside RAM, waits for DEVICE_NEEDS_RESET,
 *            resets and restarts the device and checks it serves GET_ID again.
 *   bench-notify  count=K QueueNotify writes on an idle queue, against K stores to RAM.
 *   bench-io      count=K requests of bs=B bytes (4096), depth=D at a time (1), reads (write=1:
 *                 writes) over the whole disk, polled; timed after a warm-up.
 * Other options: irq=1 (interrupt-driven completions for blk, console, rng and evil),
 * timeout_ms=T for any single wait. Time is the TSC, calibrated against PIT channel 0 at start.
 *
 * Output is on COM1, one "<mode>: ..." line per result. Exit (status = (value << 1) | 1):
 *   0x10 (33) success; 0x11 (35) a request completed with a non-OK status; 0x12 (37) timeout;
 *   0x13 (39) device missing or not virtio-mmio v2; 0x14 (41) feature negotiation or queue set-up
 *   failed; 0x15 (43) data mismatch; 0x16 (45) bad command line.
 */
#include "vmscope_guest.h"

#define EXIT_OK 0x10
#define EXIT_IO_ERROR 0x11
#define EXIT_TIMEOUT 0x12
#define EXIT_NO_DEVICE 0x13
#define EXIT_SETUP 0x14
#define EXIT_MISMATCH 0x15
#define EXIT_BAD_OPTION 0x16

/* virtio-mmio registers (virtio 1.2 section 4.2.2) */
#define REG_MAGIC 0x000
#define REG_VERSION 0x004
#define REG_DEVICE_ID 0x008
#define REG_DEVICE_FEATURES 0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY 0x050
#define REG_INTERRUPT_STATUS 0x060
#define REG_INTERRUPT_ACK 0x064
#define REG_STATUS 0x070
#define REG_QUEUE_DESC 0x080
#define REG_QUEUE_DRIVER 0x090
#define REG_QUEUE_DEVICE 0x0a0
#define REG_CONFIG 0x100
#define VIRTIO_MAGIC 0x74726976u

#define STATUS_ACKNOWLEDGE 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8
#define STATUS_NEEDS_RESET 0x40

#define ID_NET 1
#define ID_BLOCK 2
#define ID_CONSOLE 3
#define ID_RNG 4
#define VIRTIO_BLK_F_FLUSH 9

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1

#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define SECTOR 512u
#define BLOCK 4096u

#define MAX_DEVICES 8
#define QUEUE_SIZE 128      /* descriptors per queue we use at most */
#define MAX_SLOTS 32        /* blk requests in flight: 3 descriptors each */
#define DATA_BYTES (1u << 20)
#define PIC_BASE 0x20

#define barrier() __asm__ volatile("" ::: "memory")

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};
struct used_elem {
    uint32_t id;
    uint32_t len;
};
struct rings {
    struct desc desc[QUEUE_SIZE];
    struct {
        uint16_t flags, idx, ring[QUEUE_SIZE], used_event;
    } avail;
    struct {
        uint16_t flags, idx;
        struct used_elem ring[QUEUE_SIZE];
        uint16_t avail_event;
    } __attribute__((aligned(4))) used;
};

struct device;
struct queue {
    struct device *dev;
    struct rings *r;
    uint32_t index;
    uint16_t size, next_avail, used_seen;
    uint32_t irq_mark; /* the device's interrupt count at the last kick */
};
struct device {
    uintptr_t base;
    uint32_t irq, id;
    struct queue q[2];
    volatile uint32_t irq_count, irq_bits;
    int irq_mode;
};

static struct rings rings[MAX_DEVICES][2] __attribute__((aligned(4096)));
static struct device devices[MAX_DEVICES];
static unsigned device_count;
static uint8_t data[DATA_BYTES] __attribute__((aligned(4096)));
static struct {
    uint32_t type, reserved;
    uint64_t sector;
} blk_header[MAX_SLOTS];
static volatile uint8_t blk_status[MAX_SLOTS];
static uint64_t tsc_per_ms;
static uint64_t timeout_ms;
static int want_irq;
static const char *cmdline;

static uint32_t rd(struct device *d, uint32_t reg) { return *(volatile uint32_t *)(d->base + reg); }
static void wr(struct device *d, uint32_t reg, uint32_t v) { *(volatile uint32_t *)(d->base + reg) = v; }
static uint8_t rd_config8(struct device *d, uint32_t off) { return *(volatile uint8_t *)(d->base + REG_CONFIG + off); }

static uint64_t deadline_after_ms(uint64_t ms) { return rdtsc() + ms * tsc_per_ms; }

static void delay_us(uint64_t us)
{
    uint64_t end = rdtsc() + us * tsc_per_ms / 1000;
    while (rdtsc() < end)
        cpu_relax();
}

/* PIT channel 0's current count (latched through port 0x43, read through 0x40) */
static uint16_t pit_count(void)
{
    outb(0x43, 0x00);
    uint8_t lo = inb(0x40);
    return (uint16_t)(lo | inb(0x40) << 8);
}

/* TSC cycles per millisecond, against PIT channel 0 counting down in mode 2 from 65536 (read back
 * through port 0x40: QEMU microvm has no port 0x61, which pit_delay_us polls). IRQ 0 stays masked. */
static uint64_t calibrate_tsc(void)
{
    outb(0x43, 0x34); /* channel 0, low then high byte, mode 2 */
    outb(0x40, 0);
    outb(0x40, 0);
    uint16_t last = pit_count();
    uint64_t t0 = rdtsc(), ticks = 0;
    while (ticks < PIT_FREQUENCY_HZ / 50) { /* 20 ms; the count wraps every 55 ms */
        uint16_t now = pit_count();
        ticks += (uint16_t)(last - now);
        last = now;
    }
    uint64_t cycles = rdtsc() - t0;
    outb(0x43, 0x30); /* back to mode 0 (one shot) */
    outb(0x40, 0);
    outb(0x40, 0);
    return cycles * PIT_FREQUENCY_HZ / (ticks * 1000);
}

/* ---- command line ---- */

/* a decimal or 0x-hex number with an optional K/M/G suffix (Linux memparse); advances *p */
static uint64_t parse_number(const char **p)
{
    const char *s = *p;
    uint64_t v = 0, base = 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    for (;; s++) {
        unsigned c = (unsigned char)*s, digit;
        if (c >= '0' && c <= '9')
            digit = c - '0';
        else if (base == 16 && (c | 0x20) >= 'a' && (c | 0x20) <= 'f')
            digit = (c | 0x20) - 'a' + 10;
        else
            break;
        v = v * base + digit;
    }
    if (*s == 'K' || *s == 'k')
        v <<= 10, s++;
    else if (*s == 'M' || *s == 'm')
        v <<= 20, s++;
    else if (*s == 'G' || *s == 'g')
        v <<= 30, s++;
    *p = s;
    return v;
}

/* Fill devices[] from every virtio_mmio.device=<size>@<base>:<irq> word; -1 on a malformed one. */
static int find_devices(void)
{
    static const char key[] = "virtio_mmio.device=";
    for (const char *p = cmdline; *p;) {
        while (*p == ' ')
            p++;
        if (strncmp(p, key, sizeof key - 1) == 0 && device_count < MAX_DEVICES) {
            const char *s = p + sizeof key - 1;
            parse_number(&s);
            if (*s++ != '@')
                return -1;
            uint64_t base = parse_number(&s);
            if (*s++ != ':')
                return -1;
            uint64_t irq = parse_number(&s);
            devices[device_count].base = (uintptr_t)base;
            devices[device_count].irq = (uint32_t)irq;
            device_count++;
        }
        while (*p && *p != ' ')
            p++;
    }
    return 0;
}

/* ---- device start-up (virtio 1.2 section 3.1.1) ---- */

static int queue_setup(struct device *d, unsigned index, struct rings *r)
{
    struct queue *q = &d->q[index];
    wr(d, REG_QUEUE_SEL, index);
    uint32_t max = rd(d, REG_QUEUE_NUM_MAX);
    if (max == 0 || rd(d, REG_QUEUE_READY)) {
        printf("virtio: %lx queue %u: QueueNumMax %u, ready %u\n", d->base, index, max, rd(d, REG_QUEUE_READY));
        return -1;
    }
    uint16_t size = QUEUE_SIZE;
    while (size > max)
        size >>= 1;
    memset(r, 0, sizeof *r);
    *q = (struct queue){.dev = d, .r = r, .index = index, .size = size};
    if (!d->irq_mode)
        r->avail.flags = AVAIL_F_NO_INTERRUPT; /* polled: spare the device the interrupt */
    wr(d, REG_QUEUE_NUM, size);
    uint64_t addr[3] = {(uintptr_t)r->desc, (uintptr_t)&r->avail, (uintptr_t)&r->used};
    for (unsigned i = 0; i < 3; i++) {
        wr(d, REG_QUEUE_DESC + 0x10 * i, (uint32_t)addr[i]);
        wr(d, REG_QUEUE_DESC + 0x10 * i + 4, (uint32_t)(addr[i] >> 32));
    }
    wr(d, REG_QUEUE_READY, 1);
    return 0;
}

/* Reset and start device d with `queues` queues; EXIT_OK or an exit value. */
static int device_start(struct device *d, unsigned queues, uint32_t extra_features)
{
    struct rings *r = rings[d - devices];
    wr(d, REG_STATUS, 0);
    wr(d, REG_STATUS, STATUS_ACKNOWLEDGE);
    wr(d, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    wr(d, REG_DEVICE_FEATURES_SEL, 1);
    uint32_t high = rd(d, REG_DEVICE_FEATURES);
    wr(d, REG_DEVICE_FEATURES_SEL, 0);
    uint32_t low = rd(d, REG_DEVICE_FEATURES);
    if (!(high & 1)) {
        printf("virtio: %lx does not offer VIRTIO_F_VERSION_1 (features %x%08x)\n", d->base, high, low);
        return EXIT_SETUP;
    }
    wr(d, REG_DRIVER_FEATURES_SEL, 0);
    wr(d, REG_DRIVER_FEATURES, low & extra_features);
    wr(d, REG_DRIVER_FEATURES_SEL, 1);
    wr(d, REG_DRIVER_FEATURES, 1);
    wr(d, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(rd(d, REG_STATUS) & STATUS_FEATURES_OK)) {
        printf("virtio: %lx refused FEATURES_OK\n", d->base);
        return EXIT_SETUP;
    }
    for (unsigned i = 0; i < queues; i++)
        if (queue_setup(d, i, &r[i]))
            return EXIT_SETUP;
    wr(d, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    uint32_t status = rd(d, REG_STATUS);
    if (!(status & STATUS_DRIVER_OK) || (status & STATUS_NEEDS_RESET)) {
        printf("virtio: %lx status %x after DRIVER_OK\n", d->base, status);
        return EXIT_SETUP;
    }
    return EXIT_OK;
}

static void device_irq(uint8_t vector)
{
    unsigned irq = vector - PIC_BASE;
    for (unsigned i = 0; i < device_count; i++) {
        struct device *d = &devices[i];
        if (d->irq != irq || !d->irq_mode)
            continue;
        uint32_t status = rd(d, REG_INTERRUPT_STATUS);
        if (status) {
            wr(d, REG_INTERRUPT_ACK, status);
            d->irq_count++;
            d->irq_bits |= status;
        }
    }
    pic_eoi(irq);
}

static void ignore_irq(uint8_t vector) { (void)vector; } /* spurious IRQ 7 / 15: no EOI */

static uint16_t pic_mask = 0xffff;

/* Find the first device with DeviceID `id` and start it; NULL (after a message) when none. */
static struct device *open_device(uint32_t id, unsigned queues, uint32_t extra_features, int *error)
{
    for (unsigned i = 0; i < device_count; i++) {
        struct device *d = &devices[i];
        if (d->id != id)
            continue;
        d->irq_mode = want_irq && d->irq < 16 && d->irq != 2;
        if (d->irq_mode) {
            set_interrupt_handler((uint8_t)(PIC_BASE + d->irq), device_irq);
            pic_mask &= (uint16_t)~(1u << d->irq);
            if (d->irq >= 8)
                pic_mask &= (uint16_t)~(1u << 2);
            pic_set_mask(pic_mask);
        }
        *error = device_start(d, queues, extra_features);
        return *error == EXIT_OK ? d : NULL;
    }
    printf("virtio: no device with id %u among %u\n", id, device_count);
    *error = EXIT_NO_DEVICE;
    return NULL;
}

/* ---- virtqueues ---- */

static void queue_add(struct queue *q, uint16_t head)
{
    q->r->avail.ring[q->next_avail & (q->size - 1)] = head;
    q->next_avail++;
    barrier();
    *(volatile uint16_t *)&q->r->avail.idx = q->next_avail;
}

static void queue_kick(struct queue *q)
{
    barrier();
    q->irq_mark = q->dev->irq_count;
    wr(q->dev, REG_QUEUE_NOTIFY, q->index);
}

static int queue_has_used(struct queue *q) { return *(volatile uint16_t *)&q->r->used.idx != q->used_seen; }

/* Wait for the next used element, polling, or in irq mode halting until the ring has one and
 * the device interrupted since the last kick (interrupts are off everywhere else, so a
 * completion is never taken without its interrupt); 0 with *elem filled, or -1 after timeout_ms. */
static int queue_wait(struct queue *q, struct used_elem *elem)
{
    uint64_t deadline = deadline_after_ms(timeout_ms);
    if (q->dev->irq_mode) {
        interrupts_disable();
        while (!queue_has_used(q) || q->dev->irq_count == q->irq_mark) {
            if (rdtsc() > deadline)
                return -1;
            wait_for_interrupt();
            interrupts_disable();
        }
    } else {
        while (!queue_has_used(q))
            if (rdtsc() > deadline)
                return -1;
    }
    barrier();
    *elem = *(volatile struct used_elem *)&q->r->used.ring[q->used_seen & (q->size - 1)];
    q->used_seen++;
    return 0;
}

static void set_desc(struct queue *q, uint16_t i, const volatile void *addr, uint32_t len, uint16_t flags, uint16_t next)
{
    q->r->desc[i] = (struct desc){(uintptr_t)addr, len, flags, next};
}

/* ---- virtio-blk ---- */

static void blk_post(struct queue *q, unsigned slot, uint32_t type, uint64_t sector, void *buf, uint32_t len)
{
    uint16_t head = (uint16_t)(3 * slot);
    blk_header[slot].type = type;
    blk_header[slot].reserved = 0;
    blk_header[slot].sector = sector;
    blk_status[slot] = 0xff;
    int device_writes = type == BLK_T_IN || type == BLK_T_GET_ID;
    set_desc(q, head, &blk_header[slot], 16, DESC_F_NEXT, len ? head + 1 : head + 2);
    if (len)
        set_desc(q, head + 1, buf, len, DESC_F_NEXT | (device_writes ? DESC_F_WRITE : 0), head + 2);
    set_desc(q, head + 2, &blk_status[slot], 1, DESC_F_WRITE, 0);
    queue_add(q, head);
}

/* One request, waited for: its status (0 OK, 1 IOERR, 2 UNSUPP), or -1 on timeout / bad used id. */
static int blk_request(struct queue *q, uint32_t type, uint64_t sector, void *buf, uint32_t len, uint32_t *used_len)
{
    struct used_elem elem;
    blk_post(q, 0, type, sector, buf, len);
    queue_kick(q);
    if (queue_wait(q, &elem)) {
        printf("blk: request type %u timed out (device status %x)\n", type, rd(q->dev, REG_STATUS));
        return -1;
    }
    if (elem.id != 0) {
        printf("blk: used id %u, expected 0\n", elem.id);
        return -1;
    }
    if (used_len)
        *used_len = elem.len;
    return blk_status[0];
}

static uint64_t blk_capacity(struct device *d)
{
    uint32_t lo = rd(d, REG_CONFIG), hi = rd(d, REG_CONFIG + 4);
    return (uint64_t)hi << 32 | lo;
}

static int blk_get_id(struct device *d, const char *who)
{
    char id[21];
    uint32_t used_len = 0;
    memset(id, 0, sizeof id);
    int status = blk_request(&d->q[0], BLK_T_GET_ID, 0, id, 20, &used_len);
    if (status < 0)
        return EXIT_TIMEOUT;
    if (status != 0) {
        printf("%s: GET_ID failed with status %d\n", who, status);
        return EXIT_IO_ERROR;
    }
    printf("%s: id '%s' (used length %u), capacity %lu sectors\n", who, id, used_len, blk_capacity(d));
    return EXIT_OK;
}

static void fill_pattern(uint64_t *words, uint64_t disk_offset, uint64_t seed)
{
    for (unsigned i = 0; i < BLOCK / 8; i++)
        words[i] = seed << 48 | (disk_offset + 8 * i);
}

static int mode_blk(void)
{
    int error;
    struct device *d = open_device(ID_BLOCK, 1, 1u << VIRTIO_BLK_F_FLUSH, &error);
    if (!d)
        return error;
    uint64_t blocks = option_u64(cmdline, "blocks", 8), first = option_u64(cmdline, "sector", 0);
    uint64_t seed = option_u64(cmdline, "seed", 1) & 0xffff;
    if ((error = blk_get_id(d, "blk")) != EXIT_OK)
        return error;
    if (first + blocks * (BLOCK / SECTOR) > blk_capacity(d)) {
        printf("blk: %lu blocks from sector %lu do not fit\n", blocks, first);
        return EXIT_BAD_OPTION;
    }
    struct queue *q = &d->q[0];
    uint64_t *words = (uint64_t *)data;
    for (uint64_t b = 0; b < blocks; b++) {
        uint64_t sector = first + b * (BLOCK / SECTOR);
        fill_pattern(words, sector * SECTOR, seed);
        int status = blk_request(q, BLK_T_OUT, sector, data, BLOCK, NULL);
        if (status < 0)
            return EXIT_TIMEOUT;
        if (status) {
            printf("blk: write of block %lu (sector %lu) failed: status %d%s\n", b, sector, status,
                   status == 1 ? " (IOERR)" : "");
            return EXIT_IO_ERROR;
        }
    }
    int status = blk_request(q, BLK_T_FLUSH, 0, NULL, 0, NULL);
    if (status) {
        printf("blk: flush failed: status %d\n", status);
        return status < 0 ? EXIT_TIMEOUT : EXIT_IO_ERROR;
    }
    printf("blk: flushed %lu blocks from sector %lu\n", blocks, first);
    if (option_flag(cmdline, "park", 0))
        park_cpu(); /* the durability test kills the VMM now */
    for (uint64_t b = 0; b < blocks; b++) {
        uint64_t sector = first + b * (BLOCK / SECTOR);
        memset(data, 0, BLOCK);
        uint32_t used_len = 0;
        status = blk_request(q, BLK_T_IN, sector, data, BLOCK, &used_len);
        if (status) {
            printf("blk: read of block %lu failed: status %d\n", b, status);
            return status < 0 ? EXIT_TIMEOUT : EXIT_IO_ERROR;
        }
        fill_pattern((uint64_t *)(data + BLOCK), sector * SECTOR, seed);
        if (memcmp(data, data + BLOCK, BLOCK) || used_len != BLOCK + 1) {
            printf("blk: block %lu reads back wrong (used length %u)\n", b, used_len);
            return EXIT_MISMATCH;
        }
    }
    printf("blk: read back %lu blocks OK\n", blocks);
    if (d->irq_mode)
        printf("blk: %u interrupts on IRQ %u, InterruptStatus bits seen %x\n", d->irq_count, d->irq, d->irq_bits);
    return EXIT_OK;
}

/* ---- evil: a descriptor outside guest RAM ---- */

static int mode_evil(void)
{
    int error;
    struct device *d = open_device(ID_BLOCK, 1, 0, &error);
    if (!d)
        return error;
    struct queue *q = &d->q[0];
    set_desc(q, 0, (void *)(uintptr_t)0x7ff00000000ull, 16, DESC_F_NEXT, 2); /* 8 TiB: no RAM there */
    set_desc(q, 2, &blk_status[0], 1, DESC_F_WRITE, 0);
    queue_add(q, 0);
    queue_kick(q);
    uint64_t deadline = deadline_after_ms(timeout_ms);
    uint32_t status;
    while (!((status = rd(d, REG_STATUS)) & STATUS_NEEDS_RESET))
        if (rdtsc() > deadline) {
            printf("evil: device status %x, NEEDS_RESET never set\n", status);
            return EXIT_TIMEOUT;
        }
    printf("evil: device status %x: NEEDS_RESET, InterruptStatus %x\n", status, rd(d, REG_INTERRUPT_STATUS));
    if ((error = device_start(d, 1, 0)) != EXIT_OK)
        return error;
    if ((error = blk_get_id(d, "evil: after reset")) != EXIT_OK)
        return error;
    printf("evil: device works again\n");
    return EXIT_OK;
}

/* ---- virtio-net ---- */

#define NET_HEADER 12
#define RX_BUFFERS 8
#define RX_BUFFER_BYTES 2048
#define ETHERTYPE_LOCAL 0x88b5 /* IEEE 802 local experimental */
#define NET_MAGIC "VMSCOPE"

static uint8_t net_rx[RX_BUFFERS][RX_BUFFER_BYTES];
static uint8_t net_tx[NET_HEADER + 14 + 8 + 64];

static size_t copy_option(const char *key, char *out, size_t max, const char *fallback)
{
    const char *v;
    size_t len;
    if (!option_find(cmdline, key, &v, &len)) {
        v = fallback;
        len = strlen(fallback);
    }
    if (len > max)
        len = max;
    for (size_t i = 0; i < len; i++)
        out[i] = v[i] == '_' ? ' ' : v[i];
    out[len] = 0;
    return len;
}

/* Send one frame (flag byte: we have the peer's payload) and reclaim its buffer; -1 on timeout. */
static int net_send(struct device *d, const uint8_t mac[6], const char *payload, size_t len, int flag)
{
    uint8_t *frame = net_tx + NET_HEADER;
    memset(net_tx, 0, NET_HEADER);
    memset(frame, 0xff, 6);
    memcpy(frame + 6, mac, 6);
    frame[12] = ETHERTYPE_LOCAL >> 8;
    frame[13] = ETHERTYPE_LOCAL & 0xff;
    memcpy(frame + 14, NET_MAGIC, 7);
    frame[21] = (uint8_t)flag;
    memcpy(frame + 22, payload, len);
    struct queue *tx = &d->q[1];
    struct used_elem elem;
    set_desc(tx, 0, net_tx, (uint32_t)(NET_HEADER + 22 + len), 0, 0);
    queue_add(tx, 0);
    queue_kick(tx);
    return queue_wait(tx, &elem);
}

static int mode_net(void)
{
    int error;
    struct device *d = open_device(ID_NET, 2, 0, &error);
    if (!d)
        return error;
    d->irq_mode = 0; /* the exchange polls, paced by the TSC */
    uint8_t mac[6];
    for (unsigned i = 0; i < 6; i++)
        mac[i] = rd_config8(d, i);
    char payload[65], peer[65] = "";
    size_t len = copy_option("payload", payload, 64, "hello");
    struct queue *rx = &d->q[0];
    for (uint16_t i = 0; i < RX_BUFFERS; i++) {
        set_desc(rx, i, net_rx[i], RX_BUFFER_BYTES, DESC_F_WRITE, 0);
        queue_add(rx, i);
    }
    queue_kick(rx);
    printf("net: mac %02x:%02x:%02x:%02x:%02x:%02x, sending '%s'\n", mac[0], mac[1], mac[2], mac[3], mac[4], mac[5],
           payload);
    int got_peer = 0, peer_has_ours = 0;
    uint64_t deadline = deadline_after_ms(option_u64(cmdline, "timeout_ms", 10000));
    for (unsigned tick = 0; !(got_peer && peer_has_ours); tick++) {
        if (rdtsc() > deadline) {
            printf("net: no exchange with the peer (received %d, confirmed %d)\n", got_peer, peer_has_ours);
            return EXIT_TIMEOUT;
        }
        if (tick % 20 == 0 && net_send(d, mac, payload, len, got_peer))
            return EXIT_TIMEOUT;
        struct used_elem elem;
        while (queue_has_used(rx)) {
            queue_wait(rx, &elem);
            uint8_t *frame = net_rx[elem.id % RX_BUFFERS] + NET_HEADER;
            uint32_t frame_len = elem.len > NET_HEADER ? elem.len - NET_HEADER : 0;
            if (frame_len >= 22 && frame[12] == (ETHERTYPE_LOCAL >> 8) && !memcmp(frame + 14, NET_MAGIC, 7)) {
                if (!got_peer) {
                    size_t n = frame_len - 22 > 64 ? 64 : frame_len - 22;
                    memcpy(peer, frame + 22, n);
                    peer[n] = 0;
                    printf("net: received %u bytes from %02x:%02x:%02x:%02x:%02x:%02x: '%s'\n", frame_len,
                           frame[6], frame[7], frame[8], frame[9], frame[10], frame[11], peer);
                    got_peer = 1;
                }
                peer_has_ours |= frame[21];
            }
            queue_add(rx, (uint16_t)(elem.id % RX_BUFFERS)); /* recycle the buffer */
            queue_kick(rx);
        }
        delay_us(1000);
    }
    for (int i = 0; i < 3; i++) /* the peer may still wait for our confirmation */
        if (net_send(d, mac, payload, len, 1))
            return EXIT_TIMEOUT;
    printf("net: exchange complete\n");
    return EXIT_OK;
}

/* ---- virtio-console and virtio-rng ---- */

static int mode_console(void)
{
    int error;
    struct device *d = open_device(ID_CONSOLE, 2, 0, &error);
    if (!d)
        return error;
    static char line[130];
    size_t len = copy_option("text", line, 128, "hello from the virtio test guest");
    line[len++] = '\n';
    struct queue *tx = &d->q[1];
    struct used_elem elem;
    set_desc(tx, 0, line, (uint32_t)len, 0, 0);
    queue_add(tx, 0);
    queue_kick(tx);
    if (queue_wait(tx, &elem)) {
        printf("console: transmit timed out\n");
        return EXIT_TIMEOUT;
    }
    printf("console: sent %u bytes\n", (unsigned)len);
    return EXIT_OK;
}

static int mode_rng(void)
{
    int error;
    struct device *d = open_device(ID_RNG, 1, 0, &error);
    if (!d)
        return error;
    static uint8_t bytes[64];
    struct queue *q = &d->q[0];
    struct used_elem elem;
    set_desc(q, 0, bytes, sizeof bytes, DESC_F_WRITE, 0);
    queue_add(q, 0);
    queue_kick(q);
    if (queue_wait(q, &elem)) {
        printf("rng: request timed out\n");
        return EXIT_TIMEOUT;
    }
    char hex[2 * sizeof bytes + 1];
    for (unsigned i = 0; i < sizeof bytes; i++)
        snprintf(hex + 2 * i, 3, "%02x", bytes[i]);
    printf("rng: %u bytes: %s\n", elem.len, hex);
    return elem.len == sizeof bytes ? EXIT_OK : EXIT_IO_ERROR;
}

/* ---- benchmarks (timed with rdtsc; the host divides by tsc_khz) ---- */

static int mode_bench_notify(void)
{
    int error;
    struct device *d = open_device(ID_BLOCK, 1, 0, &error);
    if (!d)
        return error;
    uint64_t count = option_u64(cmdline, "count", 10000);
    volatile uint32_t *notify = (volatile uint32_t *)(d->base + REG_QUEUE_NOTIFY);
    static volatile uint32_t scratch;
    uint64_t n, t0, t1, t2;
    /* the same loop twice: once storing to RAM (the loop's own cost), once to QueueNotify */
    t0 = rdtsc();
    n = count;
    __asm__ volatile("1: movl %k2, (%1)\n\tdec %0\n\tjnz 1b" : "+r"(n) : "r"(&scratch), "r"(0) : "memory");
    t1 = rdtsc();
    n = count;
    __asm__ volatile("1: movl %k2, (%1)\n\tdec %0\n\tjnz 1b" : "+r"(n) : "r"(notify), "r"(0) : "memory");
    t2 = rdtsc();
    printf("bench-notify: count=%lu ram_cycles=%lu notify_cycles=%lu tsc_khz=%lu\n", count, t1 - t0, t2 - t1,
           tsc_per_ms);
    return EXIT_OK;
}

/* Post the `depth` prepared request chains again with their next sectors, notify once and spin
 * until the used index catches up: 0, a request's non-OK status, or -1 on timeout. Lean on
 * purpose: CPL0 instructions are emulated on some hosts, and the guest's work must not hide the
 * VMM's. The chains (header, data, status: descriptors 3s..3s+2) never change. */
static int bench_batch(struct queue *q, unsigned depth, uint64_t step, uint64_t *next, uint64_t sectors)
{
    uint16_t avail = q->next_avail;
    for (unsigned s = 0; s < depth; s++) {
        if (*next + step > sectors)
            *next = 0;
        blk_header[s].sector = *next;
        *next += step;
        blk_status[s] = 0xff;
        q->r->avail.ring[(uint16_t)(avail + s) & (q->size - 1)] = (uint16_t)(3 * s);
    }
    avail = (uint16_t)(avail + depth);
    q->next_avail = avail;
    barrier();
    *(volatile uint16_t *)&q->r->avail.idx = avail;
    wr(q->dev, REG_QUEUE_NOTIFY, 0);
    uint64_t deadline = 0;
    for (uint32_t spins = 0; *(volatile uint16_t *)&q->r->used.idx != avail;) {
        if (++spins % 4096 == 0) { /* read the clock rarely: it is one more emulated instruction */
            if (!deadline)
                deadline = deadline_after_ms(timeout_ms);
            else if (rdtsc() > deadline)
                return -1;
        }
    }
    barrier();
    q->used_seen = avail;
    for (unsigned s = 0; s < depth; s++)
        if (blk_status[s])
            return blk_status[s];
    return 0;
}

static int mode_bench_io(void)
{
    int error;
    struct device *d = open_device(ID_BLOCK, 1, 0, &error);
    if (!d)
        return error;
    uint64_t count = option_u64(cmdline, "count", 1000), bs = option_u64(cmdline, "bs", 4096);
    uint64_t depth = option_u64(cmdline, "depth", 1);
    uint32_t type = option_flag(cmdline, "write", 0) ? BLK_T_OUT : BLK_T_IN;
    uint64_t sectors = blk_capacity(d), next = 0;
    struct queue *q = &d->q[0];
    if (!bs || bs % SECTOR || !depth || depth > MAX_SLOTS || depth * bs > DATA_BYTES || bs / SECTOR > sectors ||
        3 * depth > q->size || count % depth || d->irq_mode) {
        printf("bench-io: bs=%lu depth=%lu count=%lu do not fit (queue %u), or irq=1\n", bs, depth, count, q->size);
        return EXIT_BAD_OPTION;
    }
    for (unsigned s = 0; s < depth; s++) /* build the chains once, and warm up */
        blk_post(q, s, type, 0, data + s * bs, (uint32_t)bs);
    queue_kick(q);
    for (unsigned s = 0; s < depth; s++) {
        struct used_elem elem;
        if (queue_wait(q, &elem))
            return EXIT_TIMEOUT;
    }
    int status = 0;
    uint64_t t0 = rdtsc();
    for (uint64_t done = 0; status == 0 && done < count; done += depth)
        status = bench_batch(q, (unsigned)depth, bs / SECTOR, &next, sectors);
    uint64_t t1 = rdtsc();
    if (status) {
        printf("bench-io: request failed (%d)\n", status);
        return status < 0 ? EXIT_TIMEOUT : EXIT_IO_ERROR;
    }
    printf("bench-io: %s count=%lu bs=%lu depth=%lu cycles=%lu tsc_khz=%lu\n", type == BLK_T_IN ? "read" : "write",
           count, bs, depth, t1 - t0, tsc_per_ms);
    return EXIT_OK;
}

/* ---- main ---- */

static const struct {
    const char *name;
    int (*run)(void);
} modes[] = {
    {"blk", mode_blk},         {"net", mode_net},          {"console", mode_console},
    {"rng", mode_rng},         {"evil", mode_evil},        {"bench-notify", mode_bench_notify},
    {"bench-io", mode_bench_io},
};

int guest_main(const char *command_line)
{
    cmdline = command_line;
    const char *mode;
    size_t mode_len;
    if (!option_find(cmdline, "mode", &mode, &mode_len) || find_devices()) {
        printf("virtio: usage: mode=blk|net|console|rng|evil|bench-notify|bench-io and virtio_mmio.device= entries\n");
        return EXIT_BAD_OPTION;
    }
    for (unsigned i = 0; i < device_count; i++) {
        struct device *d = &devices[i];
        uint32_t magic = rd(d, REG_MAGIC), version = rd(d, REG_VERSION);
        d->id = rd(d, REG_DEVICE_ID);
        if (magic != VIRTIO_MAGIC || version != 2) {
            printf("virtio: %lx: magic %x version %u: not a virtio-mmio v2 device\n", d->base, magic, version);
            return EXIT_NO_DEVICE;
        }
        printf("virtio: %lx irq %u device id %u\n", d->base, d->irq, d->id);
    }
    timeout_ms = option_u64(cmdline, "timeout_ms", 5000);
    want_irq = option_flag(cmdline, "irq", 0);
    pic_remap(PIC_BASE, PIC_BASE + 8); /* all masked; open_device unmasks device IRQs in irq mode */
    tsc_per_ms = calibrate_tsc();
    set_interrupt_handler(PIC_BASE + 7, ignore_irq);
    set_interrupt_handler(PIC_BASE + 15, ignore_irq);

    while (mode_len) {
        size_t n = 0;
        while (n < mode_len && mode[n] != ',')
            n++;
        int (*run)(void) = NULL;
        for (unsigned i = 0; i < sizeof modes / sizeof modes[0]; i++)
            if (strlen(modes[i].name) == n && !strncmp(modes[i].name, mode, n))
                run = modes[i].run;
        if (!run) {
            printf("virtio: unknown mode in '%s'\n", mode);
            return EXIT_BAD_OPTION;
        }
        int result = run();
        if (result != EXIT_OK)
            return result;
        mode += n + (n < mode_len);
        mode_len -= n + (n < mode_len);
    }
    printf("virtio: OK\n");
    return EXIT_OK;
}
