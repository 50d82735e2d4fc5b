"""Soak: N vmscope VMs at once with device traffic and virtio-blk I/O, and SIGKILLs of random VMs.

    python bench/soak.py [--vms 16] [--seconds 60] [--kill-every 1.0] [--blocks 16]

Each VM is `vmscope run` of the virtio test guest (tests/kvm/guest_src/virtio_driver.c) with its
own disk image, virtio-rng and a control socket, and the command line
`mode=rng,evil,blk blocks=B sector=S seed=K irq=1`: rng reads, a deliberately malformed queue that
makes the device need a reset (the guest resets and restarts it), then B 4 KiB writes with a
pattern unique to the run, a FLUSH ("blk: flushed"), and a read-back. A VM that ends is replaced by
a new one with a new seed and sector range; every `--kill-every` seconds a random running VM gets
SIGKILL. After each VM ends, whatever it reported flushed is checked on its image.

Reports: VMs started / finished / killed, exits handled (from the control socket's query-stats,
polled while the VMs run), block requests completed, flushed blocks verified (any mismatch is a
lost write), host memory per VM (VmRSS), and what is left behind at the end (processes, sockets).
Not a test: it prints measurements and exits 0 unless data was lost or something leaked.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from vmscope.guest.build import build_runtime_guest  # noqa: E402

GUEST_SOURCE = REPO / "tests" / "kvm" / "guest_src" / "virtio_driver.c"
BLOCK = 4096
IMAGE_BYTES = 4 << 20
FLUSHED = re.compile(rb"blk: flushed (\d+) blocks from sector (\d+)")


def pattern(seed: int, offset: int, length: int) -> bytes:
    """What the guest writes: each 8-byte word at disk offset o holds (seed << 48) | o."""
    return b"".join(struct.pack("<Q", seed << 48 | o) for o in range(offset, offset + length, 8))


@dataclass
class Vm:
    slot: int
    seed: int
    sector: int
    blocks: int
    process: subprocess.Popen[bytes]
    control: Path
    output: bytearray = field(default_factory=bytearray)
    exits: int = 0
    rss_kib: list[int] = field(default_factory=list)
    killed: bool = False


@dataclass
class Totals:
    started: int = 0
    finished: int = 0
    killed: int = 0
    failed: int = 0
    exits: int = 0
    requests: int = 0
    verified_blocks: int = 0
    lost_blocks: int = 0
    rss_kib: list[int] = field(default_factory=list)


def start_vm(slot: int, seed: int, guest: Path, image: Path, workdir: Path, blocks: int) -> Vm:
    sector = random.randrange(0, IMAGE_BYTES // 512 - blocks * 8, 8)
    control = workdir / f"vm{slot}-{seed}.sock"
    command = [
        sys.executable, "-m", "vmscope", "run", "--elf", str(guest), "--mem", "64M",
        "--cmdline", f"mode=rng,evil,blk blocks={blocks} sector={sector} seed={seed} irq=1",
        "--disk", str(image), "--rng", "--control", str(control), "--timeout", "60",
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert process.stdout is not None
    os.set_blocking(process.stdout.fileno(), False)
    return Vm(slot, seed, sector, blocks, process, control)


def drain(vm: Vm) -> None:
    assert vm.process.stdout is not None
    with contextlib.suppress(BlockingIOError, ValueError):
        while chunk := vm.process.stdout.read(65536):
            vm.output += chunk


def poll_stats(vm: Vm) -> None:
    """Exits so far (query-stats over the control socket) and the VMM's resident memory."""
    with contextlib.suppress(OSError, ValueError):
        status = Path(f"/proc/{vm.process.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        if match:
            vm.rss_kib.append(int(match.group(1)))
    if not vm.control.exists():
        return
    import socket

    with contextlib.suppress(OSError, ValueError, KeyError), socket.socket(socket.AF_UNIX) as client:
        client.settimeout(1.0)
        client.connect(str(vm.control))
        client.sendall(b'{"command": "query-stats"}\n')
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = client.recv(1 << 20)
            if not chunk:
                break
            reply += chunk
        result = json.loads(reply)["result"]
        vm.exits = max(vm.exits, sum(v["exits"] for v in result["vcpus"]))


def verify(vm: Vm, image: Path, totals: Totals) -> None:
    """Whatever the guest saw flushed must be on the image, whatever happened to the VMM after."""
    match = FLUSHED.search(bytes(vm.output))
    if match is None:
        return
    blocks, sector = int(match.group(1)), int(match.group(2))
    offset = sector * 512
    with open(image, "rb") as stream:
        stream.seek(offset)
        data = stream.read(blocks * BLOCK)
    for block in range(blocks):
        expected = pattern(vm.seed, offset + block * BLOCK, BLOCK)
        if data[block * BLOCK : (block + 1) * BLOCK] == expected:
            totals.verified_blocks += 1
        else:
            totals.lost_blocks += 1
    totals.requests += blocks + 1  # the writes and the flush
    if b"blk: read back" in vm.output:
        totals.requests += blocks


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vms", type=int, default=16, help="VMs running at once (default 16)")
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="how long to keep replacing VMs (default 60)"
    )
    parser.add_argument("--kill-every", type=float, default=1.0, help="SIGKILL a random VM this often (s)")
    parser.add_argument("--blocks", type=int, default=16, help="4 KiB blocks each VM writes (default 16)")
    parser.add_argument("--seed", type=int, default=1, help="random seed for kills and sectors")
    args = parser.parse_args()
    random.seed(args.seed)

    guest = build_runtime_guest("virtio-driver", [GUEST_SOURCE], cflags=("-Wextra", "-Werror"))
    available_before = _mem_available_kib()
    totals = Totals()
    seeds = iter(range(1, 1 << 16))
    with tempfile.TemporaryDirectory(prefix="vmscope-soak-") as directory:
        workdir = Path(directory)
        images = []
        for slot in range(args.vms):
            image = workdir / f"disk{slot}.img"
            image.write_bytes(b"\xee" * IMAGE_BYTES)
            images.append(image)
        running: dict[int, Vm] = {}
        deadline = time.monotonic() + args.seconds
        next_kill = time.monotonic() + args.kill_every
        next_poll = 0.0
        while time.monotonic() < deadline or running:
            now = time.monotonic()
            if now < deadline:
                for slot in range(args.vms):
                    if slot not in running:
                        running[slot] = start_vm(slot, next(seeds), guest, images[slot], workdir, args.blocks)
                        totals.started += 1
            for vm in running.values():
                drain(vm)
            if now >= next_poll:
                for vm in running.values():
                    poll_stats(vm)
                next_poll = now + 0.5
            if now >= next_kill and now < deadline and running:
                victim = random.choice(list(running.values()))
                poll_stats(victim)
                victim.process.send_signal(signal.SIGKILL)
                victim.killed = True
                next_kill = now + args.kill_every
            for slot, vm in list(running.items()):
                if vm.process.poll() is None:
                    continue
                drain(vm)
                del running[slot]
                totals.exits += vm.exits
                totals.rss_kib.extend(vm.rss_kib[-1:])
                if vm.killed:
                    totals.killed += 1
                elif vm.process.returncode == 33:
                    totals.finished += 1
                else:
                    totals.failed += 1
                    print(f"vm seed {vm.seed}: exit status {vm.process.returncode}", file=sys.stderr)
                verify(vm, images[slot], totals)
                with contextlib.suppress(OSError):
                    vm.control.unlink()  # a SIGKILLed VMM cannot remove its own socket
            time.sleep(0.05)
        leftover_sockets = sorted(p.name for p in workdir.glob("*.sock"))
    leftover_processes = _vmscope_children()
    available_after = _mem_available_kib()

    print(
        f"VMs: {args.vms} at once for {args.seconds:g} s; started {totals.started}, "
        f"finished {totals.finished}, SIGKILLed {totals.killed}, failed {totals.failed}"
    )
    print(f"exits handled (polled): {totals.exits}; block requests completed: {totals.requests}")
    print(f"flushed blocks verified after the VM ended: {totals.verified_blocks}, lost: {totals.lost_blocks}")
    if totals.rss_kib:
        median, peak = statistics.median(totals.rss_kib) / 1024, max(totals.rss_kib) / 1024
        print(f"host memory per VM (VmRSS, last sample): median {median:.1f} MiB, max {peak:.1f} MiB")
    print(
        f"left behind: {len(leftover_processes)} vmscope processes, {len(leftover_sockets)} sockets; "
        f"MemAvailable {(available_after - available_before) / 1024:+.0f} MiB over the run"
    )
    return 1 if totals.lost_blocks or leftover_processes or totals.failed else 0


def _mem_available_kib() -> int:
    match = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return int(match.group(1)) if match else 0


def _vmscope_children() -> list[int]:
    """Our own child processes still alive (a SIGKILLed VMM must not leave helpers behind)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid():  # ppid
                children.append(int(entry.name))
    return children


if __name__ == "__main__":
    raise SystemExit(main())
