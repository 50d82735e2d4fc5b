/*
 * vmscope demo guest: a small, known workload to profile.
 *
 * At CPL0 it prints a banner, the hypervisor signature (CPUID 0x40000000), the command line and
 * the PVH memory map; then it runs run_workload() at CPL3 (native speed on PVM hosts), which
 * calls compute_primes, checksum_buffer and matrix_multiply `iterations` times, marks each
 * phase on the scratch port and touches the unclaimed MMIO window, prints a summary and
 * returns to CPL0, which powers the machine off through ACPI S5 (exit status 0, so
 * `vmscope run && echo ok` works) or, when a self-check failed, exits through isa-debug-exit.
 *
 * Command line: iterations=N (default 5), primes=LIMIT (default 100000), quiet (less output).
 * Devices: port DEMO_SCRATCH_PORT (0x510): outb phase markers and outl results, never read.
 *          MMIO DEMO_MMIO_BASE (physical 0xD0000000): one 32-bit read and one 32-bit write per
 *          phase; vmscope leaves it unclaimed (reads as all-ones, counted), so the value is not checked.
 * Exit: ACPI S5 power-off -> status 0 on success; debug_exit(0x11) -> status 35 when a self-check failed.
 */
#include "vmscope_guest.h"

#define DEMO_SCRATCH_PORT SCRATCH_PORT
#define DEMO_MMIO_BASE 0xD0000000ul
#define DEMO_EXIT_SELF_CHECK_FAILED 0x11

#define NOINLINE __attribute__((noinline))
#define MAX_PRIME_LIMIT 1000000u
#define CHECKSUM_BUFFER_SIZE (256u * 1024u)
#define MATRIX_N 96

struct workload {
    uint64_t iterations;
    uint64_t prime_limit;
    int quiet;
    /* results */
    uint32_t prime_count;
    uint32_t checksum;
    uint64_t matrix_trace;
    uint32_t mmio_value;
    uint64_t cycles;
    int failures;
};

static uint8_t sieve[MAX_PRIME_LIMIT + 1];
static uint8_t checksum_data[CHECKSUM_BUFFER_SIZE];
static int64_t matrix_a[MATRIX_N][MATRIX_N], matrix_b[MATRIX_N][MATRIX_N], matrix_c[MATRIX_N][MATRIX_N];

static void mark_phase(uint8_t phase)
{
    outb(DEMO_SCRATCH_PORT, phase);
    volatile uint32_t *mmio = (volatile uint32_t *)DEMO_MMIO_BASE;
    mmio[phase & 0xf] = phase;
}

/* Sieve of Eratosthenes; returns the number of primes <= limit. */
NOINLINE uint32_t compute_primes(uint32_t limit)
{
    memset(sieve, 1, limit + 1);
    sieve[0] = 0;
    if (limit >= 1)
        sieve[1] = 0;
    for (uint32_t i = 2; (uint64_t)i * i <= limit; i++)
        if (sieve[i])
            for (uint32_t j = i * i; j <= limit; j += i)
                sieve[j] = 0;
    uint32_t count = 0;
    for (uint32_t i = 0; i <= limit; i++)
        count += sieve[i];
    return count;
}

