/*
 * Fallback-emulator test guest: executes, at CPL0, instructions a software-virtualization KVM
 * (kvm_pvm) cannot emulate, and checks each result the way the architecture defines it.
 *
 * Command line:
 *   only=NAME    run just the check called NAME (default: every check, in table order)
 *   clac=N       then execute N clac instructions in a loop (cost measurement)
 *   outs=N       then execute N writes to the scratch port (a plain exit, the reference)
 * Serial: "emulate: NAME ok" or "emulate: NAME FAILED ..." per check, then
 *   "emulate: verdict PASS" or "emulate: verdict FAIL (N failed)".
 * Exit: 0x10 -> status 33 when every check passed; 0x11 -> status 35 when one failed;
 *       0x12 -> status 37 for an unknown only=NAME.
 */
#include "vmscope_guest.h"

#define EXIT_OK 0x10
#define EXIT_FAILED 0x11
#define EXIT_BAD_OPTION 0x12
#define RFLAGS_CF (1ul << 0)
#define RFLAGS_PF (1ul << 2)
#define RFLAGS_ZF (1ul << 6)
#define RFLAGS_SF (1ul << 7)
#define RFLAGS_OF (1ul << 11)
#define RFLAGS_AC (1ul << 18)
#define ARITH_FLAGS (RFLAGS_CF | RFLAGS_PF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF)

static int failures;

static int expect(const char *name, const char *what, uint64_t got, uint64_t want)
{
    if (got == want)
        return 1;
    printf("emulate: %s FAILED %s: got 0x%lx want 0x%lx\n", name, what, got, want);
    failures++;
    return 0;
}

static uint64_t read_flags(void)
{
    uint64_t flags;
    __asm__ volatile("pushfq; popq %0" : "=r"(flags));
    return flags;
}

/* ---- int3: a #BP handler of our own that counts hits and records the pushed rip ---- */
extern char breakpoint_stub[];
volatile uint64_t breakpoint_hits;
volatile uint64_t breakpoint_rip;
__asm__(".text\n.globl breakpoint_stub\nbreakpoint_stub:\n"
        "  lock incq breakpoint_hits(%rip)\n"
        "  pushq %rax\n"
        "  movq 8(%rsp), %rax\n"
        "  movq %rax, breakpoint_rip(%rip)\n"
        "  popq %rax\n"
        "  iretq\n");

static void install_breakpoint_gate(void)
{
    struct __attribute__((packed)) {
        uint16_t limit;
        uint64_t base;
    } idtr;
    __asm__ volatile("sidt %0" : "=m"(idtr));
    uint8_t *gate = (uint8_t *)(uintptr_t)(idtr.base + 16 * 3);
    uint64_t address = (uint64_t)breakpoint_stub;
    *(uint16_t *)gate = (uint16_t)address;
    *(uint16_t *)(gate + 6) = (uint16_t)(address >> 16);
    *(uint32_t *)(gate + 8) = (uint32_t)(address >> 32);
}

static void check_int3(const char *name)
{
    uint64_t after;
    breakpoint_hits = 0;
    __asm__ volatile("int3\n1: leaq 1b(%%rip), %0" : "=r"(after)::"memory");
    expect(name, "hits", breakpoint_hits, 1);
    expect(name, "pushed rip", breakpoint_rip, after);
}

/* ---- bit counting ---- */
static void check_popcnt(const char *name)
{
    uint64_t value = 0xF0F0000000000101ul, result, flags;
    __asm__ volatile("popcnt %2, %0; pushfq; popq %1" : "=r"(result), "=r"(flags) : "r"(value) : "cc");
    expect(name, "count", result, 10);
    expect(name, "flags", flags & ARITH_FLAGS, 0);
    uint32_t memory_value = 0, count32;
    __asm__ volatile("popcnt %2, %0; pushfq; popq %1" : "=r"(count32), "=r"(flags) : "m"(memory_value) : "cc");
    expect(name, "count of zero", count32, 0);
    expect(name, "flags of zero", flags & ARITH_FLAGS, RFLAGS_ZF);
}

