"""Who was running: the current-task pointer from kallsyms + BTF, task_struct fields read from a fake
guest memory, the GS-base cache and its MSR fallback, hostile values ending the lookup."""

from __future__ import annotations

import pytest

from tests.unit.btf_blob import kernel_types
from tests.unit.kernel_tables import build_kallsyms
from vmscope.errors import KernelTableError
from vmscope.profiler.kernel.btf import parse_btf
from vmscope.profiler.kernel.kallsyms import parse_kallsyms
from vmscope.profiler.kernel.per_vcpu import VcpuKernelState
from vmscope.profiler.kernel.tasks import TaskLayout, TaskNamer
from vmscope.profiler.model import TaskInfo

PERCPU_BASE = 0xFFFF_8880_1F00_0000
CURRENT_TASK = 0x1FB80
TASK = 0xFFFF_8880_0300_0000


class FakeMemory:
    """Sparse guest-virtual memory: 8-byte words read little-endian from written bytes."""

    def __init__(self) -> None:
        self.bytes: dict[int, int] = {}
        self.reads = 0

    def write(self, address: int, data: bytes) -> None:
        for i, byte in enumerate(data):
            self.bytes[address + i] = byte

    def word(self, address: int, value: int) -> None:
        self.write(address, value.to_bytes(8, "little"))

    def read(self, address: int) -> int | None:
        self.reads += 1
        if any(address + i not in self.bytes for i in range(8)):
            return None
        return int.from_bytes(bytes(self.bytes[address + i] for i in range(8)), "little")


def symbols(*extra: tuple[str, str, int]) -> list[tuple[str, str, int]]:
    base = 0xFFFF_FFFF_8100_0000
    code = [(f"func_{i}", "T", base + 0x100 * i) for i in range(40)]
    return sorted([*extra, *code], key=lambda s: s[2])


def layout(pcpu_hot: bool = False) -> TaskLayout:
    percpu = ("pcpu_hot", "D", 0x2000) if pcpu_hot else ("current_task", "D", CURRENT_TASK)
    kallsyms = parse_kallsyms(build_kallsyms(symbols(percpu)))
    return TaskLayout.from_kernel(kallsyms, parse_btf(kernel_types(pcpu_hot=pcpu_hot)[0]))


def put_task(memory: FakeMemory, task: int, comm: bytes, pid: int, tgid: int) -> None:
    memory.write(task + 2976, comm.ljust(16, b"\0")[:16])
    memory.write(task + 2416, pid.to_bytes(4, "little") + tgid.to_bytes(4, "little"))


def test_layout_from_current_task_and_from_pcpu_hot() -> None:
    old = layout()
    assert (old.current_task_offset, old.comm, old.comm_size, old.pid, old.tgid) == (
        CURRENT_TASK, 2976, 16, 2416, 2420,
    )  # fmt: skip
    assert layout(pcpu_hot=True).current_task_offset == 0x2000 + 8  # pcpu_hot.current_task


def test_layout_needs_a_current_task_symbol() -> None:
    kallsyms = parse_kallsyms(build_kallsyms(symbols()))
    with pytest.raises(KernelTableError, match="neither current_task nor pcpu_hot"):
        TaskLayout.from_kernel(kallsyms, parse_btf(kernel_types()[0]))


def test_names_idle_kthread_and_user_threads() -> None:
    memory = FakeMemory()
    namer = TaskNamer(layout())
    memory.word(PERCPU_BASE + CURRENT_TASK, TASK)
    put_task(memory, TASK, b"swapper/0", 0, 0)
    assert namer.current(memory.read, PERCPU_BASE) == TaskInfo("swapper/0", 0, 0)
    put_task(memory, TASK, b"kworker/0:1", 17, 17)
    assert namer.current(memory.read, PERCPU_BASE) == TaskInfo("kworker/0:1", 17, 17)
    put_task(memory, TASK, b"sh", 120, 118)
    first = namer.current(memory.read, PERCPU_BASE)
    assert first == TaskInfo("sh", 120, 118)
    assert namer.current(memory.read, PERCPU_BASE) is first  # interned: samples share one object


