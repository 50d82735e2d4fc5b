"""The bundled demo guest boots with `vmscope run` and no arguments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.mark.guest_support(
    "bundled demo", devices="COM1 serial, debug-exit, MMIO (unclaimed)", detail="`vmscope run`, no arguments"
)
def test_vmscope_run_boots_the_demo_guest_to_its_success_status() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vmscope", "run", "--cmdline", "iterations=2"],
        capture_output=True, text=True, timeout=120, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr  # `vmscope run && echo ok` works
    out = result.stdout
    assert out.startswith("vmscope demo guest\n")
    assert 'hypervisor: "vmscope" (CPUID 0x40000000' in out
    assert 'command line: "iterations=2"' in out
    assert "demo: running workload at CPL3: 2 iteration(s)" in out
    assert "demo: OK" in out
    assert "guest powered off (ACPI S5) (exit status 0)" in result.stderr