static void check_lzcnt_tzcnt(const char *name)
{
    uint64_t result, flags;
    __asm__ volatile("lzcnt %2, %0; pushfq; popq %1" : "=r"(result), "=r"(flags) : "r"(0x0000100000000000ul) : "cc");
    expect(name, "lzcnt", result, 19);
    expect(name, "lzcnt flags", flags & (RFLAGS_CF | RFLAGS_ZF), 0);
    uint32_t zero = 0, r32;
    __asm__ volatile("tzcnt %2, %0; pushfq; popq %1" : "=r"(r32), "=r"(flags) : "m"(zero) : "cc");
    expect(name, "tzcnt of zero", r32, 32);
    expect(name, "tzcnt flags", flags & RFLAGS_CF, RFLAGS_CF);
}

static void check_bsf_bsr(const char *name)
{
    uint64_t result = 0x1234, flags;
    __asm__ volatile("bsr %2, %0; pushfq; popq %1" : "+r"(result), "=r"(flags) : "r"(0x0400000000000010ul) : "cc");
    expect(name, "bsr", result, 58);
    expect(name, "bsr ZF", flags & RFLAGS_ZF, 0);
    result = 0x1234;
    __asm__ volatile("bsf %2, %0; pushfq; popq %1" : "+r"(result), "=r"(flags) : "r"(0ul) : "cc");
    expect(name, "bsf of zero keeps destination", result, 0x1234);
    expect(name, "bsf of zero ZF", flags & RFLAGS_ZF, RFLAGS_ZF);
}

/* ---- flags and waits ---- */
static void check_clac_stac(const char *name)
{
    __asm__ volatile("stac" ::: "cc");
    expect(name, "AC after stac", read_flags() & RFLAGS_AC, RFLAGS_AC);
    __asm__ volatile("clac" ::: "cc");
    expect(name, "AC after clac", read_flags() & RFLAGS_AC, 0);
}

static void check_fwait(const char *name)
{
    uint64_t marker = 0;
    __asm__ volatile("fwait; movq $7, %0" : "=r"(marker));
    expect(name, "continues", marker, 7);
}

/* ---- SSE control and data ---- */
static void enable_sse_and_xsave(void)
{
    uint64_t cr0, cr4;
    __asm__ volatile("movq %%cr0, %0" : "=r"(cr0));
    cr0 = (cr0 & ~(1ul << 2)) | (1ul << 1); /* EM off, MP on */
    __asm__ volatile("movq %0, %%cr0" ::"r"(cr0));
    __asm__ volatile("movq %%cr4, %0" : "=r"(cr4));
    cr4 |= (1ul << 9) | (1ul << 10); /* OSFXSR, OSXMMEXCPT */
    int has_xsave = (cpuid(1, 0).ecx >> 26) & 1;
    if (has_xsave)
        cr4 |= 1ul << 18; /* OSXSAVE */
    __asm__ volatile("movq %0, %%cr4" ::"r"(cr4));
    if (has_xsave) /* XCR0 = x87 | SSE, as an OS does before it uses XSAVE for SSE state */
        __asm__ volatile("xsetbv" ::"a"(3u), "d"(0u), "c"(0u));
}

static void check_mxcsr(const char *name)
{
    uint32_t in = 0x1F80 | (1u << 15) /* FTZ */, out = 0;
    __asm__ volatile("ldmxcsr %0" ::"m"(in));
    __asm__ volatile("stmxcsr %0" : "=m"(out));
    expect(name, "mxcsr", out, in);
    in = 0x1F80;
    __asm__ volatile("ldmxcsr %0" ::"m"(in));
}

static void check_simd_moves(const char *name)
{
    uint32_t source = 0x11223344, lanes[4] __attribute__((aligned(16))) = {1, 2, 3, 4};
    uint32_t out[4] __attribute__((aligned(16)));
    uint64_t low;
    __asm__ volatile("movd %1, %%xmm15\n"
                     "movq %%xmm15, %0\n"
                     : "=r"(low)
                     : "r"(source));
    expect(name, "movd/movq round trip", low, source);
    __asm__ volatile("movdqa %1, %%xmm14\n"
                     "pshufd $0x1b, %%xmm14, %%xmm13\n"
                     "paddd %%xmm14, %%xmm13\n"
                     "movdqu %%xmm13, %0\n"
                     : "=m"(out)
                     : "m"(lanes));
    expect(name, "pshufd+paddd lane 0", out[0], 5);
    expect(name, "pshufd+paddd lane 3", out[3], 5);
    __asm__ volatile("pxor %%xmm13, %%xmm13\nmovdqu %%xmm13, %0" : "=m"(out));
    expect(name, "pxor", out[0] | out[1] | out[2] | out[3], 0);
}

