"""Debian's cloud kernel recorded through early boot with nothing but its image: every kernel sample
named from the image's own kallsyms, ORC stacks that reach start_kernel, and the task that ran."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kernel_fixture import debian_kernel, pvh_vmlinux
from vmscope.profiler.recorder import ProfileRecorder
from vmscope.symbols import is_kernel_address
from vmscope.vmm.machine import Machine
from vmscope.vmm.platform import install_platform_devices

pytestmark = [pytest.mark.kvm, pytest.mark.slow]


@pytest.fixture(scope="module")
def vmlinux() -> Path:
    lookup = debian_kernel()
    if lookup.path is None:
        pytest.skip(f"Debian's kernel package is not available: {lookup.reason}")
    extracted = pvh_vmlinux(lookup.path)
    if extracted.path is None:
        pytest.skip(f"cannot extract vmlinux: {extracted.reason}")
    return extracted.path


def test_early_boot_profile_names_kernel_functions_and_reaches_start_kernel(vmlinux: Path) -> None:
    with Machine(mem="512M") as machine:
        install_platform_devices(machine, serial="none")
        machine.load(vmlinux, cmdline="console=ttyS0 earlyprintk=serial panic=-1")
        recorder = ProfileRecorder(machine, frequency_hz=49, kernel_image=vmlinux)
        recorder.start()
        machine.run(timeout=25)
        profile = recorder.finish()
    symbolizer = profile.symbolizer()
    kernel_samples = [s for s in profile.samples if is_kernel_address(s.ip)]
    assert len(kernel_samples) > 200
    named = [s for s in kernel_samples if (found := symbolizer.lookup(s.ip)) and found.module == "kernel"]
    assert len(named) >= 0.95 * len(kernel_samples)
    reaching = 0
    for sample in kernel_samples:
        names = {found.name for frame in sample.frames if (found := symbolizer.lookup(frame))}
        reaching += "start_kernel" in names
    assert reaching >= 0.5 * len(kernel_samples)
    assert profile.metadata.extra["kernel_slide"] == "0x0"  # PVH boot skips the decompressor's KASLR
    # until the kernel installs its IDT the slide is unknown and frame pointers stand in
    assert int(profile.metadata.extra.get("stacks.orc", "0")) >= 0.5 * len(kernel_samples)
    # who was running: early boot is init_task, pid 0, called "swapper" until sched_init names it
    # "swapper/0"; kernel threads, if the boot gets to them in the window, carry their own names
    tasks = [s.task for s in kernel_samples if s.task is not None]
    assert len(tasks) >= 0.9 * len(kernel_samples)
    idle = [t for t in tasks if t.pid == 0]
    assert len(idle) >= 0.5 * len(tasks)
    assert {t.comm for t in idle} <= {"swapper", "swapper/0"}
    for task in tasks:
        assert task.pid == 0 or (task.comm and task.comm not in ("swapper", "swapper/0")), task
    assert int(profile.metadata.extra["tasks.msr_reads"]) <= 8  # the GS base comes with the sync registers
    assert {s.unwinder for s in kernel_samples} <= {"orc", "fp", "orc+fp", "orc+cfi"}
