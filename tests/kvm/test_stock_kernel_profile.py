"""Debian's cloud kernel recorded through early boot with nothing but its image: every kernel sample
named from the image's own kallsyms, ORC stacks that reach start_kernel, and the task that ran; and
``vmscope stat`` naming the instructions it emulated in the bzImage the same way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernel_fixture import debian_kernel, pvh_vmlinux
from vmscope.kvm.system import detect_backend
from vmscope.profiler.recorder import ProfileRecorder
from vmscope.symbols import is_kernel_address
from vmscope.vmm.machine import Machine
from vmscope.vmm.platform import install_platform_devices

pytestmark = [pytest.mark.kvm, pytest.mark.slow]


@pytest.fixture(scope="module")
def bzimage() -> Path:
    lookup = debian_kernel()
    if lookup.path is None:
        pytest.skip(f"Debian's kernel package is not available: {lookup.reason}")
    return lookup.path


@pytest.fixture(scope="module")
def vmlinux(bzimage: Path) -> Path:
    extracted = pvh_vmlinux(bzimage)
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


@pytest.mark.skipif(detect_backend() != "kvm_pvm", reason="this host's KVM emulates what the kernel runs")
def test_stat_names_the_instructions_it_emulated_in_a_bzimage_without_symbols(bzimage: Path) -> None:
    # SLUB's cmpxchg16b, which kvm_pvm cannot emulate at CPL 0, runs within the first minute of boot
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    completed = subprocess.run(
        [sys.executable, "-m", "vmscope", "stat", "--events", "none", "--", "--kernel", str(bzimage),
         "--mem", "512M", "--cmdline", "console=ttyS0 panic=-1", "--serial", "none", "--timeout", "60"],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert "60 s time limit" in completed.stderr, completed.stderr
    lines = completed.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Emulated by vmscope"))
    rows = [line.split("|") for line in lines[start:] if line.startswith("| ") and "0xffffffff" in line]
    assert rows, completed.stdout
    symbols = [row[3].strip() for row in rows]
    assert all(symbol != "-" and "+0x" in symbol for symbol in symbols), completed.stdout
