"""Exit round-trip benchmark: microseconds per userspace PIO exit, vmscope against a C reference.

Every VMM boots the same guest (bench/guests/exit_loop.S: N ``outb`` to port 0x510 at CPL0, then
isa-debug-exit) with ``n=N`` and with ``n=0``; the cost of one exit is (T(N) - T(0)) / N with
medians over ``--repeat`` runs of each, which removes start-up and tear-down. VMMs: the C
reference (bench/ref_vmm.c, the floor on this machine), vmscope (``python -m vmscope.cli.main
run``) and QEMU microvm when ``qemu-system-x86_64`` is installed. Run it through the executable
``bench/exit_roundtrip``. A benchmark, not a test: it exits 0 unless the reference cannot run.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
GUEST_SOURCE = REPO / "bench" / "guests" / "exit_loop.S"
REF_VMM_SOURCE = REPO / "bench" / "ref_vmm.c"
SUCCESS_STATUS = 33  # exit_loop ends with debug_exit(0x10)
TARGET_RATIO_TO_REFERENCE = 1.15
#: issue 15: vmscope's exit round trip against the bare Python loop (the floor any Python VMM pays)
TARGET_RATIO_TO_FLOOR = 1.05
#: guest RAM in MiB, the same for every VMM (registering RAM with KVM costs time that grows with it)
GUEST_MEM_MIB = 64

sys.path.insert(0, str(SRC))

from vmscope.errors import VmscopeError  # noqa: E402
from vmscope.guest.build import RUNTIME_LINKER_SCRIPT, build_guest  # noqa: E402
from vmscope.kvm import describe_backend  # noqa: E402

CommandFor = Callable[[Path, str], list[str]]


@dataclass
class Vmm:
    name: str
    command: CommandFor
    env: dict[str, str] | None = None
    note: str = ""
    times: dict[int, list[float]] = field(default_factory=dict)
    error: str | None = None

    def per_exit_us(self, exits: int) -> float:
        return (statistics.median(self.times[exits]) - statistics.median(self.times[0])) / exits * 1e6

    def per_exit_spread_us(self, exits: int) -> tuple[float, float]:
        """Lowest and highest per-exit cost over the runs, each against the median T(0)."""
        base = statistics.median(self.times[0])
        estimates = [(t - base) / exits * 1e6 for t in self.times[exits]]
        return min(estimates), max(estimates)


def compile_bytecode(tree: Path) -> None:
    """Compile a source tree's modules as an installation does (pip writes the .pyc files), so that
    a start-up time measures vmscope, not the bytecode compiler: where PYTHONDONTWRITEBYTECODE is
    set (some CI and sandbox environments), nothing else ever writes them for an editable tree."""
    import compileall

    compileall.compile_dir(str(tree), quiet=1)


def run_once(vmm: Vmm, elf: Path, exits: int, timeout: float) -> float:
    """Seconds one boot-to-exit run takes; raises RuntimeError when it does not end with status 33."""
    command = vmm.command(elf, f"n={exits}")
    start = time.perf_counter()
    try:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=vmm.env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"timed out after {timeout:.0f} s") from exc
    except OSError as exc:
        raise RuntimeError(f"cannot run {command[0]}: {exc.strerror}") from exc
    elapsed = time.perf_counter() - start
    if result.returncode != SUCCESS_STATUS:
        lines = [line for line in result.stderr.decode(errors="replace").splitlines() if line.strip()]
        detail = lines[-1].strip() if lines else "no output"
        raise RuntimeError(f"exit status {result.returncode}, expected {SUCCESS_STATUS}: {detail}")
    return elapsed


def build_reference(directory: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) found")
    output = directory / "ref_vmm"
    result = subprocess.run(
        [compiler, "-O2", "-o", str(output), str(REF_VMM_SOURCE)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"building ref_vmm failed: {result.stderr.strip().splitlines()[0]}")
    return output


def reference_vmm(binary: Path) -> Vmm:
    return Vmm(
        "C reference", lambda elf, cmdline: [str(binary), "-m", str(GUEST_MEM_MIB), "-c", cmdline, str(elf)]
    )


def vmscope_vmm(src: Path = SRC, name: str = "vmscope", coalesce: str | None = "off") -> Vmm:
    """``coalesce``: the --coalesce value; "off" so that port 0x510, which no device claims,
    still exits on every write (None for a tree that predates the option)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    extra = ["--coalesce", coalesce] if coalesce is not None else []

    def command(elf: Path, cmdline: str) -> list[str]:
        run = ["run", "--elf", str(elf), "--cmdline", cmdline, "--serial", "none"]
        run += ["--mem", f"{GUEST_MEM_MIB}M", *extra]
        return [sys.executable, "-m", "vmscope.cli.main", *run]

    note = "" if src == SRC else f"source tree {src}"
    if coalesce == "on":
        note = "--coalesce on: KVM queues the unclaimed port-0x510 writes; no exit per write"
    return Vmm(name, command, env=env, note=note)


