/*
 * ref_vmm: a minimal reference VMM in C, the floor for vmscope's exit round trip on this machine.
 *
 * Boots a PVH ELF (XEN_ELFNOTE_PHYS32_ENTRY in a PT_NOTE header) in 32-bit protected mode with a
 * minimal struct hvm_start_info, and runs one vCPU:
 *   - port 0x510 writes are counted (the benchmark's exit), reads return all-ones;
 *   - port 0xf4 (isa-debug-exit) ends the run with exit status (value << 1) | 1;
 *   - port 0x3f8 writes go to stdout (a 16550 that is always ready: LSR = 0x60);
 *   - other ports and all MMIO are ignored, reads return all-ones;
 *   - HLT ends the run with status 0; anything else (shutdown, internal error) with status 2.
 * At the end it prints one line to stderr: "ref_vmm: exits=<n> port_0x510_writes=<n> status=<s>".
 *
 * Usage: ref_vmm [-m MiB] [-c CMDLINE] GUEST.elf         Build: cc -O2 -o ref_vmm ref_vmm.c
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define HVM_START_MAGIC 0x336ec578u
#define START_INFO_ADDR 0x6000ul
#define MEMMAP_ADDR 0x7000ul
#define CMDLINE_ADDR 0x20000ul
#define CMDLINE_MAX 0x10000ul
#define HIGH_MEMORY 0x100000ul

#define BENCH_PORT 0x510
#define DEBUG_EXIT_PORT 0xf4
#define COM1 0x3f8

struct hvm_start_info {
    uint32_t magic, version, flags, nr_modules;
    uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    uint32_t memmap_entries, reserved;
};

struct hvm_memmap_table_entry {
    uint64_t addr, size;
    uint32_t type, reserved;
};

static uint8_t *guest_ram;
static uint64_t guest_ram_size;

static void die(const char *what)
{
    fprintf(stderr, "ref_vmm: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void fail(const char *what)
{
    fprintf(stderr, "ref_vmm: %s\n", what);
    exit(2);
}

static int in_ram(uint64_t addr, uint64_t len)
{
    return addr <= guest_ram_size && len <= guest_ram_size - addr;
}

/* Loads the PT_LOAD segments at their physical addresses; returns the PVH entry point. */
static uint32_t load_pvh_elf(const char *path)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        die(path);
    struct stat st;
    if (fstat(fd, &st) < 0)
        die(path);
    size_t size = (size_t)st.st_size;
    if (size < sizeof(Elf64_Ehdr))
        fail("guest ELF too small");
    uint8_t *image = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (image == MAP_FAILED)
        die("mmap guest ELF");
    close(fd);
    const Elf64_Ehdr *eh = (const Elf64_Ehdr *)image;
    if (memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64 ||
        eh->e_machine != EM_X86_64)
        fail("guest is not an x86-64 ELF64 file");
    if (eh->e_phentsize != sizeof(Elf64_Phdr) || eh->e_phoff > size ||
        (uint64_t)eh->e_phnum * sizeof(Elf64_Phdr) > size - eh->e_phoff)
        fail("bad program header table");
    const Elf64_Phdr *ph = (const Elf64_Phdr *)(image + eh->e_phoff);
    uint64_t entry = 0;
    for (int i = 0; i < eh->e_phnum; i++) {
        if (ph[i].p_offset > size || ph[i].p_filesz > size - ph[i].p_offset)
            fail("segment outside the file");
        if (ph[i].p_type == PT_LOAD && ph[i].p_memsz) {
            if (ph[i].p_filesz > ph[i].p_memsz || !in_ram(ph[i].p_paddr, ph[i].p_memsz))
                fail("PT_LOAD outside guest RAM");
            memcpy(guest_ram + ph[i].p_paddr, image + ph[i].p_offset, ph[i].p_filesz);
            memset(guest_ram + ph[i].p_paddr + ph[i].p_filesz, 0, ph[i].p_memsz - ph[i].p_filesz);
        } else if (ph[i].p_type == PT_NOTE) {
            uint64_t off = ph[i].p_offset, end = off + ph[i].p_filesz;
            while (end - off >= 12) {
                const uint32_t *n = (const uint32_t *)(image + off);
                uint64_t name_off = off + 12, desc_off = name_off + ((n[0] + 3ul) & ~3ul);
                uint64_t next = desc_off + ((n[1] + 3ul) & ~3ul);
                if (next > end)
                    break;
                if (n[2] == XEN_ELFNOTE_PHYS32_ENTRY && n[0] == 4 && memcmp(image + name_off, "Xen", 4) == 0 &&
                    (n[1] == 4 || n[1] == 8))
                    memcpy(&entry, image + desc_off, n[1]);
                off = next;
            }
        }
    }
    munmap(image, size);
    if (!entry || entry >= (1ull << 32))
        fail("no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY in a PT_NOTE header)");
    return (uint32_t)entry;
}

static void write_start_info(const char *cmdline)
{
    size_t len = strlen(cmdline);
    if (len >= CMDLINE_MAX)
        fail("command line too long");
    memcpy(guest_ram + CMDLINE_ADDR, cmdline, len + 1);
    struct hvm_memmap_table_entry map[2] = {
        {0, 0x9fc00, 1, 0},
        {HIGH_MEMORY, guest_ram_size - HIGH_MEMORY, 1, 0},
    };
    memcpy(guest_ram + MEMMAP_ADDR, map, sizeof(map));
    struct hvm_start_info info = {
        .magic = HVM_START_MAGIC,
        .version = 1,
        .cmdline_paddr = CMDLINE_ADDR,
        .memmap_paddr = MEMMAP_ADDR,
        .memmap_entries = 2,
    };
    memcpy(guest_ram + START_INFO_ADDR, &info, sizeof(info));
}

