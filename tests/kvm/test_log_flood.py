"""A guest that misprograms a device in a loop cannot flood the host's log or stall the VMM on it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from vmscope.control import ControlClient
from vmscope.virtio.attach import VIRTIO_MMIO_BASE

SRC = str(Path(__file__).resolve().parents[2] / "src")
STATUS_REGISTER = 0x70  # virtio-mmio device status


def status_flood_guest(path: Path, rounds: int | None) -> Path:
    """32-bit flat code: write status 3 then 1 to virtio-mmio slot 0 (each 1 "clears bits without a
    reset", which the device warns about), ``rounds`` times (forever if None), then debug-exit 0."""
    code = b"\xbf" + VIRTIO_MMIO_BASE.to_bytes(4, "little")  # mov edi, base
    if rounds is not None:
        code += b"\xb9" + rounds.to_bytes(4, "little")  # mov ecx, rounds
    body = b"\xc7\x47" + bytes([STATUS_REGISTER]) + (3).to_bytes(4, "little")  # mov dword [edi+0x70], 3
    body += b"\xc7\x47" + bytes([STATUS_REGISTER]) + (1).to_bytes(4, "little")  # mov dword [edi+0x70], 1
    if rounds is not None:
        body += b"\x49"  # dec ecx
        body += b"\x75" + bytes([(-(len(body) + 2)) & 0xFF])  # jnz body
        body += b"\x66\xba\xf4\x00\xb0\x00\xee\xf4"  # mov dx, 0xf4; mov al, 0; out dx, al; hlt
    else:
        body += b"\xeb" + bytes([(-(len(body) + 2)) & 0xFF])  # jmp body
    path.write_bytes(code + body)
    return path


def vmscope_command(guest: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vmscope", "stat", "--", "--flat", str(guest), "--mode", "protected",
            "--load-address", "0x100000", "--rng", "--serial", "none", *extra]  # fmt: skip


ENV = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}


def test_a_device_warning_loop_gives_a_bounded_log_and_counts_in_stat(tmp_path: Path) -> None:
    guest = status_flood_guest(tmp_path / "flood.bin", rounds=5000)
    result = subprocess.run(vmscope_command(guest), capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 1, result.stderr  # debug-exit value 0: status (0 << 1) | 1
    warnings = [line for line in result.stderr.splitlines() if "cleared status bits" in line]
    assert 1 <= len(warnings) <= 30, len(warnings)  # 5000 causes, ~10 per 5 s let through
    assert "suppressed (rate limit)" in result.stderr
    counts_line = next(line for line in result.stdout.splitlines() if line.startswith("log lines held back:"))
    suppressed = int(counts_line.split(":")[1].split()[0])
    assert suppressed >= 5000 - len(warnings)


def test_pause_and_quit_work_while_nobody_reads_stderr(tmp_path: Path) -> None:
    guest = status_flood_guest(tmp_path / "flood-forever.bin", rounds=None)
    socket_path = tmp_path / "control.sock"
    # rate limit or not, this guest would fill a 64 KiB pipe: stderr is a pipe that is never read
    process = subprocess.Popen(
        vmscope_command(guest, "--control", str(socket_path)), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, env={**ENV, "VMSCOPE_LOG_BURST": "0"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            assert process.poll() is None, "vmscope exited early"
            assert time.monotonic() < deadline, "no control socket"
            time.sleep(0.05)
        time.sleep(2)  # by now the pipe is full and the writer thread sits in write(2)
        with ControlClient(socket_path, timeout=10) as client:
            assert client.call("pause") == {"state": "paused"}
            client.call("resume")
            client.call("quit")
        assert process.stderr is not None
        os.set_blocking(process.stderr.fileno(), False)
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            process.stderr.read()  # drain so the final lines can be written
            time.sleep(0.05)
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_the_profile_keeps_the_held_back_counts(tmp_path: Path) -> None:
    from vmscope.profiler import profile_file

    guest = status_flood_guest(tmp_path / "flood.bin", rounds=2000)
    out = tmp_path / "flood.vmprof"
    command = [sys.executable, "-m", "vmscope", "record", "-o", str(out), "--", "--flat", str(guest),
               "--mode", "protected", "--load-address", "0x100000", "--rng", "--serial", "none"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 1, result.stderr
    extra = profile_file.load(out).metadata.extra
    assert int(extra["log_lines_suppressed"]) >= 2000 - 30
    assert extra["log_lines_dropped"] == "0"