@pytest.mark.parametrize(
    ("pointer", "comm", "pid"),
    [
        (0x1234_5000, b"sh", 1),  # a user address is no task_struct
        (TASK + 4, b"sh", 1),  # misaligned
        (TASK, b"A" * 16, 1),  # comm without its NUL
        (TASK, b"", 1),  # empty comm
        (TASK, b"ab\x01c", 1),  # control characters
        (TASK, b"sh", 1 << 30),  # pid past PID_MAX_LIMIT
    ],
)
def test_implausible_tasks_give_none(pointer: int, comm: bytes, pid: int) -> None:
    memory = FakeMemory()
    namer = TaskNamer(layout())
    memory.word(PERCPU_BASE + CURRENT_TASK, pointer)
    put_task(memory, TASK, comm, pid, pid)
    assert namer.current(memory.read, PERCPU_BASE) is None
    assert namer.failures == 1


def test_unmapped_task_gives_none() -> None:
    memory = FakeMemory()
    namer = TaskNamer(layout())
    assert namer.current(memory.read, PERCPU_BASE) is None  # no per-CPU area
    memory.word(PERCPU_BASE + CURRENT_TASK, TASK)
    assert namer.current(memory.read, PERCPU_BASE) is None  # pointer to nothing


def test_gs_base_cached_from_kernel_mode_and_msr_read_only_when_needed() -> None:
    memory = FakeMemory()
    memory.word(PERCPU_BASE + CURRENT_TASK, TASK)
    put_task(memory, TASK, b"init", 1, 1)
    msr_values = [PERCPU_BASE]
    msr_reads: list[int] = []

    def read_msr() -> int | None:
        msr_reads.append(1)
        return msr_values[0]

    state = VcpuKernelState(TaskNamer(layout()), read_msr)
    # user mode first, nothing cached: one MSR read, then the cache
    assert state.current_task(3, 0x7F00_0000_0000, memory.read) == TaskInfo("init", 1, 1)
    assert state.current_task(3, 0x7F00_0000_0000, memory.read) == TaskInfo("init", 1, 1)
    assert len(msr_reads) == 1
    # kernel mode: the live GS base wins and refreshes the cache
    other = PERCPU_BASE + 0x10_0000
    memory.word(other + CURRENT_TASK, TASK)
    assert state.current_task(0, other, memory.read) is not None
    assert state.kernel_gs_base == other
    # kernel entry before swapgs (user GS base live at CPL0): the cache stands in, no MSR read
    assert state.current_task(0, 0x7F00_0000_0000, memory.read) == TaskInfo("init", 1, 1)
    assert len(msr_reads) == 1 and state.msr_reads == 1
    assert state.lookups == 4 and state.named == 4


def test_msr_without_a_kernel_address_is_retried_sparingly() -> None:
    reads: list[int] = []

    def read_msr() -> int | None:
        reads.append(1)
        return 0  # early boot: no kernel GS base yet

    state = VcpuKernelState(TaskNamer(layout()), read_msr, msr_retry=10)
    memory = FakeMemory()
    for _ in range(25):
        assert state.current_task(3, 0, memory.read) is None
    assert len(reads) == 3  # samples 1, 11 and 21


def test_kernel_page_tables_tried_when_user_ones_cannot_reach_the_task() -> None:
    kernel_view = FakeMemory()
    kernel_view.word(PERCPU_BASE + CURRENT_TASK, TASK)
    put_task(kernel_view, TASK, b"bash", 300, 300)
    user_view = FakeMemory()  # page-table isolation: kernel data unmapped
    state = VcpuKernelState(TaskNamer(layout()), lambda: PERCPU_BASE)
    assert state.current_task(3, 0, user_view.read) is None
    assert state.current_task(3, 0, user_view.read, kernel_view.read) == TaskInfo("bash", 300, 300)


def test_debian_kernel_layout() -> None:
    from tests.kernel_fixture import cached_kernel, kernel_cache_dir, pvh_vmlinux
    from tests.unit.test_kernel_btf import debian_btf

    btf = debian_btf()
    kernel = cached_kernel(kernel_cache_dir())
    assert kernel is not None
    vmlinux = pvh_vmlinux(kernel).path
    assert vmlinux is not None
    kallsyms = parse_kallsyms(vmlinux.read_bytes())
    found = TaskLayout.from_kernel(kallsyms, btf)
    assert found.current_task_offset == kallsyms.address_of("current_task")  # 6.1: its own per-CPU var
    assert found.current_task_offset < 0x10_0000  # an offset in the per-CPU area, not an address
    assert found.tgid == found.pid + 4 and found.comm_size == 16
