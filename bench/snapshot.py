#!/usr/bin/env python3
"""Snapshot time and size, and restore-to-guest-running time against a fresh start, whole process.

    python bench/snapshot.py [--sizes 256M,1G] [--repeat K] [--fill 1.0]

The guest is 8 bytes of real-mode code at 0x7c00 that writes 'x' to COM1 forever, so "guest
running" is exact on both paths: the first byte on the vmscope process's stdout. Per size:

* snapshot: the guest is built in this process, ``--fill`` of its RAM written with non-zero
  data (the worst case for the RAM file; 1.0 = every page), started, and saved with
  ``save_snapshot(stop=True)``: the time the guest is held, the state file and RAM data sizes;
* fresh start: ``vmscope run --flat loop.bin --mode real --load-address 0x7c00 --mem SIZE``,
  from spawning the process to the first byte;
* restore: ``vmscope run --restore SNAP``, from spawning the process to the first byte.

Fresh and restore runs alternate within each of K rounds (median reported) so load drift hits
both alike. Target (issue 12): a 256 MiB restore in at most 150 ms, and under a fresh start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from exit_roundtrip import compile_bytecode  # noqa: E402

from vmscope.arch.x86.cpu_state import CpuMode  # noqa: E402
from vmscope.memory.guest_memory import parse_size  # noqa: E402
from vmscope.snapshot.save import save_snapshot  # noqa: E402
from vmscope.vmm.assemble import assemble_machine  # noqa: E402
from vmscope.vmm.config import MachineConfig  # noqa: E402

TARGET_SIZE = 256 << 20
TARGET_RESTORE_MS = 150.0
LOAD_ADDRESS = 0x7C00
# mov dx, 0x3f8; mov al, 'x'; out dx, al; jmp back to the out
LOOP = bytes([0xBA, 0xF8, 0x03, 0xB0, 0x78, 0xEE, 0xEB, 0xFD])
ENV = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}


def fill_ram(machine_memory: object, fraction: float) -> None:
    """Non-zero data in ``fraction`` of each region's pages, clear of the code page."""
    from vmscope.memory.guest_memory import GuestMemory

    assert isinstance(machine_memory, GuestMemory)
    chunk = bytes((i * 7 + 1) & 0xFF or 1 for i in range(1 << 21))
    for base, size in machine_memory.ranges():
        end = base + int(size * fraction) // len(chunk) * len(chunk)
        for address in range(base, end, len(chunk)):
            if address <= LOAD_ADDRESS < address + len(chunk):
                machine_memory.write(address, chunk[: LOAD_ADDRESS - address])
                continue
            machine_memory.write(address, chunk)


def take_snapshot(size: int, path: Path, image: Path, fraction: float) -> tuple[float, int, int]:
    """(seconds the guest was held, state file bytes, RAM data bytes) of a running loop guest."""
    config = MachineConfig(mem=size, serial="none")
    machine = assemble_machine(config)
    try:
        fill_ram(machine.memory, fraction)
        machine.load(image, kind="flat", flat_address=LOAD_ADDRESS, flat_mode=CpuMode.REAL)
        machine.start()
        time.sleep(0.2)
        info = save_snapshot(machine, path, stop=True)
        machine.wait(10)
    finally:
        machine.close()
    return info.paused_s, info.state_bytes, info.memory_data_bytes


def first_byte_s(arguments: list[str]) -> float:
    """Seconds from spawning ``vmscope ARGS`` to the guest's first byte on its stdout."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "vmscope", *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV
    )
    try:
        assert process.stdout is not None
        byte = process.stdout.read(1)
        elapsed = time.perf_counter() - started
    finally:
        process.kill()
        _, error = process.communicate()
    if byte != b"x":
        raise SystemExit(f"vmscope {' '.join(arguments)} printed no guest output: {error.decode()[-500:]}")
    return elapsed


def python_floor_s() -> float:
    """Seconds to spawn and end a bare interpreter: the part of either path vmscope cannot cut."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True, env=ENV)
    return time.perf_counter() - started


def restore_in_process_s(snap: Path) -> float:
    """Seconds restore_machine() takes inside a process (checks, RAM mapping, KVM and device state)."""
    from vmscope.snapshot.restore import BackendOverrides, restore_machine

    started = time.perf_counter()
    machine = restore_machine(snap, BackendOverrides(serial="none"))
    elapsed = time.perf_counter() - started
    machine.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="256M,1G", help="guest RAM sizes (default 256M,1G)")
    parser.add_argument("--repeat", type=int, default=7, help="rounds per size (default 7)")
    parser.add_argument("--fill", type=float, default=1.0, help="fraction of RAM given non-zero data (1.0)")
    args = parser.parse_args()
    compile_bytecode(ROOT / "src")  # as installed: see exit_roundtrip.compile_bytecode
    verdicts: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="vmscope-bench-snapshot-"))
    try:
        image = work / "loop.bin"
        image.write_bytes(LOOP)
        print(f"{'RAM':>6} {'held ms':>8} {'state KiB':>9} {'RAM data MiB':>12} {'on disk MiB':>11} "
              f"{'python ms':>9} {'fresh ms':>9} {'restore ms':>10} {'restore/fresh':>13} "
              f"{'in-process ms':>13}")  # fmt: skip
        for text in args.sizes.split(","):
            size = parse_size(text)
            snap = work / f"snap-{text}"
            held, state_bytes, data_bytes = take_snapshot(size, snap, image, args.fill)
            on_disk = sum(p.stat().st_blocks * 512 for p in snap.iterdir())
            fresh_args = ["run", "--flat", str(image), "--mode", "real", "--load-address", "0x7c00"]
            fresh_args += ["--mem", text]
            floor, fresh, restore, inside = [], [], [], []
            for _ in range(args.repeat):
                floor.append(python_floor_s())
                fresh.append(first_byte_s(fresh_args))
                restore.append(first_byte_s(["run", "--restore", str(snap), "--serial", "stdio"]))
                inside.append(restore_in_process_s(snap))
            p, f, r = (statistics.median(values) * 1e3 for values in (floor, fresh, restore))
            i = statistics.median(inside) * 1e3
            print(f"{text:>6} {held * 1e3:>8.1f} {state_bytes / 1024:>9.1f} {data_bytes / 2**20:>12.1f} "
                  f"{on_disk / 2**20:>11.1f} {p:>9.1f} {f:>9.1f} {r:>10.1f} {r / f:>13.2f} "
                  f"{i:>13.1f}")  # fmt: skip
            if size == TARGET_SIZE:
                verdicts.append(f"target 256M restore <= {TARGET_RESTORE_MS:.0f} ms: "
                                f"{'PASS' if r <= TARGET_RESTORE_MS else 'FAIL'} ({r:.1f} ms)")  # fmt: skip
                verdicts.append(f"target 256M restore under a fresh start: "
                                f"{'PASS' if r < f else 'FAIL'} ({r:.1f} vs {f:.1f} ms)")  # fmt: skip
        print(f"medians of {args.repeat} alternating rounds; {os.cpu_count()} CPUs")
        print("\n".join(verdicts))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
