"""The instructions vmscope's fallback emulator completes, seen through the profiler and ``vmscope
stat``: the guest (guest_src/emulate.c) runs ``clac`` in a loop in guest_main, which the host's
KVM cannot emulate at CPL0 on software-virtualization hosts (kvm_pvm)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmscope.guest.build import build_runtime_guest
from vmscope.kvm.system import detect_backend
from vmscope.profiler import profile_file
from vmscope.profiler.emulated_table import emulated_rows
from vmscope.profiler.export.chrome_trace import chrome_trace_document
from vmscope.profiler.model import EMULATED_EVENT
from vmscope.profiler.recorder import ProfileRecorder
from vmscope.profiler.report import report_text
from vmscope.vmm.machine import Machine
from vmscope.vmm.platform import install_platform_devices

GUEST_SRC = Path(__file__).parent / "guest_src" / "emulate.c"
STATUS_PASS = 33
pytestmark = pytest.mark.skipif(
    detect_backend() != "kvm_pvm", reason="this host's KVM runs clac without emulation failures"
)


@pytest.fixture(scope="module")
def emulate_guest() -> Path:
    return build_runtime_guest("emulate", [GUEST_SRC])


def test_recorded_profile_names_clac_with_its_count(emulate_guest: Path, tmp_path: Path) -> None:
    loops = 300
    with Machine(mem="64M") as machine:
        install_platform_devices(machine, serial=f"file:{tmp_path / 'serial.log'}")
        machine.load(emulate_guest, cmdline=f"only=fwait clac={loops}")
        recorder = ProfileRecorder(machine, frequency_hz=499)
        recorder.start()
        result = machine.run(timeout=60)
        profile = recorder.finish()
        completed = machine.emulated_instructions
    assert result.exit_status == STATUS_PASS, result.reason
    profile.compact_symbols()
    path = tmp_path / "emulate.vmprof"
    profile_file.save(profile, path)
    loaded = profile_file.load(path)

    clac = [row for row in emulated_rows(loaded) if row.mnemonic == "clac"]
    assert [row.count for row in clac] == [loops]
    assert clac[0].symbol is not None and clac[0].symbol.startswith("guest_main+"), clac[0]
    assert clac[0].total_ns > 0
    assert sum(entry.count for entry in loaded.emulated) == completed

    text = report_text(loaded)
    assert "Emulated by vmscope" in text
    assert f"{completed} instructions KVM could not emulate completed by vmscope" in text

    # the timeline's counter track adds up to every completion
    events = chrome_trace_document(loaded)["traceEvents"]
    track = [e for e in events if e["ph"] == "C" and e["name"] == f"vcpu0 {EMULATED_EVENT}"]
    assert track and sum(e["args"]["per interval"] for e in track) == completed


def test_stat_shows_the_emulated_table(emulate_guest: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    completed = subprocess.run(
        [sys.executable, "-m", "vmscope", "stat", "--events", "none", "--elf", str(emulate_guest),
         "--serial", "none", "--mem", "64M", "--cmdline", "only=clac_stac clac=50"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert completed.returncode == STATUS_PASS, completed.stderr
    lines = completed.stdout.splitlines()
    assert any(line.startswith("Emulated by vmscope") for line in lines), completed.stdout
    loop = [line for line in lines if "clac" in line and "guest_main+" in line]
    assert len(loop) == 1 and " 50 " in loop[0], completed.stdout
    assert "52 instructions KVM could not emulate completed by vmscope" in completed.stdout
    assert "vmscope completed 52 instructions KVM could not emulate" in completed.stderr