/* ---- compare and exchange ---- */
static void check_cmpxchg16b(const char *name)
{
    uint64_t target[2] __attribute__((aligned(16))) = {1, 2};
    uint64_t lo = 1, hi = 2, new_lo = 0xAA, new_hi = 0xBB;
    uint8_t equal;
    __asm__ volatile("lock cmpxchg16b %1; sete %0"
                     : "=q"(equal), "+m"(*(__int128 *)target), "+a"(lo), "+d"(hi)
                     : "b"(new_lo), "c"(new_hi)
                     : "cc", "memory");
    expect(name, "equal", equal, 1);
    expect(name, "stored low", target[0], 0xAA);
    expect(name, "stored high", target[1], 0xBB);
    lo = 5;
    __asm__ volatile("lock cmpxchg16b %1; sete %0"
                     : "=q"(equal), "+m"(*(__int128 *)target), "+a"(lo), "+d"(hi)
                     : "b"(new_lo), "c"(new_hi)
                     : "cc", "memory");
    expect(name, "not equal", equal, 0);
    expect(name, "loaded low", lo, 0xAA);
    expect(name, "loaded high", hi, 0xBB);
}

static void check_cmpxchg8b(const char *name)
{
    uint64_t target = 0x0000000200000001ul;
    uint32_t lo = 1, hi = 2;
    uint8_t equal;
    __asm__ volatile("lock cmpxchg8b %1; sete %0"
                     : "=q"(equal), "+m"(target), "+a"(lo), "+d"(hi)
                     : "b"(0x33u), "c"(0x44u)
                     : "cc", "memory");
    expect(name, "equal", equal, 1);
    expect(name, "stored", target, 0x0000004400000033ul);
}

/* ---- XSAVE family ---- */
static uint8_t xsave_area[4096] __attribute__((aligned(64)));
static uint8_t fx_area[512] __attribute__((aligned(16)));

static void check_xgetbv(const char *name)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    expect(name, "xcr0 is x87|SSE (set at start)", lo & 3, 3);
    __asm__ volatile("xsetbv" ::"a"(1u), "d"(0u), "c"(0));
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    expect(name, "xcr0 after xsetbv 1", lo, 1);
    __asm__ volatile("xsetbv" ::"a"(3u), "d"(0u), "c"(0));
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    expect(name, "xcr0 after xsetbv 3", lo, 3);
}

static void check_xsave_xrstor(const char *name)
{
    uint32_t lanes[4] __attribute__((aligned(16))) = {0xdead, 0xbeef, 0xcafe, 0xf00d}, out[4];
    memset(xsave_area, 0, sizeof(xsave_area));
    __asm__ volatile("movdqu %0, %%xmm12" ::"m"(lanes));
    __asm__ volatile("xsave %0" : "+m"(xsave_area) : "a"(3), "d"(0) : "memory");
    expect(name, "xmm12 in the image", *(uint32_t *)(xsave_area + 160 + 12 * 16), 0xdead);
    expect(name, "xstate_bv has SSE", xsave_area[512] & 2, 2);
    __asm__ volatile("pxor %%xmm12, %%xmm12" ::);
    __asm__ volatile("xrstor %0" ::"m"(xsave_area), "a"(3), "d"(0) : "memory");
    __asm__ volatile("movdqu %%xmm12, %0" : "=m"(out));
    expect(name, "xmm12 restored", out[3], 0xf00d);
    __asm__ volatile("xsaveopt %0" : "+m"(xsave_area) : "a"(3), "d"(0) : "memory");
    expect(name, "xsaveopt keeps xmm12", *(uint32_t *)(xsave_area + 160 + 12 * 16 + 4), 0xbeef);
}