static void set_flat_segment(struct kvm_segment *seg, uint16_t selector, uint8_t type)
{
    memset(seg, 0, sizeof(*seg));
    seg->base = 0;
    seg->limit = 0xffffffff;
    seg->selector = selector;
    seg->type = type;
    seg->present = 1;
    seg->s = 1;
    seg->db = 1;
    seg->g = 1;
}

int main(int argc, char **argv)
{
    const char *cmdline = "";
    uint64_t mem_mib = 64;
    int opt;
    while ((opt = getopt(argc, argv, "m:c:")) != -1) {
        if (opt == 'm')
            mem_mib = strtoull(optarg, NULL, 0);
        else if (opt == 'c')
            cmdline = optarg;
        else
            fail("usage: ref_vmm [-m MiB] [-c CMDLINE] GUEST.elf");
    }
    if (optind != argc - 1 || mem_mib < 2 || mem_mib > 3072)
        fail("usage: ref_vmm [-m MiB (2-3072)] [-c CMDLINE] GUEST.elf");
    guest_ram_size = mem_mib << 20;

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
        fail("unexpected KVM API version");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    guest_ram = mmap(NULL, guest_ram_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (guest_ram == MAP_FAILED)
        die("mmap guest RAM");
    struct kvm_userspace_memory_region region = {
        .slot = 0,
        .guest_phys_addr = 0,
        .memory_size = guest_ram_size,
        .userspace_addr = (uint64_t)guest_ram,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    uint32_t entry = load_pvh_elf(argv[optind]);
    write_start_info(cmdline);

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");

    /* CPUID: whatever KVM supports, unchanged */
    int nent = 256;
    struct kvm_cpuid2 *cpuid = NULL;
    for (;;) {
        cpuid = realloc(cpuid, sizeof(*cpuid) + (size_t)nent * sizeof(cpuid->entries[0]));
        if (!cpuid)
            fail("out of memory");
        cpuid->nent = (uint32_t)nent;
        if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) == 0)
            break;
        if (errno != E2BIG)
            die("KVM_GET_SUPPORTED_CPUID");
        nent *= 2;
    }
    if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0)
        die("KVM_SET_CPUID2");
    free(cpuid);

    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < (int)sizeof(struct kvm_run))
        die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");

    /* 32-bit protected mode, paging off, flat segments (start from the reset state for TR/LDT) */
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    set_flat_segment(&sregs.cs, 0x10, 0xb); /* execute/read, accessed */
    set_flat_segment(&sregs.ds, 0x18, 0x3); /* read/write, accessed */
    sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
    sregs.cr0 = 0x11; /* PE | ET */
    sregs.cr4 = 0;
    sregs.efer = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    struct kvm_regs regs;
    memset(&regs, 0, sizeof(regs));
    regs.rip = entry;
    regs.rbx = START_INFO_ADDR;
    regs.rflags = 0x2;
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");

    uint64_t exits = 0, bench_writes = 0;
    int status = -1;
    while (status < 0) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            die("KVM_RUN");
        }
        exits++;
        switch (run->exit_reason) {
        case KVM_EXIT_IO: {
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            size_t bytes = (size_t)run->io.size * run->io.count;
            if (run->io.direction == KVM_EXIT_IO_OUT) {
                if (run->io.port == BENCH_PORT) {
                    bench_writes += run->io.count;
                } else if (run->io.port == DEBUG_EXIT_PORT) {
                    uint32_t value = 0;
                    memcpy(&value, data, run->io.size < 4 ? run->io.size : 4);
                    status = (int)(((value << 1) | 1) & 0xff);
                } else if (run->io.port == COM1) {
                    fwrite(data, run->io.size, run->io.count, stdout);
                }
            } else {
                memset(data, 0xff, bytes);
                if (run->io.port == COM1 + 5) /* LSR: transmitter empty */
                    memset(data, 0x60, bytes);
                else if (run->io.port == COM1 + 2) /* IIR: no interrupt, no FIFO */
                    memset(data, 0x01, bytes);
            }
            break;
        }
        case KVM_EXIT_MMIO:
            if (!run->mmio.is_write)
                memset(run->mmio.data, 0xff, sizeof(run->mmio.data));
            break;
        case KVM_EXIT_HLT:
            fprintf(stderr, "ref_vmm: guest halted\n");
            status = 0;
            break;
        case KVM_EXIT_SHUTDOWN:
            fprintf(stderr, "ref_vmm: guest shut down (triple fault)\n");
            status = 2;
            break;
        case KVM_EXIT_INTERNAL_ERROR:
            fprintf(stderr, "ref_vmm: KVM internal error, suberror %u\n", run->internal.suberror);
            status = 2;
            break;
        case KVM_EXIT_FAIL_ENTRY:
            fprintf(stderr, "ref_vmm: entry failed, reason 0x%llx\n",
                    (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
            status = 2;
            break;
        default:
            fprintf(stderr, "ref_vmm: unhandled exit reason %u\n", run->exit_reason);
            status = 2;
        }
    }
    fflush(stdout);
    fprintf(stderr, "ref_vmm: exits=%llu port_0x510_writes=%llu status=%d\n", (unsigned long long)exits,
            (unsigned long long)bench_writes, status);
    return status;
}
