/*
 * Stack canary cost workload: one source, built with -fno-stack-protector,
 * -fstack-protector-strong, -fstack-protector-all and -fcf-protection=return (see
 * vmscope.guest.stack_protector). At CPL3 (native speed even on software-virtualization hosts)
 * it calls, `calls` times each and in turns:
 *   byte_array   a short function with a local char array (protected by -strong and -all)
 *   word_array   a short function with a local uint32_t array (protected by -strong and -all)
 *   no_array     the control: the same kind of arithmetic on scalars only (protected by -all only)
 * and prints, per function, the TSC cycles of all rounds and of its fastest round (the least
 * disturbed by other work on the host): "phase <name>: <cycles> cycles <calls> calls <best> best".
 * Options: calls=N per function per round (default 200000), rounds=N (default 20).
 */
#include "vmscope_guest.h"

#define NOINLINE __attribute__((noinline))

/* Short functions, called with independent arguments so the calls overlap in the CPU and the
 * extra canary instructions (load the guard, store it, load and compare it back, branch) cost
 * throughput instead of hiding behind a dependency chain. The asm makes each array's contents
 * observable, so the compiler must keep the array in the stack frame. */
NOINLINE uint64_t byte_array(uint64_t seed)
{
    char buffer[16];
    __builtin_memcpy(buffer, &seed, 8);
    __builtin_memcpy(buffer + 8, &seed, 8);
    __asm__ volatile("" : : "r"(buffer) : "memory");
    return (uint64_t)(uint8_t)buffer[seed & 15] + seed;
}

NOINLINE uint64_t word_array(uint64_t seed)
{
    uint64_t words[2] = {seed, seed * 3};
    __asm__ volatile("" : : "r"(words) : "memory");
    return words[seed & 1] + 1;
}

NOINLINE uint64_t no_array(uint64_t seed)
{
    uint64_t first = seed, second = seed * 3;
    __asm__ volatile("" : "+r"(first), "+r"(second));
    return ((seed & 1) ? second : first) + 1;
}

struct job {
    uint64_t calls;
    uint64_t rounds;
    uint64_t sink;
};

/* Each phase is a function of its own so the profile attributes the loop to it too. */
NOINLINE uint64_t run_byte_array(uint64_t calls, uint64_t seed)
{
    for (uint64_t i = 0; i < calls; i++)
        seed ^= byte_array(i);
    return seed;
}

NOINLINE uint64_t run_word_array(uint64_t calls, uint64_t seed)
{
    for (uint64_t i = 0; i < calls; i++)
        seed ^= word_array(i);
    return seed;
}

NOINLINE uint64_t run_no_array(uint64_t calls, uint64_t seed)
{
    for (uint64_t i = 0; i < calls; i++)
        seed ^= no_array(i);
    return seed;
}

static long user_main(void *arg)
{
    struct job *job = arg;
    uint64_t cycles[3] = {0, 0, 0};
    uint64_t best[3] = {~0ull, ~0ull, ~0ull};
    for (uint64_t round = 0; round < job->rounds; round++) {
        uint64_t t0 = rdtsc();
        job->sink = run_byte_array(job->calls, job->sink);
        uint64_t t1 = rdtsc();
        job->sink = run_word_array(job->calls, job->sink);
        uint64_t t2 = rdtsc();
        job->sink = run_no_array(job->calls, job->sink);
        uint64_t t3 = rdtsc();
        uint64_t spent[3] = {t1 - t0, t2 - t1, t3 - t2};
        for (int i = 0; i < 3; i++) {
            cycles[i] += spent[i];
            if (spent[i] < best[i])
                best[i] = spent[i];
        }
    }
    static const char *const names[3] = {"byte_array", "word_array", "no_array"};
    for (int i = 0; i < 3; i++)
        printf("phase %s: %llu cycles %llu calls %llu best\n", names[i], (unsigned long long)cycles[i],
               (unsigned long long)(job->calls * job->rounds), (unsigned long long)best[i]);
    printf("sink %llx\n", (unsigned long long)job->sink);
    debug_exit(0x10);
    return 0;
}

int guest_main(const char *cmdline)
{
    static struct job job;
    job.calls = option_u64(cmdline, "calls", 200000);
    job.rounds = option_u64(cmdline, "rounds", 20);
    job.sink = 1;
    return (int)run_in_user_mode(user_main, &job);
}
