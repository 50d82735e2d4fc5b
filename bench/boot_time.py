#!/usr/bin/env python3
"""Linux boot time: wall time to the kernel's first banner line and to the point the run stops.

    python bench/boot_time.py [--kinds pvh,bzimage] [--repeat K] [--timeout S]

Boots Debian's cloud kernel (fetched and cached by tests/kernel_fixture.py) with an initramfs
from `vmscope initramfs`, on vmscope and on QEMU (`-M microvm`) when qemu-system-x86_64 is
installed, the same kernel, initrd, command line, memory and vCPUs for both. "pvh" boots the
uncompressed vmlinux through its PVH entry, "bzimage" the compressed bzImage through the Linux
boot protocol (its decompressor runs for minutes of emulated CPL0 code on a kvm_pvm host).

Milestones are timed from process start, on the serial console output: the "Linux version"
banner, the "Memory:" line, and the end of the run (on a kvm_pvm host the kernel stops with a
KVM emulation failure: vmscope exits with its diagnosis, QEMU prints "KVM internal error"
and pauses, which the benchmark takes as the end). Target (issue 3): vmscope no slower than QEMU.
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.kernel_fixture import debian_kernel, pvh_vmlinux  # noqa: E402

from vmscope.initramfs import build_initramfs  # noqa: E402

CMDLINE = "console=ttyS0 earlyprintk=serial nokaslr"
MILESTONES = {"banner": b"Linux version", "memory": b"Memory: "}
QEMU_END = b"KVM internal error"


def run_and_time(command: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, float]:
    """Milestone -> seconds since start, reading stdout and stderr as they arrive."""
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert process.stdout is not None and process.stderr is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    selector.register(process.stderr, selectors.EVENT_READ)
    seen: dict[str, float] = {}
    buffer = b""
    open_streams = 2
    while open_streams and time.monotonic() - start < timeout:
        for key, _ in selector.select(timeout=0.5):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                selector.unregister(key.fileobj)
                open_streams -= 1
                continue
            buffer = (buffer + chunk)[-65536:]
            now = time.monotonic() - start
            for name, marker in MILESTONES.items():
                if name not in seen and marker in buffer:
                    seen[name] = now
            if QEMU_END in buffer and "end" not in seen:
                seen["end"] = now
                process.kill()
    if process.poll() is None:
        process.kill()
    process.wait()
    seen.setdefault("end", time.monotonic() - start)
    return seen


def vmscope_command(kernel: Path, initrd: Path) -> list[str]:
    return [sys.executable, "-m", "vmscope", "run", "--kernel", str(kernel), "--initrd", str(initrd),
            "--cmdline", CMDLINE, "--mem", "512M", "--cpus", "2", "--serial", "stdio", "-q"]  # fmt: skip


def qemu_command(kernel: Path, initrd: Path) -> list[str]:
    return ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off", "-enable-kvm",
            "-cpu", "host,-arch-capabilities", "-m", "512M", "-smp", "2", "-nodefaults", "-no-reboot",
            "-nographic", "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", CMDLINE]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", default="pvh", help="comma-separated: pvh, bzimage (default pvh)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=400)
    args = parser.parse_args()
    lookup = debian_kernel()
    if lookup.path is None:
        print(f"no kernel: {lookup.reason}", file=sys.stderr)
        return 1
    images = {"bzimage": lookup.path}
    if "pvh" in args.kinds:
        vmlinux = pvh_vmlinux(lookup.path)
        if vmlinux.path is None:
            print(f"no vmlinux: {vmlinux.reason}", file=sys.stderr)
            return 1
        images["pvh"] = vmlinux.path
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    vmms = {"vmscope": vmscope_command}
    if shutil.which("qemu-system-x86_64"):
        vmms["QEMU microvm"] = qemu_command
    with tempfile.TemporaryDirectory() as scratch:
        initrd = Path(scratch) / "initrd.cpio.gz"
        build_initramfs(initrd, busybox=Path("/bin/busybox"), init_script=None)
        print(f"kernel {lookup.path.name}, cmdline {CMDLINE!r}, 512M, 2 vCPUs; seconds from process start")
        print(f"{'boot':<9}{'VMM':<14}{'banner':>9}{'Memory:':>9}{'end':>9}")
        results: dict[tuple[str, str], dict[str, float]] = {}
        for kind in args.kinds.split(","):
            for name, command in vmms.items():
                runs = [
                    run_and_time(command(images[kind], initrd), args.timeout, env) for _ in range(args.repeat)
                ]
                median = {
                    m: statistics.median(r.get(m, float("nan")) for r in runs)
                    for m in ("banner", "memory", "end")
                }
                results[(kind, name)] = median
                print(
                    f"{kind:<9}{name:<14}{median['banner']:>9.2f}{median['memory']:>9.2f}{median['end']:>9.2f}"
                )
        for kind in args.kinds.split(","):
            if (kind, "QEMU microvm") in results:
                ours, theirs = results[(kind, "vmscope")], results[(kind, "QEMU microvm")]
                for milestone in ("banner", "memory"):
                    ratio = ours[milestone] / theirs[milestone]
                    verdict = "PASS" if ratio <= 1.0 else "on par (within 2%)" if ratio <= 1.02 else "FAIL"
                    print(f"target {kind} {milestone}: vmscope/QEMU = {ratio:.2f}x {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