/* CRC-32 (IEEE, reflected), bitwise: deliberately CPU-heavy. */
NOINLINE uint32_t crc32(const uint8_t *data, size_t len)
{
    uint32_t crc = 0xffffffffu;
    for (size_t i = 0; i < len; i++) {
        crc ^= data[i];
        for (int bit = 0; bit < 8; bit++)
            crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

/* Fills the buffer from a seeded xorshift generator and returns its CRC-32. */
NOINLINE uint32_t checksum_buffer(uint8_t *buffer, size_t len, uint32_t seed)
{
    uint32_t x = seed ? seed : 1u;
    for (size_t i = 0; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        buffer[i] = (uint8_t)x;
    }
    return crc32(buffer, len);
}

/* c = a * b for MATRIX_N x MATRIX_N integer matrices; returns the trace of c. */
NOINLINE uint64_t matrix_multiply(int64_t (*a)[MATRIX_N], int64_t (*b)[MATRIX_N], int64_t (*c)[MATRIX_N])
{
    for (int i = 0; i < MATRIX_N; i++)
        for (int j = 0; j < MATRIX_N; j++) {
            int64_t sum = 0;
            for (int k = 0; k < MATRIX_N; k++)
                sum += a[i][k] * b[k][j];
            c[i][j] = sum;
        }
    uint64_t trace = 0;
    for (int i = 0; i < MATRIX_N; i++)
        trace += (uint64_t)c[i][i];
    return trace;
}

/* Freivalds-style check: c * x == a * (b * x) for x = (1, 2, 3, ...). */
static int matrix_product_is_consistent(void)
{
    int64_t bx[MATRIX_N], abx, cx;
    for (int i = 0; i < MATRIX_N; i++) {
        bx[i] = 0;
        for (int k = 0; k < MATRIX_N; k++)
            bx[i] += matrix_b[i][k] * (k + 1);
    }
    for (int i = 0; i < MATRIX_N; i++) {
        abx = 0;
        cx = 0;
        for (int k = 0; k < MATRIX_N; k++) {
            abx += matrix_a[i][k] * bx[k];
            cx += matrix_c[i][k] * (k + 1);
        }
        if (abx != cx)
            return 0;
    }
    return 1;
}

/* Number of primes <= limit by trial division (only for the small self-check). */
static uint32_t count_primes_slowly(uint32_t limit)
{
    uint32_t count = 0;
    for (uint32_t n = 2; n <= limit; n++) {
        int prime = 1;
        for (uint32_t d = 2; d * d <= n; d++)
            if (n % d == 0) {
                prime = 0;
                break;
            }
        count += (uint32_t)prime;
    }
    return count;
}

static void check(struct workload *w, int ok, const char *what)
{
    if (!ok) {
        printf("demo: self-check failed: %s\n", what);
        w->failures++;
    }
}

NOINLINE long run_workload(void *arg)
{
    struct workload *w = arg;
    uint64_t start = rdtsc();
    printf("demo: running workload at CPL%u: %lu iteration(s), primes up to %lu\n", current_cpl(), w->iterations,
           w->prime_limit);
    check(w, crc32((const uint8_t *)"123456789", 9) == 0xcbf43926u, "crc32 check value");
    check(w, compute_primes(1000) == count_primes_slowly(1000), "prime sieve vs trial division");
    for (int i = 0; i < MATRIX_N; i++)
        for (int j = 0; j < MATRIX_N; j++) {
            matrix_a[i][j] = (i * 7 + j * 3) % 11 - 5;
            matrix_b[i][j] = (i * 5 + j * 13) % 17 - 8;
        }
    uint32_t first_checksum = 0;
    for (uint64_t iteration = 0; iteration < w->iterations; iteration++) {
        mark_phase(1);
        w->prime_count = compute_primes((uint32_t)w->prime_limit);
        outl(DEMO_SCRATCH_PORT, w->prime_count);
        mark_phase(2);
        w->checksum = checksum_buffer(checksum_data, sizeof(checksum_data), 0x2545f491u);
        outl(DEMO_SCRATCH_PORT, w->checksum);
        if (iteration == 0)
            first_checksum = w->checksum;
        check(w, w->checksum == first_checksum, "checksum differs between iterations");
        mark_phase(3);
        w->matrix_trace = matrix_multiply(matrix_a, matrix_b, matrix_c);
        outl(DEMO_SCRATCH_PORT, (uint32_t)w->matrix_trace);
        if (!w->quiet)
            printf("demo: iteration %lu: primes=%u crc32=0x%08x trace=%ld\n", iteration + 1, w->prime_count,
                   w->checksum, (int64_t)w->matrix_trace);
    }
    check(w, matrix_product_is_consistent(), "matrix product");
    w->mmio_value = *(volatile uint32_t *)DEMO_MMIO_BASE;
    w->cycles = rdtsc() - start;
    printf("demo: result: primes(%lu)=%u crc32=0x%08x trace=%ld mmio[0xD0000000]=0x%08x\n", w->prime_limit,
           w->prime_count, w->checksum, (int64_t)w->matrix_trace, w->mmio_value);
    printf("demo: workload took %lu TSC cycles; %d self-check failure(s)\n", w->cycles, w->failures);
    return w->failures;
}

static void print_hypervisor(void)
{
    struct cpuid_result leaf1 = cpuid(1, 0);
    if (!(leaf1.ecx & (1u << 31))) {
        printf("hypervisor: none reported (CPUID.1:ECX.HV = 0)\n");
        return;
    }
    struct cpuid_result base = cpuid(0x40000000, 0);
    char signature[13];
    memcpy(signature + 0, &base.ebx, 4);
    memcpy(signature + 4, &base.ecx, 4);
    memcpy(signature + 8, &base.edx, 4);
    signature[12] = '\0';
    for (int i = 0; i < 12; i++)
        if (signature[i] && (signature[i] < ' ' || signature[i] > '~'))
            signature[i] = '?';
    printf("hypervisor: \"%s\" (CPUID 0x40000000, max leaf 0x%x)\n", signature, base.eax);
}

int guest_main(const char *cmdline)
{
    struct workload w = {
        .iterations = option_u64(cmdline, "iterations", 5),
        .prime_limit = option_u64(cmdline, "primes", 100000),
        .quiet = option_flag(cmdline, "quiet", 0),
    };
    if (w.prime_limit > MAX_PRIME_LIMIT)
        w.prime_limit = MAX_PRIME_LIMIT;

    printf("vmscope demo guest\n");
    print_hypervisor();
    printf("command line: \"%s\"\n", cmdline);
    uint32_t entries;
    const struct hvm_memmap_table_entry *map = start_info_memmap(&entries);
    uint64_t ram = 0;
    for (uint32_t i = 0; i < entries; i++)
        if (map[i].type == 1)
            ram += map[i].size;
    printf("memory map: %u entries, %lu KiB RAM\n", entries, ram >> 10);

    long failures = run_in_user_mode(run_workload, &w);
    printf(failures ? "demo: FAILED\n" : "demo: OK\n");
    if (failures)
        return DEMO_EXIT_SELF_CHECK_FAILED;
    acpi_power_off();
}