def python_floor_vmm() -> Vmm:
    script = Path(__file__).resolve().with_name("python_floor.py")
    return Vmm(
        "bare Python loop",
        lambda elf, cmdline: [sys.executable, str(script), str(elf), cmdline, f"{GUEST_MEM_MIB}M"],
        note="KVM_RUN + exit decode only: the floor for any Python VMM",
    )


def qemu_vmm(binary: str, cpu: str) -> Vmm:
    def command(elf: Path, cmdline: str) -> list[str]:
        return [
            binary,
            "-M",
            "microvm,x-option-roms=off,isa-serial=off,rtc=off",
            "-enable-kvm",
            "-cpu",
            cpu,
            "-m",
            f"{GUEST_MEM_MIB}M",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(elf),
            "-append",
            cmdline,
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
        ]

    return Vmm("QEMU microvm", command, note=f"-cpu {cpu}")


def probe(vmm: Vmm, elf: Path) -> str | None:
    """None when the VMM boots the guest with n=0 correctly, else why not."""
    try:
        run_once(vmm, elf, 0, timeout=120)
    except RuntimeError as exc:
        return str(exc)
    return None


def print_table(vmms: list[Vmm], exits: int, reference: Vmm) -> None:
    ref_cost = reference.per_exit_us(exits)
    header = ["VMM", "us/exit", "min-max", "vs C ref", "start-up ms"]
    rows: list[list[str]] = []
    for vmm in vmms:
        if vmm.error is not None:
            rows.append([vmm.name, "n/a", "-", "-", "-"])  # the reason was printed above
            continue
        cost = vmm.per_exit_us(exits)
        low, high = vmm.per_exit_spread_us(exits)
        rows.append(
            [
                vmm.name,
                f"{cost:.2f}",
                f"{low:.2f}-{high:.2f}",
                f"{cost / ref_cost:.3f}x",
                f"{statistics.median(vmm.times[0]) * 1e3:.0f}",
            ]
        )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        return
    table = Table(title=f"exit round trip, {exits} exits per run")
    for column in header:
        table.add_column(column, justify="left" if column == "VMM" else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(100, shutil.get_terminal_size().columns)).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="exit_roundtrip", description=__doc__.splitlines()[0] if __doc__ else ""
    )
    parser.add_argument("--exits", type=int, default=200_000, help="exits per measured run (default 200000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each VMM with n=N and n=0 (default 5)")
    parser.add_argument("--no-qemu", action="store_true", help="leave QEMU out even when it is installed")
    parser.add_argument(
        "--compare-src", type=Path, help="also run vmscope from this source tree (e.g. /work/main/src)"
    )
    parser.add_argument(
        "--compare-coalesce",
        choices=("on", "off"),
        default=None,
        help="pass --coalesce to the compared tree (leave out for trees without the option)",
    )
    args = parser.parse_args(argv)
    if args.exits < 1 or args.repeat < 1:
        parser.error("--exits and --repeat must be at least 1")

    print(f"host: {describe_backend()}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="vmscope-bench-") as tmp:
        try:
            elf = build_guest("exit_loop", [GUEST_SOURCE], linker_script=RUNTIME_LINKER_SCRIPT)
            reference = reference_vmm(build_reference(Path(tmp)))
        except (VmscopeError, RuntimeError) as exc:
            print(f"exit_roundtrip: cannot build the benchmark: {exc}", file=sys.stderr)
            return 1
        print(f"guest: {elf}")

        reference.error = probe(reference, elf)
        if reference.error is not None:
            print(f"exit_roundtrip: the C reference cannot run: {reference.error}", file=sys.stderr)
            return 1
        vmscope_result = vmscope_vmm()
        vmscope_result.error = probe(vmscope_result, elf)
        floor = python_floor_vmm()
        floor.error = probe(floor, elf)
        coalesced = vmscope_vmm(name="vmscope coalesced", coalesce="on")
        coalesced.error = probe(coalesced, elf)
        vmms = [reference, floor, vmscope_result, coalesced]
        if args.compare_src is not None:
            other = vmscope_vmm(
                args.compare_src.resolve(), "vmscope (compared tree)", coalesce=args.compare_coalesce
            )
            other.error = probe(other, elf)
            vmms.append(other)
        qemu = shutil.which("qemu-system-x86_64")
        if qemu and not args.no_qemu:
            qemu_host = qemu_vmm(qemu, "host")
            qemu_host.error = probe(qemu_host, elf)
            if qemu_host.error is not None:
                # plain -cpu host trips over MSR 0x10a (arch-capabilities) on kvm_pvm hosts
                fallback = qemu_vmm(qemu, "host,-arch-capabilities")
                fallback.error = probe(fallback, elf)
                if fallback.error is None:
                    qemu_host = fallback
            vmms.append(qemu_host)
        elif not qemu:
            print("QEMU: not installed (apt-get install qemu-system-x86), left out")
        for vmm in vmms:
            if vmm.error is not None:
                print(f"{vmm.name}: not available ({vmm.error})")

        runnable = [vmm for vmm in vmms if vmm.error is None]
        timeout = max(120.0, args.exits * 200e-6)
        for repetition in range(args.repeat):
            # interleave VMMs and sizes so that background load hits all of them alike
            for vmm in runnable:
                for exits in (0, args.exits):
                    if vmm.error is not None:
                        continue
                    try:
                        vmm.times.setdefault(exits, []).append(run_once(vmm, elf, exits, timeout))
                    except RuntimeError as exc:
                        vmm.error = f"run {repetition + 1}, n={exits}: {exc}"
                        print(f"{vmm.name}: failed ({vmm.error})")
            print(f"run {repetition + 1}/{args.repeat} done", file=sys.stderr)
        if reference.error is not None:
            print("exit_roundtrip: the C reference failed; no results", file=sys.stderr)
            return 1

    print_table(vmms, args.exits, reference)
    print(
        "us/exit = (median T(N) - median T(0)) / N; min-max: each run of n=N against the median T(0); "
        "start-up: median T(0)"
    )
    for vmm in vmms:
        if vmm.note and vmm.error is None:
            print(f"{vmm.name}: {vmm.note}")
    ref_cost = reference.per_exit_us(args.exits)
    by_name = {vmm.name: vmm for vmm in vmms}
    vmscope = by_name["vmscope"]
    qemu_result = by_name.get("QEMU microvm")
    floor_result = by_name["bare Python loop"]
    if vmscope.error is not None:
        print(f"target vmscope <= {TARGET_RATIO_TO_FLOOR}x bare Python loop: SKIP (vmscope not available)")
        print(f"target vmscope <= {TARGET_RATIO_TO_REFERENCE}x C reference: SKIP (vmscope not available)")
        print("target vmscope <= QEMU: SKIP (vmscope not available)")
        return 0
    cost = vmscope.per_exit_us(args.exits)
    if floor_result.error is None:
        floor_cost = floor_result.per_exit_us(args.exits)
        verdict = "PASS" if cost <= TARGET_RATIO_TO_FLOOR * floor_cost else "FAIL"
        print(
            f"target vmscope <= {TARGET_RATIO_TO_FLOOR}x bare Python loop: {verdict} "
            f"({cost:.2f} vs {floor_cost:.2f} us/exit, {cost / floor_cost:.3f}x)"
        )
    else:
        print(f"target vmscope <= {TARGET_RATIO_TO_FLOOR}x bare Python loop: SKIP (floor not available)")
    verdict = "PASS" if cost <= TARGET_RATIO_TO_REFERENCE * ref_cost else "FAIL"
    print(
        f"target vmscope <= {TARGET_RATIO_TO_REFERENCE}x C reference: {verdict} "
        f"({cost:.2f} vs {ref_cost:.2f} us/exit, {cost / ref_cost:.3f}x)"
    )
    if qemu_result is None or qemu_result.error is not None:
        print("target vmscope <= QEMU: SKIP (QEMU not available)")
    else:
        qemu_cost = qemu_result.per_exit_us(args.exits)
        verdict = "PASS" if cost <= qemu_cost else "FAIL"
        print(
            f"target vmscope <= QEMU: {verdict} "
            f"({cost:.2f} vs {qemu_cost:.2f} us/exit, {cost / qemu_cost:.3f}x)"
        )
    coalesced = by_name["vmscope coalesced"]
    if coalesced.error is None:
        write_cost = coalesced.per_exit_us(args.exits)
        verdict = "PASS" if write_cost < cost else "FAIL"
        print(
            f"target coalesced write < real exit (issue 15): {verdict} "
            f"({write_cost:.2f} vs {cost:.2f} us/write, {cost / write_cost:.1f}x cheaper; "
            "counted on delivery, in batches)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
