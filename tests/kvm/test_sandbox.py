"""The seccomp sandbox: a forbidden system call from a vCPU thread stops vmscope with a clear message;
``log`` lets it through; the CLI runs real guests with the sandbox on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vmscope.sandbox import FORBIDDEN_CALL_STATUS, libseccomp

SRC = str(Path(__file__).resolve().parents[2] / "src")
ENV = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}

pytestmark = pytest.mark.skipif(not libseccomp.available(), reason="libseccomp.so.2 is not installed")

# A device model that, when the demo guest writes its phase marker, makes a call no vCPU thread needs.
SCRIPT = """
import os, sys, vmscope
from vmscope import sandbox
from vmscope.guest.build import demo_guest

sandbox.configure(sys.argv[1])

class Intruder(vmscope.Device):
    name = "intruder"
    def read(self, offset, size):
        return b"\\0" * size
    def write(self, offset, data):
        if sys.argv[2] == "open":
            os.close(os.open(sys.argv[3], os.O_WRONLY | os.O_CREAT, 0o600))
        else:
            os.execv("/bin/true", ["true"])
        print("the call went through", flush=True)

with vmscope.Machine(mem="64M") as vm:
    vmscope.install_platform_devices(vm, serial="none")
    vm.add_pio_device(0x510, 0x10, Intruder())
    vm.load(demo_guest(), cmdline="iterations=1")
    print(vm.run(timeout=60).reason)
"""


def run_script(mode: str, call: str, new_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, call, str(new_file)],
        capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip


@pytest.mark.parametrize(("call", "name"), [("open", "openat"), ("exec", "execve")])
def test_a_forbidden_call_from_a_vcpu_thread_is_stopped_with_a_message(
    call: str, name: str, tmp_path: Path
) -> None:
    result = run_script("on", call, tmp_path / "new-file")
    assert result.returncode == FORBIDDEN_CALL_STATUS, result.stderr
    assert f"thread 'vcpu0' made the forbidden system call {name}" in result.stderr
    assert "the call went through" not in result.stdout
    assert not (tmp_path / "new-file").exists()


def test_log_mode_lets_the_call_through(tmp_path: Path) -> None:
    result = run_script("log", "open", tmp_path / "new-file")
    assert result.returncode == 0, result.stderr
    assert "the call went through" in result.stdout
    assert "guest powered off" in result.stdout
    assert (tmp_path / "new-file").exists()


def test_cli_runs_the_demo_with_disk_rng_console_and_record_sandboxed(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    common = ["--seccomp", "on", "--disk", str(disk), "--rng", "--console", f"file:{tmp_path / 'hvc0.log'}"]
    run = subprocess.run(
        [sys.executable, "-m", "vmscope", "run", "--cmdline", "iterations=1", "--serial", "none", *common],
        capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    profile = tmp_path / "demo.vmprof"
    record = subprocess.run(
        [sys.executable, "-m", "vmscope", "record", "-o", str(profile), "--", "--cmdline", "iterations=1",
         "--serial", "none", *common],
        capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    assert record.returncode == 0, record.stderr
    assert profile.stat().st_size > 0
