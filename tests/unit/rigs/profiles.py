"""``build_profile``: the synthetic profile the profiler tests share. Every number in it is chosen here, so
the tests can derive expected report values from these constants.
"""

from __future__ import annotations

from vmscope.profiler.model import Profile, ProfileMetadata, Sample, Span
from vmscope.symbols import SymbolEntry, SymbolTable

# guest image: a 4 KiB code range with four functions (sizes known) and an unnamed tail
IMAGE_START, IMAGE_END = 0x1000, 0x2000


MAIN, COMPUTE, SERIAL_PUTC, IDLE = 0x1000, 0x1100, 0x1200, 0x1300


UNNAMED_IN_IMAGE = 0x1F00  # inside the image range, no symbol -> "guest.elf+0xf00"


UNKNOWN = 0x5000  # outside every module -> "0x5000"


# kernel: kallsyms-style symbols without sizes
DO_SYSCALL = 0xFFFF_FFFF_8100_0000


HANDLE_IRQ = 0xFFFF_FFFF_8100_0400


# (vcpu, cpl, leaf-first stack, repeat) of timer samples
TIMER_SAMPLES = [
    (0, 0, (COMPUTE + 0x10, MAIN + 0x20), 6),
    (0, 0, (SERIAL_PUTC + 0x4, MAIN + 0x30), 2),
    (0, 0, (UNKNOWN, MAIN + 0x40), 1),
    (0, 0, (UNNAMED_IN_IMAGE,), 1),
    (1, 0, (IDLE + 0x8,), 3),
    (1, 0, (DO_SYSCALL + 0x10,), 1),
]


# (vcpu, reason, detail, leaf-first stack, repeat) of exit samples
EXIT_SAMPLES = [
    (0, "IO", "port 0x3f8 out", (SERIAL_PUTC + 0x10, MAIN + 0x30), 4),
    (0, "IO", "port 0x3f8 out", (COMPUTE + 0x20, MAIN + 0x20), 1),
    (1, "HLT", "", (IDLE + 0x10,), 2),
]


# (vcpu, reason, detail, device, count, ns per exit) of recorded exits
EXITS = [
    (0, "IO", "port 0x3f8 out", "serial0", 100, 2_000),
    (1, "HLT", "", None, 10, 50_000),
    (0, "MMIO", "mmio 0xd0000000 read", None, 5, 10_000),
    (1, "IO", "port 0x80 out", "port80", 20, 1_000),
]


SPANS = [
    ("vcpu0", "guest", 0, 1_000),
    ("vcpu0", "exit:IO port 0x3f8 out", 1_000, 3_000),
    ("vcpu0", "guest", 3_000, 10_000),
    ("vcpu1", "guest", 0, 5_000),
    ("vcpu1", "exit:HLT", 5_000, 55_000),
    ("io:virtio-blk0", "io:request", 2_000, 8_000),
]


def build_profile(scale: dict[str, int] | None = None) -> Profile:
    """The shared synthetic profile; ``scale`` multiplies the repeat count of timer stacks by leaf name."""
    scale = scale or {}
    profile = Profile(
        metadata=ProfileMetadata(
            guest_image="/images/guest.elf",
            guest_kind="elf",
            command_line=["vmscope", "record", "--elf", "/images/guest.elf"],
            cpus=2,
            kvm_backend="kvm_intel",
            start_time_ns=1_700_000_000_000_000_000,
            duration_ns=60_000,
            sample_frequency_hz=1000.0,
        )
    )
    profile.symbol_tables.append(
        SymbolTable(
            module="guest.elf",
            path="/images/guest.elf",
            kind="elf",
            start=IMAGE_START,
            end=IMAGE_END,
            symbols=[
                SymbolEntry("main", MAIN, 0x100),
                SymbolEntry("compute", COMPUTE, 0x100),
                SymbolEntry("serial_putc", SERIAL_PUTC, 0x80),
                SymbolEntry("idle", IDLE, 0x40),
            ],
        )
    )
    profile.symbol_tables.append(
        SymbolTable(
            module="kernel",
            kind="kallsyms",
            symbols=[SymbolEntry("do_syscall_64", DO_SYSCALL), SymbolEntry("handle_irq", HANDLE_IRQ)],
        )
    )
    time_ns = 0
    names = {COMPUTE: "compute", SERIAL_PUTC: "serial_putc", IDLE: "idle"}
    for vcpu, cpl, stack, repeat in TIMER_SAMPLES:
        leaf_name = next((n for start, n in names.items() if start <= stack[0] < start + 0x80), "")
        for _ in range(repeat * scale.get(leaf_name, 1)):
            time_ns += 1_000
            profile.samples.append(Sample(vcpu, time_ns, stack[0], cpl, 0x1000, stack))
    for vcpu, reason, detail, stack, repeat in EXIT_SAMPLES:
        for _ in range(repeat):
            time_ns += 1_000
            profile.samples.append(
                Sample(
                    vcpu, time_ns, stack[0], 0, 0x1000, stack, "exit", exit_reason=reason, exit_detail=detail
                )
            )
    for vcpu, reason, detail, device, count, ns in EXITS:
        stat = profile.exit_stat(vcpu, reason, detail, device)
        for _ in range(count):
            stat.record(ns)
    for vcpu in (0, 1):
        for ns in range(1_000, 11_000, 1_000):
            profile.guest_time_histogram(vcpu).record(ns)
    for track, name, start, end in SPANS:
        profile.spans.append(Span(track, name, start, end, {"note": "x"} if name == "io:request" else None))
    profile.record_unclaimed("pio", 0x61, 1, False)
    profile.record_unclaimed("pio", 0x61, 1, False)
    profile.record_unclaimed("mmio", 0xFED00000, 4, True)
    profile.kvm_stats["vm"] = {"remote_tlb_flush": 3, "pages_4k": 1024}
    profile.kvm_stats["vcpu0"] = {"exits": 105, "halt_poll_success_ns": [1, 2, 3]}
    profile.kvm_stats["vcpu1"] = {"exits": 30}
    return profile
