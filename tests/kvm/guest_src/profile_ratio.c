/*
 * Profiling accuracy guest. At CPL3 it spends its time in two functions with the same loop
 * body, spin_heavy doing three times the iterations of spin_light (so a 3:1 split of CPU time),
 * both called from split_work. It also makes a known number of exits from known functions:
 * port_writer does PORT_WRITES `out`s to port 0x510 and mmio_writer MMIO_WRITES stores to the
 * unclaimed MMIO address 0xD0000000. Options: rounds=N (default 40), unit=N loop iterations.
 */
#include "vmscope_guest.h"

#define NOINLINE __attribute__((noinline))
#define PORT_WRITES 123
#define MMIO_WRITES 45

struct job {
    uint64_t rounds;
    uint64_t unit;
    uint64_t sink;
};

/* Called now and then so spin() is not a leaf: GCC 12 sets up no frame pointer in a leaf
 * function that needs no stack, even with -mno-omit-leaf-frame-pointer, and a frame-pointer
 * unwinder then skips the leaf's caller. */
NOINLINE void checkpoint(uint64_t value) { __asm__ volatile("" : : "r"(value)); }

static NOINLINE uint64_t spin(uint64_t iterations, uint64_t seed)
{
    for (uint64_t i = 0; i < iterations; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        __asm__ volatile("" : "+r"(seed));
        if ((i & 0xFFFFF) == 0)
            checkpoint(seed);
    }
    return seed;
}

NOINLINE uint64_t spin_heavy(uint64_t unit, uint64_t seed) { return spin(3 * unit, seed); }
NOINLINE uint64_t spin_light(uint64_t unit, uint64_t seed) { return spin(unit, seed); }

NOINLINE void split_work(struct job *job)
{
    for (uint64_t round = 0; round < job->rounds; round++) {
        job->sink = spin_heavy(job->unit, job->sink);
        job->sink = spin_light(job->unit, job->sink);
    }
}

NOINLINE void port_writer(void)
{
    for (int i = 0; i < PORT_WRITES; i++)
        outb(0x510, (uint8_t)i);
}

NOINLINE void mmio_writer(void)
{
    volatile uint32_t *mmio = (volatile uint32_t *)0xD0000000ul;
    for (int i = 0; i < MMIO_WRITES; i++)
        *mmio = (uint32_t)i;
}

static long user_main(void *arg)
{
    struct job *job = arg;
    port_writer();
    mmio_writer();
    split_work(job);
    debug_exit(0x10);
    return 0;
}

int guest_main(const char *cmdline)
{
    static struct job job;
    job.rounds = option_u64(cmdline, "rounds", 40);
    job.unit = option_u64(cmdline, "unit", 2000000);
    job.sink = 1;
    return (int)run_in_user_mode(user_main, &job);
}
