#!/usr/bin/env python3
"""Cost of one instruction completed by vmscope's fallback emulator, against a plain exit.

    python bench/emulate_fallback.py [--count N] [--repeat K]

Runs tests/kvm/guest_src/emulate.c at CPL0 three ways: N `clac` instructions (on a kvm_pvm
host each one is an emulation failure vmscope completes), N port writes to the scratch port (a
plain userspace exit, the reference), and neither (the baseline: boot and exit). Prints the
wall time per instruction above the baseline for both, their ratio, and the mean time spent
inside the fallback per clac as vmscope's own counters measured it (median of K runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vmscope.guest.build import build_runtime_guest  # noqa: E402
from vmscope.kvm import describe_backend  # noqa: E402
from vmscope.vmm.machine import Machine  # noqa: E402
from vmscope.vmm.platform import install_platform_devices  # noqa: E402


def run_once(guest: Path, cmdline: str) -> tuple[float, list[tuple[int, str, int, int, int]]]:
    with Machine(mem="64M", coalesce_writes=False) as machine:  # every write a real exit
        install_platform_devices(machine, serial="none")
        machine.load(guest, cmdline=cmdline)
        started = time.perf_counter()
        result = machine.run(timeout=600)
        elapsed = time.perf_counter() - started
        if result.exit_status != 33:
            raise SystemExit(f"guest failed: {result.reason}")
        return elapsed, machine.fallback_counts()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    guest = build_runtime_guest("emulate", [ROOT / "tests" / "kvm" / "guest_src" / "emulate.c"])
    base, clac, outs, inside = [], [], [], []
    for _ in range(args.repeat):
        base.append(run_once(guest, "only=fwait")[0])
        elapsed, counts = run_once(guest, f"only=fwait clac={args.count}")
        clac.append(elapsed)
        loop = max((row for row in counts if row[1] == "clac"), key=lambda row: row[3], default=None)
        if loop is not None:
            inside.append(loop[4] / loop[3] / 1000)
        outs.append(run_once(guest, f"only=fwait outs={args.count}")[0])
    baseline = statistics.median(base)
    per_clac = (statistics.median(clac) - baseline) / args.count * 1e6
    per_out = (statistics.median(outs) - baseline) / args.count * 1e6
    print(describe_backend())
    print(f"clac completed by vmscope: {per_clac:.1f} us per instruction (wall, above baseline)")
    print(f"plain port-I/O exit:       {per_out:.1f} us per instruction")
    print(f"ratio:                     {per_clac / per_out:.2f}x")
    if inside:
        print(f"inside the fallback:       {statistics.median(inside):.1f} us per clac (vmscope's counters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
