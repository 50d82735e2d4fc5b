"""Host perf counters on real vCPU and I/O threads, and through the record/report/stat CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmscope.guest.build import build_runtime_guest
from vmscope.host.perf_events import parse_events
from vmscope.profiler import profile_file
from vmscope.profiler.counters import CounterSession
from vmscope.profiler.model import Profile
from vmscope.vmm.machine import Machine
from vmscope.vmm.platform import install_platform_devices
from vmscope.vmm.virtio_setup import install_virtio_devices

GUEST_SRC = Path(__file__).parent / "guest_src" / "virtio_driver.c"
SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_vcpu_and_io_threads_get_their_own_software_counters(tmp_path: Path) -> None:
    guest = build_runtime_guest("virtio-driver", [GUEST_SRC], cflags=("-Wextra", "-Werror"))
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 << 20))
    session = CounterSession(parse_events("software"))
    with Machine(mem="64M") as machine:
        install_platform_devices(machine, serial="none")
        install_virtio_devices(machine, disks=(str(disk),), iothreads=True)
        machine.load(guest, cmdline="mode=blk blocks=64 sector=0 seed=3")
        session.start()
        started = time.perf_counter_ns()
        result = machine.run(timeout=60)
        session.stop()
        wall = time.perf_counter_ns() - started
    assert result.exit_status == 33, result
    counted = {c.thread: c for c in session.thread_counters()}
    assert set(counted) == {"vcpu0", "io:virtio-blk0"}, counted
    vcpu = counted["vcpu0"].values
    assert 0 < vcpu["task-clock"] <= wall
    io = counted["io:virtio-blk0"].values
    # the I/O thread sleeps in epoll between requests: little CPU, at least one wake-up per batch
    assert 0 < io["task-clock"] < vcpu["task-clock"] and io["context-switches"] >= 1
    assert session.notes == []


def test_record_stores_counters_and_report_html_and_trace_show_them(tmp_path: Path) -> None:
    output = tmp_path / "demo.vmprof"
    env_python = [sys.executable, "-m", "vmscope"]
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}
    recorded = subprocess.run(
        [*env_python, "record", "-o", str(output), "--events", "task-clock,context-switches,cycles", "-q"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert recorded.returncode == 0, recorded.stderr
    profile: Profile = profile_file.load(output)
    (vcpu,) = profile.counters
    assert vcpu.thread == "vcpu0" and 0 < vcpu.values["task-clock"] <= profile.metadata.duration_ns
    hardware_opened = "cycles:guest" in vcpu.values
    # either the host has a PMU and counted, or one line on stderr says why not
    note_lines = [line for line in recorded.stderr.splitlines() if "cycles:guest, cycles:host" in line]
    assert hardware_opened or len(note_lines) == 1, recorded.stderr
    text = subprocess.run(
        [*env_python, "report", str(output)], capture_output=True, text=True, env=env, timeout=60, check=True
    ).stdout
    assert "Host counters per thread" in text and "vcpu0" in text
    html = subprocess.run(
        [*env_python, "report", str(output), "--format", "html"],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "<h2>Host counters</h2>" in html and "task-clock ms" in html
    trace = json.loads(
        subprocess.run(
            [*env_python, "report", str(output), "--format", "chrome-trace"],
            capture_output=True, text=True, env=env, timeout=60, check=True,
        ).stdout
    )  # fmt: skip
    counters = [e for e in trace["traceEvents"] if e["ph"] == "C" and e["name"] == "vcpu0 task-clock"]
    assert counters and all(0 <= e["args"]["busy%"] <= 100.5 for e in counters)


@pytest.mark.parametrize("events", ["none", "task-clock"])
def test_stat_prints_the_counter_table_unless_told_not_to(events: str) -> None:
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "vmscope", "stat", "--events", events, "-q", "--", "--serial", "none"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert ("Host counters per thread" in done.stdout) == (events != "none")
