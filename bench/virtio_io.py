"""virtio I/O benchmark: notification cost, 4 KiB request rate and 1 MiB throughput of virtio-blk.

Every VMM boots the virtio test guest (tests/kvm/guest_src/virtio_driver.c) on the same 64 MiB
raw image and the guest times its own loops with rdtsc (calibrated against PIT channel 0):

* notify: ``count`` QueueNotify writes on an idle queue against the same loop storing to RAM;
  (notify - RAM) / count is what one notification costs the vCPU;
* 4k-qd1 / 4k-qd16: 4 KiB reads, one at a time / 16 posted per notification;
* 1m-seq: 1 MiB sequential reads, one at a time.

VMMs: vmscope with ``--iothreads on`` (ioeventfd + irqfd, served on the device's I/O thread) and
``--iothreads off`` (QueueNotify is an MMIO exit served on the vCPU thread), and QEMU microvm
when ``qemu-system-x86_64`` is installed. Runs are interleaved across VMMs, ``--repeat`` times;
the table shows medians with the min-max spread. A benchmark, not a test: it asserts nothing.
Usage: ``python bench/virtio_io.py [--repeat K] [--no-qemu]`` (see bench/README.md).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
GUEST_SOURCE = REPO / "tests" / "kvm" / "guest_src" / "virtio_driver.c"
IMAGE_BYTES = 64 << 20
SUCCESS_STATUS = 33  # the guest ends with debug_exit(0x10)
TARGET_NOTIFY_RATIO = 5.0  # the I/O-thread path must be this many times cheaper per notification
#: workloads whose request rate must be at least QEMU's (issue 6: "block request rate")
TARGET_RATE_WORKLOADS = ("4k-qd1", "4k-qd16")
QEMU_BINARY = "qemu-system-x86_64"

sys.path.insert(0, str(SRC))

from vmscope.errors import VmscopeError  # noqa: E402
from vmscope.guest.build import build_runtime_guest  # noqa: E402
from vmscope.kvm import describe_backend  # noqa: E402

CommandFor = Callable[[Path, Path, str], list[str]]


@dataclass(frozen=True)
class Workload:
    name: str
    cmdline: str
    unit: str  # what the table shows per run
    higher_is_better: bool


def workloads(scale: float) -> list[Workload]:
    def n(count: int, multiple: int = 1) -> int:
        return max(multiple, int(count * scale) // multiple * multiple)

    return [
        Workload("notify", f"mode=bench-notify count={n(20000)}", "us/notification", False),
        Workload("4k-qd1", f"mode=bench-io bs=4096 depth=1 count={n(2000)}", "kreq/s", True),
        Workload("4k-qd16", f"mode=bench-io bs=4096 depth=16 count={n(4096, 16)}", "kreq/s", True),
        Workload("1m-seq", f"mode=bench-io bs=1048576 depth=1 count={n(256)}", "MiB/s", True),
    ]


@dataclass
class Vmm:
    name: str
    command: CommandFor
    results: dict[str, list[float]] = field(default_factory=dict)
    error: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def vmscope_vmm(iothreads: bool, *, polling: bool = True) -> Vmm:
    def command(elf: Path, image: Path, cmdline: str) -> list[str]:
        return [
            sys.executable, "-m", "vmscope", "run", "--elf", str(elf), "--mem", "64M", "--disk", str(image),
            "--serial", "stdio", "--iothreads", "on" if iothreads else "off", "-q", "--cmdline", cmdline,
        ]  # fmt: skip

    path = "I/O thread" if iothreads else "vCPU exit"
    if not polling:  # the I/O thread goes straight back to epoll after each notification
        return Vmm(f"vmscope ({path}, no polling)", command, env={"VMSCOPE_VIRTIO_POLL_US": "0"})
    return Vmm(f"vmscope ({path})", command)


def qemu_vmm(binary: str) -> Vmm:
    def command(elf: Path, image: Path, cmdline: str) -> list[str]:
        # microvm appends virtio_mmio.device= entries only with acpi=off; its virtio-mmio
        # transports are legacy (version 1) unless force-legacy is off
        return [
            binary, "-M", "microvm,acpi=off,x-option-roms=off,rtc=off", "-enable-kvm",
            "-cpu", "host,-arch-capabilities", "-m", "64M", "-nodefaults", "-no-reboot", "-nographic",
            "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-global", "virtio-mmio.force-legacy=false", "-kernel", str(elf), "-append", cmdline,
            "-drive", f"id=d0,file={image},format=raw,if=none", "-device", "virtio-blk-device,drive=d0",
        ]  # fmt: skip

    return Vmm("QEMU microvm", command)


def parse_result(workload: Workload, output: str) -> float:
    """The workload's figure from the guest's bench line (see the module docstring)."""
    line = re.search(r"bench-(?:notify|io):.*", output)
    if line is None:
        raise RuntimeError("no bench line in the guest output")
    values = {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", line.group(0))}
    tsc_per_s = values["tsc_khz"] * 1000
    if workload.name == "notify":
        return (values["notify_cycles"] - values["ram_cycles"]) / tsc_per_s / values["count"] * 1e6
    seconds = values["cycles"] / tsc_per_s
    if workload.unit == "MiB/s":
        return values["count"] * values["bs"] / (1 << 20) / seconds
    return values["count"] / seconds / 1000


def run_once(vmm: Vmm, elf: Path, image: Path, workload: Workload) -> float:
    command = vmm.command(elf, image, workload.cmdline)
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin:/usr/local/bin", **vmm.env}
    try:
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=180, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError("timed out after 180 s") from exc
    except OSError as exc:
        raise RuntimeError(f"cannot run {command[0]}: {exc.strerror}") from exc
    output = result.stdout.decode(errors="replace")
    if result.returncode != SUCCESS_STATUS:
        lines = [
            line for line in (output + result.stderr.decode(errors="replace")).splitlines() if line.strip()
        ]
        detail = lines[-1].strip() if lines else "no output"
        raise RuntimeError(f"exit status {result.returncode}: {detail}")
    return parse_result(workload, output)


def parked_iothread_notify_us(elf: Path, image: Path, workload: Workload, repeat: int) -> list[float]:
    """Diagnostic: the notify loop with vmscope's I/O thread stopped, so KVM signals the ioeventfd
    but no thread wakes up. Separates KVM's own cost from the cost of waking the I/O thread."""
    from vmscope.vmm.machine import Machine
    from vmscope.vmm.platform import install_platform_devices
    from vmscope.vmm.virtio_setup import install_virtio_devices

    results = []
    for _ in range(repeat):
        with tempfile.NamedTemporaryFile(suffix=".log") as log, Machine(mem="64M") as machine:
            install_platform_devices(machine, serial=f"file:{log.name}")
            (attachment,) = install_virtio_devices(machine, disks=[str(image)], iothreads=True)
            attachment.io.stop()
            machine.load(elf, cmdline=workload.cmdline)
            status = machine.run(timeout=180).exit_status
            if status != SUCCESS_STATUS:
                raise RuntimeError(f"exit status {status}")
            results.append(parse_result(workload, Path(log.name).read_text()))
    return results


