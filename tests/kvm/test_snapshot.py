"""Snapshot and restore: a guest saved mid-run and continued in a new process ends as if it had
never stopped; damaged or mismatched snapshots are refused with status 2 before anything runs."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

import vmscope
from vmscope.guest.build import build_runtime_guest
from vmscope.snapshot import format as snapshot_format

SRC = str(Path(vmscope.__file__).resolve().parents[1])  # the vmscope these tests import
ENV = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}
GUEST_SRC = Path(__file__).parent / "guest_src"
DEMO = ("--cmdline", "iterations=60")
SECTOR, BLOCK, FILLER = 512, 4096, 0xEE


def vmscope_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmscope", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def comparable(output: str) -> list[str]:
    """Serial output without the line that reports elapsed TSC cycles (differs run to run)."""
    return [line for line in output.splitlines() if "TSC cycles" not in line]


def run_then_snapshot(
    tmp_path: Path,
    run_args: Sequence[str],
    *,
    after_output: str | None = None,
    after_s: float = 0.0,
    stop: bool = True,
) -> tuple[str, int, Path]:
    """Start `vmscope run`, wait for ``after_output`` on its stdout (or ``after_s``), snapshot it
    (with --stop, or letting it run on); returns (its stdout, its status, the snapshot)."""
    sock, snap, out = tmp_path / "vm.sock", tmp_path / "snap", tmp_path / "before.txt"
    with open(out, "w") as stdout:
        process = subprocess.Popen(
            [sys.executable, "-m", "vmscope", "run", "--control", str(sock), "--timeout", "60", *run_args],
            stdout=stdout, stderr=subprocess.PIPE, text=True, env=ENV,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not sock.exists() or (after_output is not None and after_output not in out.read_text()):
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline, "the guest never got to the snapshot point"
                time.sleep(0.01)
            time.sleep(after_s)
            answer = vmscope_cli("ctl", str(sock), "snapshot", str(snap), *(["--stop"] if stop else []))
            assert answer.returncode == 0, answer.stderr
            assert json.loads(answer.stdout)["stopped"] is stop
            status = process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return out.read_text(), status, snap


@pytest.fixture(scope="module")
def demo_reference() -> subprocess.CompletedProcess[str]:
    """The demo workload run without interruption (it powers off: status 0)."""
    result = vmscope_cli("run", *DEMO)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("cpus", [1, 2])
def test_demo_restored_in_a_new_process_ends_like_an_uninterrupted_run(
    demo_reference: subprocess.CompletedProcess[str], tmp_path: Path, cpus: int
) -> None:
    before, status, snap = run_then_snapshot(
        tmp_path, [*DEMO, "--cpus", str(cpus)], after_output="iteration 5:"
    )
    assert status == 0
    assert "demo: OK" not in before  # saved mid-workload
    after = vmscope_cli("run", "--restore", str(snap))
    assert after.returncode == demo_reference.returncode == 0, after.stderr
    assert "Traceback" not in after.stderr
    assert comparable(before + after.stdout) == comparable(demo_reference.stdout)
    # the RAM file is sparse: far less data than guest RAM
    memory = snapshot_format.memory_path(snap)
    assert memory.stat().st_size == 256 << 20
    assert memory.stat().st_blocks * 512 < 32 << 20


@pytest.mark.parametrize("source", ["pit", "lapic"])
def test_a_guest_counting_timer_ticks_goes_on_receiving_them_after_restore(
    tmp_path: Path, source: str
) -> None:
    guest = build_runtime_guest("timer", [GUEST_SRC / "timer.c"])
    run_args = ["--elf", str(guest), "--cmdline", f"source={source} hz=250"]
    before, status, snap = run_then_snapshot(tmp_path, run_args, after_s=0.7)
    assert status == 0
    assert "ticks in one RTC second" not in before
    after = vmscope_cli("run", "--restore", str(snap))
    assert after.returncode == 33, after.stdout + after.stderr  # 37 would mean no more interrupts
    ticks = int(after.stdout.split(" Hz programmed, ")[1].split()[0])
    assert ticks > 50  # a second of a 250 Hz timer, with room for a loaded host and the gap


def pattern(seed: int, offset: int, length: int) -> bytes:
    """What the virtio test guest writes: each 8-byte word at disk offset o holds (seed << 48) | o."""
    return b"".join(struct.pack("<Q", seed << 48 | o) for o in range(offset, offset + length, 8))


BLOCKS, SECTOR_START = 300, 16


def blk_writer(tmp_path: Path, seed: int) -> tuple[Path, list[str]]:
    """A filler-initialised 8 MiB image and the run arguments of the virtio test guest writing
    BLOCKS blocks of ``pattern(seed, ...)`` from SECTOR_START, flushing, and reading them back."""
    guest = build_runtime_guest(
        "virtio-driver", [GUEST_SRC / "virtio_driver.c"], cflags=("-Wextra", "-Werror")
    )
    image = tmp_path / "disk.img"
    image.write_bytes(bytes([FILLER]) * (8 << 20))
    cmdline = f"mode=blk blocks={BLOCKS} sector={SECTOR_START} seed={seed}"
    return image, ["--elf", str(guest), "--disk", str(image), "--cmdline", cmdline]


def test_blk_writes_in_flight_at_the_snapshot_all_land_exactly_once(tmp_path: Path) -> None:
    blocks, sector, seed = BLOCKS, SECTOR_START, 9
    image, run_args = blk_writer(tmp_path, seed)
    before, status, snap = run_then_snapshot(tmp_path, run_args, after_output="capacity")
    assert status == 0
    assert "blk: flushed" not in before  # saved while the writes were going on
    after = vmscope_cli("run", "--restore", str(snap))
    assert after.returncode == 33, after.stdout + after.stderr
    assert f"blk: read back {blocks} blocks OK" in after.stdout
    data = image.read_bytes()
    start = sector * SECTOR
    assert data[start : start + blocks * BLOCK] == pattern(seed, start, blocks * BLOCK)
    assert data[:start] == bytes([FILLER]) * start  # nothing written where the guest did not write
    assert data[start + blocks * BLOCK :] == bytes([FILLER]) * (len(data) - start - blocks * BLOCK)
    # the image has changed since the snapshot: restoring it again is refused
    again = vmscope_cli("run", "--restore", str(snap))
    assert again.returncode == 2
    assert f"disk {image} differs from the image the snapshot was taken with" in again.stderr


def test_a_snapshot_without_stop_lets_the_io_threads_run_on_under_the_sandbox(tmp_path: Path) -> None:
    """Saving quiesces the virtio I/O threads and starts them again from the control thread;
    under the default seccomp sandbox they load their own filters again and serve on."""
    blocks, sector, seed = BLOCKS, SECTOR_START, 5
    image, run_args = blk_writer(tmp_path, seed)
    before, status, snap = run_then_snapshot(
        tmp_path, ["--seccomp", "on", *run_args], after_output="capacity", stop=False
    )
    assert status == 33, before
    assert f"blk: read back {blocks} blocks OK" in before
    start = sector * SECTOR
    assert image.read_bytes()[start : start + blocks * BLOCK] == pattern(seed, start, blocks * BLOCK)
    assert (snap / "state").is_file()


def test_a_machine_with_virtio_net_and_console_restores(
    demo_reference: subprocess.CompletedProcess[str], tmp_path: Path
) -> None:
    console = tmp_path / "hvc0.log"
    run_args = [*DEMO, "--net", "udp:47311:47312", "--console", f"file:{console}", "--rng"]
    before, status, snap = run_then_snapshot(tmp_path, run_args, after_output="iteration 5:")
    assert status == 0
    after = vmscope_cli("run", "--restore", str(snap), "--console", f"file:{tmp_path / 'hvc0-after.log'}")
    assert after.returncode == 0, after.stderr
    # the same output, but for the virtio_mmio.device= entries appended to the command line
    assert [line for line in comparable(before + after.stdout) if not line.startswith("command line:")] == [
        line for line in comparable(demo_reference.stdout) if not line.startswith("command line:")
    ]


# -- refusals: status 2, one line, nothing started ------------------------------------------------


@pytest.fixture(scope="module")
def demo_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, status, snap = run_then_snapshot(tmp_path_factory.mktemp("snap"), DEMO, after_output="iteration 2:")
    assert status == 0
    return snap


def _damaged(snapshot: Path, tmp_path: Path, damage: str) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(snapshot, copy)
    state, memory = snapshot_format.state_path(copy), snapshot_format.memory_path(copy)
    data = bytearray(state.read_bytes())
    if damage == "corrupted":
        data[-10] ^= 0x55
        state.write_bytes(bytes(data))
    elif damage == "truncated":
        state.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "truncated-ram":
        os.truncate(memory, memory.stat().st_size - 4096)
    elif damage == "other-version":
        state.write_bytes(
            bytes(data).replace(f'"vmscope": "{vmscope.__version__}"'.encode(), b'"vmscope": "0.0.1"', 1)
        )
    elif damage == "missing-cpu-feature":
        sections = snapshot_format.read_state(copy)
        for vcpu in sections["vcpus"]:
            for row in vcpu["cpuid"]:
                if row[0] == 1 and row[1] == 0:
                    row[6] |= 1 << 30  # EDX bit 30: ia64, which no x86 host offers a guest
        snapshot_format.write_state(copy, sections)
    return copy


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("corrupted", "is corrupted (CRC-32 mismatch)"),
        ("truncated", "truncated"),
        ("truncated-ram", "RAM file is"),
        ("other-version", "snapshot was made by vmscope 0.0.1"),
        ("missing-cpu-feature", "this host lacks CPU feature(s) the snapshot's guest may use: ia64"),
    ],
)
def test_a_damaged_or_mismatched_snapshot_is_refused_with_status_2(
    demo_snapshot: Path, tmp_path: Path, damage: str, message: str
) -> None:
    result = vmscope_cli("run", "--restore", str(_damaged(demo_snapshot, tmp_path, damage)))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""  # the guest never ran


def test_machine_options_with_restore_and_a_different_disk_are_refused(
    demo_snapshot: Path, tmp_path: Path
) -> None:
    result = vmscope_cli("run", "--restore", str(demo_snapshot), "--mem", "512M")
    assert result.returncode == 2
    assert "--mem cannot be used with --restore" in result.stderr
    result = vmscope_cli("run", "--restore", str(tmp_path / "nothing-here"))
    assert result.returncode == 2
    assert "no such snapshot directory" in result.stderr
    assert "Traceback" not in result.stderr
