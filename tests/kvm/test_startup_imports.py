"""What a plain ``vmscope run`` imports: nothing that costs start-up time without being used
(issue 15). Measured with the interpreter's own import log, from a real run to power-off."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")

#: defining a dataclass exec()s generated source (0.5-0.9 ms each in a fresh process; 39 of them
#: were on this path), and importing dataclasses pulls in inspect; the records here are
#: NamedTuples or plain classes instead
NOT_ON_THE_RUN_PATH = ("dataclasses", "inspect", "subprocess", "elftools", "capstone", "rich")


def test_a_plain_run_imports_no_dataclasses_nor_other_unused_heavy_modules() -> None:
    process = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "vmscope.cli.main", "run", "--serial", "none",
         "--cmdline", "iterations=1"],
        capture_output=True, text=True, timeout=120, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in process.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    assert "vmscope.vmm.machine" in imported  # the log is the run's
    heavy = sorted(name for name in imported if name.split(".")[0] in NOT_ON_THE_RUN_PATH)
    assert heavy == []