def cell(values: list[float] | None) -> str:
    if not values:
        return "n/a"
    digits = 2 if statistics.median(values) < 100 else 0
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def median(vmm: Vmm, workload: str) -> float | None:
    values = vmm.results.get(workload)
    return statistics.median(values) if values else None


def print_table(vmms: list[Vmm], loads: list[Workload], parked: list[float] | None) -> None:
    header = ["workload", "unit", *[vmm.name for vmm in vmms]]
    rows = [[w.name, w.unit, *[cell(vmm.results.get(w.name)) for vmm in vmms]] for w in loads]
    if parked:
        row = ["notify, I/O thread parked", "us/notification", cell(parked)]
        rows.append(row + ["-"] * (len(header) - len(row)))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(c.ljust(width) for c, width in zip(row, widths, strict=True)))
        return
    table = Table(title="virtio-blk, guest-timed: median (min-max)")
    for column in header:
        table.add_column(column, justify="left" if column in ("workload", "unit") else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(110, shutil.get_terminal_size().columns)).print(table)


def print_ratios(io: Vmm, exit_path: Vmm, qemu: Vmm | None, loads: list[Workload]) -> None:
    notify_io, notify_exit = median(io, "notify"), median(exit_path, "notify")
    if notify_io and notify_exit:
        ratio = notify_exit / notify_io
        verdict = "PASS" if ratio >= TARGET_NOTIFY_RATIO else "FAIL"
        print(
            f"{verdict}: a notification costs the vCPU {notify_io:.2f} us on the I/O-thread path and "
            f"{notify_exit:.2f} us on the exit path: {ratio:.1f}x cheaper "
            f"(target >= {TARGET_NOTIFY_RATIO:g}x)"
        )
    for w in loads:
        if w.name == "notify":
            continue
        a, b = median(io, w.name), median(exit_path, w.name)
        if a and b:
            print(f"       {w.name}: I/O thread / exit path = {a / b:.2f}x")
    if qemu is None or qemu.error is not None:
        print("SKIP: vmscope 4 KiB request rate >= QEMU's (QEMU not measured)")
        return
    for w in loads:
        ours, theirs = median(io, w.name), median(qemu, w.name)
        if ours is None or theirs is None:
            continue
        ratio = ours / theirs
        better = ratio >= 1 if w.higher_is_better else ratio <= 1
        if w.name in TARGET_RATE_WORKLOADS:
            verdict = "PASS" if better else "FAIL"
            print(
                f"{verdict}: vmscope {w.name} request rate {ours:.2f} kreq/s vs QEMU {theirs:.2f} kreq/s: "
                f"{ratio:.2f}x (target >= 1x)"
            )
        else:
            print(f"       {w.name}: vmscope (I/O thread) / QEMU = {ratio:.2f}x ({w.unit})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="virtio_io", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each VMM and workload (default 5)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every loop count (default 1)")
    parser.add_argument("--no-qemu", action="store_true", help="leave QEMU out even when it is installed")
    parser.add_argument("--no-parked", action="store_true", help="skip the parked-I/O-thread diagnostic")
    parser.add_argument(
        "--compare-src",
        type=Path,
        metavar="DIR",
        help="also run the I/O-thread path of the vmscope package under DIR (e.g. an older checkout's src)",
    )
    parser.add_argument(
        "--workloads",
        metavar="NAMES",
        help="comma-separated workloads to run (default: all of notify,4k-qd1,4k-qd16,1m-seq)",
    )
    parser.add_argument(
        "--no-poll-variant", action="store_true", help="leave out the I/O-thread run with polling turned off"
    )
    args = parser.parse_args(argv)

    try:
        elf = build_runtime_guest("virtio-driver", [GUEST_SOURCE], cflags=("-Wextra", "-Werror"))
    except VmscopeError as error:
        print(f"virtio_io: cannot build the guest: {error}", file=sys.stderr)
        return 1
    io, exit_path = vmscope_vmm(True), vmscope_vmm(False)
    vmms = [io, exit_path]
    no_polling = None
    if not args.no_poll_variant:
        no_polling = vmscope_vmm(True, polling=False)
        vmms.insert(1, no_polling)
    compared = None
    if args.compare_src is not None:
        compared = vmscope_vmm(True)
        compared.name = f"vmscope {args.compare_src} (I/O thread)"
        compared.env = {"PYTHONPATH": str(args.compare_src.resolve())}
        vmms.insert(0, compared)
    qemu: Vmm | None = None
    binary = shutil.which(QEMU_BINARY)
    if binary is None and not args.no_qemu:
        print(f"QEMU: not installed ({QEMU_BINARY} not on PATH; apt-get install qemu-system-x86)")
    elif binary is not None and not args.no_qemu:
        qemu = qemu_vmm(binary)
        vmms.append(qemu)
    loads = workloads(args.scale)
    if args.workloads:
        wanted = [name.strip() for name in args.workloads.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {load.name for load in loads})
        if unknown:
            print(f"virtio_io: --workloads: unknown workload {', '.join(unknown)}", file=sys.stderr)
            return 2
        loads = [load for load in loads if load.name in wanted]
    print(describe_backend())
    print(f"guest: {elf}")

    with tempfile.TemporaryDirectory(prefix="virtio-io-") as directory:
        image = Path(directory) / "disk.img"
        with image.open("wb") as file:  # real data, so reads are not served from holes
            block = bytes(range(256)) * 4096
            for _ in range(IMAGE_BYTES // len(block)):
                file.write(block)
        for repetition in range(args.repeat):
            for workload in loads:
                for vmm in vmms:
                    if vmm.error is not None:
                        continue
                    try:
                        value = run_once(vmm, elf, image, workload)
                    except RuntimeError as error:
                        vmm.error = f"{workload.name}: {error}"
                        print(f"{vmm.name}: not available ({vmm.error})")
                        continue
                    vmm.results.setdefault(workload.name, []).append(value)
            print(f"round {repetition + 1}/{args.repeat} done", file=sys.stderr)
        parked = None
        notify = next((load for load in loads if load.name == "notify"), None)
        if not args.no_parked and notify is not None:
            try:
                parked = parked_iothread_notify_us(elf, image, notify, args.repeat)
            except (RuntimeError, VmscopeError) as error:
                print(f"parked I/O thread diagnostic: not available ({error})")
    print_table(vmms, loads, parked)
    print_ratios(io, exit_path, qemu, loads)
    if compared is not None:
        for w in loads:
            a, b = median(io, w.name), median(compared, w.name)
            if a and b:
                print(f"       {w.name}: I/O thread, this checkout / {args.compare_src} = {a / b:.2f}x")
    if no_polling is not None:
        for w in loads:
            a, b = median(io, w.name), median(no_polling, w.name)
            if a and b:
                print(f"       {w.name}: I/O thread with / without polling = {a / b:.2f}x")
    if parked:
        print(
            "       notify with the I/O thread parked (KVM's ioeventfd alone): "
            f"{statistics.median(parked):.2f} us; the rest of the I/O-thread figure is waking the thread"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
