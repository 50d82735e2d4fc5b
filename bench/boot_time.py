#!/usr/bin/env python3
"""Linux boot time: wall time from process start to each boot milestone, up to a shell and power-off.

    python bench/boot_time.py [--kinds pvh,bzimage] [--repeat K] [--timeout S] [--cmdline-extra TEXT]

Boots Debian's cloud kernel (fetched and cached by tests/kernel_fixture.py) with an initramfs
from `vmscope initramfs`, on vmscope and on QEMU (`-M microvm`) when qemu-system-x86_64 is
installed, the same kernel, initrd, command line, memory and vCPUs for both. "pvh" boots the
uncompressed vmlinux through its PVH entry, "bzimage" the compressed bzImage through the Linux
boot protocol (its decompressor runs for minutes of emulated CPL0 code on a kvm_pvm host).

Milestones are timed from process start, on the serial console output: the "Linux version"
banner, the "Memory:" line, "Run /init", the initramfs shell's ready line, and the power-off
(the benchmark types `poweroff -f` at the shell; "end" is the process exit). For vmscope each
milestone also shows how many instructions its fallback emulator had completed for KVM by then
(from the control socket's query-status), and the run's wall time in it comes from the final
summary. QEMU on a kvm_pvm host stops at the first instruction KVM cannot emulate ("KVM internal
error"), which the benchmark takes as its end. Targets: vmscope no slower than QEMU to the
banner (issue 3); a first boot to the shell within 10 minutes on kvm_pvm (issue 16).
"""

from __future__ import annotations

import argparse
import json
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

from vmscope.initramfs import READY_MARKER, build_initramfs  # noqa: E402

CMDLINE = "console=ttyS0 earlyprintk=serial nokaslr"
MILESTONES = {
    "banner": b"Linux version",
    "memory": b"Memory: ",
    "init": b"Run /init",
    "shell": READY_MARKER.encode(),
    "poweroff": b"reboot: Power down",
}
QEMU_END = b"KVM internal error"
SHELL_TARGET_S = 600


def emulated_so_far(control: Path | None) -> int | None:
    """Instructions vmscope's fallback completed so far (None for QEMU or when unreachable)."""
    if control is None:
        return None
    answer = subprocess.run(
        [sys.executable, "-m", "vmscope", "ctl", str(control), "query-status"],
        capture_output=True, text=True, timeout=60, check=False,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
    )  # fmt: skip
    try:
        return int(json.loads(answer.stdout)["emulated_instructions"])
    except (ValueError, KeyError, TypeError):
        return None


def run_and_time(
    command: list[str], timeout: float, env: dict[str, str] | None = None, control: Path | None = None
) -> tuple[dict[str, float], dict[str, int]]:
    """Milestone -> seconds since start (and emulated instructions by then), reading stdout and
    stderr as they arrive; types `poweroff -f` once the initramfs shell is ready."""
    start = time.monotonic()
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    emulated: dict[str, int] = {}
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
                    count = emulated_so_far(control)
                    if count is not None:
                        emulated[name] = count
                    if name == "shell":
                        process.stdin.write(b"poweroff -f\n")
                        process.stdin.flush()
            if QEMU_END in buffer and "end" not in seen:
                seen["end"] = now
                process.kill()
    if process.poll() is None:
        process.kill()
    process.wait()
    seen.setdefault("end", time.monotonic() - start)
    return seen, emulated


def vmscope_command(kernel: Path, initrd: Path, cmdline: str, control: Path | None) -> list[str]:
    command = [sys.executable, "-m", "vmscope", "run", "--kernel", str(kernel), "--initrd", str(initrd),
               "--cmdline", cmdline, "--mem", "512M", "--cpus", "2", "--serial", "stdio"]  # fmt: skip
    return [*command, "--control", str(control)] if control is not None else command


def qemu_command(kernel: Path, initrd: Path, cmdline: str, control: Path | None) -> list[str]:
    return ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off", "-enable-kvm",
            "-cpu", "host,-arch-capabilities", "-m", "512M", "-smp", "2", "-nodefaults", "-no-reboot",
            "-nographic", "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", cmdline]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", default="pvh", help="comma-separated: pvh, bzimage (default pvh)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--cmdline-extra", default="", help="appended to the kernel command line")
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
    cmdline = f"{CMDLINE} {args.cmdline_extra}".strip()
    names = ("banner", "memory", "init", "shell", "poweroff", "end")
    with tempfile.TemporaryDirectory() as scratch:
        initrd = Path(scratch) / "initrd.cpio.gz"
        build_initramfs(initrd, busybox=Path("/bin/busybox"), init_script=None)
        print(f"kernel {lookup.path.name}, cmdline {cmdline!r}, 512M, 2 vCPUs; seconds from process start")
        print(f"{'boot':<9}{'VMM':<14}" + "".join(f"{name:>10}" for name in names))
        results: dict[tuple[str, str], dict[str, float]] = {}
        for kind in args.kinds.split(","):
            for name, command in vmms.items():
                runs = []
                for index in range(args.repeat):
                    control = Path(scratch) / f"vm{index}.ctl" if name == "vmscope" else None
                    runs.append(
                        run_and_time(
                            command(images[kind], initrd, cmdline, control), args.timeout, env, control
                        )
                    )
                median = {m: statistics.median(r[0].get(m, float("nan")) for r in runs) for m in names}
                results[(kind, name)] = median
                print(f"{kind:<9}{name:<14}" + "".join(f"{median[m]:>10.1f}" for m in names))
                if name == "vmscope":
                    counts = {m: statistics.median(r[1].get(m, -1) for r in runs) for m in names[:-1]}
                    print(f"{'':<9}{'  emulated':<14}" + "".join(f"{counts[m]:>10.0f}" for m in names[:-1]))
                    shell = median["shell"]
                    verdict = "PASS" if shell <= SHELL_TARGET_S else "FAIL"
                    print(
                        f"target {kind} boot to the shell <= {SHELL_TARGET_S} s: {shell:.0f} s {verdict}"
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