static void check_xsavec(const char *name)
{
    memset(xsave_area, 0, sizeof(xsave_area));
    __asm__ volatile("xsavec %0" : "+m"(xsave_area) : "a"(3), "d"(0) : "memory");
    uint64_t xcomp_bv = *(uint64_t *)(xsave_area + 520);
    expect(name, "compacted bit", xcomp_bv >> 63, 1);
}

static void check_fxsave(const char *name)
{
    uint32_t lanes[4] __attribute__((aligned(16))) = {7, 8, 9, 10}, out[4];
    __asm__ volatile("movdqu %0, %%xmm3" ::"m"(lanes));
    __asm__ volatile("fxsave64 %0" : "=m"(fx_area));
    expect(name, "xmm3 in the image", *(uint32_t *)(fx_area + 160 + 3 * 16 + 8), 9);
    expect(name, "mxcsr in the image", *(uint32_t *)(fx_area + 24), 0x1F80);
    __asm__ volatile("pxor %%xmm3, %%xmm3" ::);
    __asm__ volatile("fxrstor64 %0" ::"m"(fx_area));
    __asm__ volatile("movdqu %%xmm3, %0" : "=m"(out));
    expect(name, "xmm3 restored", out[1], 8);
}

static void check_rdrand(const char *name)
{
    uint64_t a = 0, b = 0;
    uint8_t ok_a, ok_b;
    __asm__ volatile("rdrand %0; setc %1" : "=r"(a), "=q"(ok_a)::"cc");
    __asm__ volatile("rdseed %0; setc %1" : "=r"(b), "=q"(ok_b)::"cc");
    expect(name, "rdrand CF", ok_a, 1);
    expect(name, "rdseed CF", ok_b, 1);
    expect(name, "two random values differ", a != b, 1);
}

struct check {
    const char *name;
    void (*run)(const char *name);
    /* 0: only with only=NAME. kvm_pvm's emulator runs lzcnt/tzcnt at CPL0 as bsr/bsf (the F3
     * prefix ignored: wrong results, no emulation failure), so that check fails there whatever
     * vmscope does. */
    int by_default;
};

static const struct check checks[] = {
    {"int3", check_int3, 1},
    {"popcnt", check_popcnt, 1},
    {"lzcnt_tzcnt", check_lzcnt_tzcnt, 0},
    {"bsf_bsr", check_bsf_bsr, 1},
    {"clac_stac", check_clac_stac, 1},
    {"fwait", check_fwait, 1},
    {"mxcsr", check_mxcsr, 1},
    {"simd_moves", check_simd_moves, 1},
    {"cmpxchg8b", check_cmpxchg8b, 1},
    {"cmpxchg16b", check_cmpxchg16b, 1},
    {"xgetbv", check_xgetbv, 1},
    {"xsave_xrstor", check_xsave_xrstor, 1},
    {"xsavec", check_xsavec, 1},
    {"fxsave", check_fxsave, 1},
    {"rdrand", check_rdrand, 1},
};

int guest_main(const char *cmdline)
{
    const char *only = NULL;
    size_t only_len = 0;
    int selected = option_find(cmdline, "only", &only, &only_len);
    int ran = 0;
    install_breakpoint_gate();
    enable_sse_and_xsave();
    for (size_t i = 0; i < sizeof(checks) / sizeof(checks[0]); i++) {
        const char *name = checks[i].name;
        if (selected ? strlen(name) != only_len || strncmp(name, only, only_len) != 0 : !checks[i].by_default)
            continue;
        int before = failures;
        checks[i].run(name);
        if (failures == before)
            printf("emulate: %s ok\n", name);
        ran++;
    }
    if (selected && ran == 0) {
        printf("emulate: no check called %.*s\n", (int)only_len, only);
        return EXIT_BAD_OPTION;
    }
    uint64_t clacs = option_u64(cmdline, "clac", 0), outs = option_u64(cmdline, "outs", 0);
    for (uint64_t i = 0; i < clacs; i++)
        __asm__ volatile("clac" ::: "cc");
    for (uint64_t i = 0; i < outs; i++)
        outb(SCRATCH_PORT, 0);
    if (failures) {
        printf("emulate: verdict FAIL (%d failed)\n", failures);
        return EXIT_FAILED;
    }
    printf("emulate: verdict PASS\n");
    return EXIT_OK;
}
