#!/usr/bin/env python3
"""Start-up benchmark: a whole process, from exec to the guest running and back, and ``--help``.

    python bench/startup.py [--repeat K] [--no-qemu] [--compare-src DIR]

Every VMM boots bench/guests/exit_loop.S with ``n=0``: a PVH guest whose first act is the
debug-exit write, so the wall time of the process is start-up plus tear-down. VMMs: the C
reference (bench/ref_vmm.c), vmscope (``python -m vmscope run``), another vmscope source tree
(``--compare-src``) and QEMU microvm when installed. Then ``vmscope --help`` and every
subcommand's ``--help``. Runs are interleaved, ``--repeat`` times (default 15); medians and the
min-max spread. Targets (issue 15), as PASS/FAIL lines: vmscope at most 1.5x QEMU microvm, and
every ``--help`` under 60 ms. A benchmark, not a test: it exits 0 unless the reference cannot run.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exit_roundtrip import (
    GUEST_SOURCE,
    SRC,
    Vmm,
    build_reference,
    compile_bytecode,
    probe,
    qemu_vmm,
    reference_vmm,
    run_once,
    vmscope_vmm,
)

from vmscope.cli.main import SUBCOMMANDS
from vmscope.guest.build import RUNTIME_LINKER_SCRIPT, build_guest
from vmscope.kvm import describe_backend

TARGET_RATIO_TO_QEMU = 1.5
TARGET_HELP_MS = 60.0


def help_seconds(src: Path, words: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(src))
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "vmscope", *words, "--help"], env=env, stdout=subprocess.DEVNULL, check=True
    )
    return time.perf_counter() - start


def summary(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:7.1f} ms  ({min(times) * 1e3:.1f}-{max(times) * 1e3:.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="startup", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--repeat", type=int, default=15, help="runs of each (default 15)")
    parser.add_argument("--no-qemu", action="store_true", help="leave QEMU out even when it is installed")
    parser.add_argument("--compare-src", type=Path, help="also run vmscope from this source tree")
    args = parser.parse_args(argv)
    print(f"host: {describe_backend()}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="vmscope-bench-") as tmp:
        elf = build_guest("exit_loop", [GUEST_SOURCE], linker_script=RUNTIME_LINKER_SCRIPT)
        reference = reference_vmm(build_reference(Path(tmp)))
        vmms: list[Vmm] = [reference, vmscope_vmm()]
        trees = [("vmscope", SRC)]
        if args.compare_src is not None:
            vmms.append(vmscope_vmm(args.compare_src.resolve(), "vmscope (compared tree)"))
            trees.append(("vmscope (compared tree)", args.compare_src.resolve()))
        for _, tree in trees:  # measure an installed vmscope, not the bytecode compiler
            compile_bytecode(tree)
        qemu = shutil.which("qemu-system-x86_64")
        if qemu and not args.no_qemu:
            candidate = qemu_vmm(qemu, "host")
            if probe(candidate, elf) is not None:  # kvm_pvm hosts need arch-capabilities off
                candidate = qemu_vmm(qemu, "host,-arch-capabilities")
            vmms.append(candidate)
        elif not qemu:
            print("QEMU: not installed (apt-get install qemu-system-x86), left out")
        for vmm in vmms:
            vmm.error = probe(vmm, elf)
            if vmm.error is not None:
                print(f"{vmm.name}: not available ({vmm.error})")
        if reference.error is not None:
            return 1
        # the interpreter's own start-up with this host's site-packages: a floor for any Python CLI
        interpreter = Vmm(
            "python3 -c pass", lambda elf, cmdline: [sys.executable, "-c", "raise SystemExit(33)"]
        )
        vmms.append(interpreter)
        helps: dict[tuple[str, str], list[float]] = {}
        commands = [[], *([name] for name in SUBCOMMANDS)]
        for _ in range(args.repeat):
            for vmm in vmms:
                if vmm.error is None:
                    vmm.times.setdefault(0, []).append(run_once(vmm, elf, 0, timeout=60))
            for name, src in trees:
                for words in commands:
                    helps.setdefault((name, " ".join(words)), []).append(help_seconds(src, words))

    print("\nstart to guest running and back (n=0), whole process, median (min-max):")
    for vmm in vmms:
        if vmm.error is None:
            print(f"  {vmm.name:26} {summary(vmm.times[0])}")
    print("\n--help, whole process, median (min-max):")
    for (name, words), times in helps.items():
        print(f"  {name + ' ' + (words or '(top level)'):40} {summary(times)}")

    by_name = {vmm.name: vmm for vmm in vmms}
    ours = statistics.median(by_name["vmscope"].times[0]) if by_name["vmscope"].error is None else None
    ref = statistics.median(reference.times[0])
    qemu_result = by_name.get("QEMU microvm")
    print()
    if ours is None:
        print(
            f"target vmscope start-up <= {TARGET_RATIO_TO_QEMU}x QEMU microvm: SKIP (vmscope not available)"
        )
    elif qemu_result is None or qemu_result.error is not None:
        print(f"target vmscope start-up <= {TARGET_RATIO_TO_QEMU}x QEMU microvm: SKIP (QEMU not available)")
    else:
        theirs = statistics.median(qemu_result.times[0])
        verdict = "PASS" if ours <= TARGET_RATIO_TO_QEMU * theirs else "FAIL"
        print(
            f"target vmscope start-up <= {TARGET_RATIO_TO_QEMU}x QEMU microvm: {verdict} "
            f"({ours * 1e3:.1f} vs {theirs * 1e3:.1f} ms, {ours / theirs:.2f}x)"
        )
    if ours is not None:
        print(f"vmscope start-up vs C reference: {ours / ref:.1f}x ({ours * 1e3:.1f} vs {ref * 1e3:.1f} ms)")
    slowest = max((statistics.median(t), words) for (name, words), t in helps.items() if name == "vmscope")
    verdict = "PASS" if slowest[0] * 1e3 < TARGET_HELP_MS else "FAIL"
    print(
        f"target every vmscope --help < {TARGET_HELP_MS:.0f} ms: {verdict} "
        f"(slowest: {slowest[1] or 'top level'}, {slowest[0] * 1e3:.1f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
