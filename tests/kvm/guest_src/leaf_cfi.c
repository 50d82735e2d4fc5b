/*
 * Frameless-leaf profiling guest. At CPL3, mix() calls hot_path() and cold_path(); both call the
 * leaf spin(), hot_path with three times the iterations, so 3/4 of the time is hot_path;spin. The
 * leaf is built without a frame (-momit-leaf-frame-pointer): a frame-pointer unwinder loses its
 * caller, DWARF CFI (.debug_frame, -g) says where the return address is.
 * Options: rounds=N (default 40), unit=N loop iterations.
 */
#include "vmscope_guest.h"

#define NOINLINE __attribute__((noinline))

struct job {
    uint64_t rounds;
    uint64_t unit;
    uint64_t sink;
};

NOINLINE uint64_t spin(uint64_t iterations, uint64_t seed)
{
    for (uint64_t i = 0; i < iterations; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        __asm__ volatile("" : "+r"(seed));
    }
    return seed;
}

NOINLINE uint64_t hot_path(uint64_t unit, uint64_t seed) { return spin(3 * unit, seed) + 1; }
NOINLINE uint64_t cold_path(uint64_t unit, uint64_t seed) { return spin(unit, seed) + 1; }

NOINLINE void mix(struct job *job)
{
    for (uint64_t round = 0; round < job->rounds; round++) {
        job->sink = hot_path(job->unit, job->sink);
        job->sink = cold_path(job->unit, job->sink);
    }
}

static long user_main(void *arg)
{
    mix(arg);
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
