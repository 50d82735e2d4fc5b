"""Ctrl-C at any moment of start-up (imports included) ends vmscope quietly with status 130."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")

# What the installed `vmscope` console script runs, with a timer that delivers SIGINT `delay`
# seconds after the interpreter's own start-up (which vmscope cannot guard) has finished.
ENTRY = """
import os, signal, sys, threading
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # not while the timer thread starts
timer = threading.Timer(float(sys.argv[1]), os.kill, (os.getpid(), signal.SIGINT))
timer.daemon = True
timer.start()
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
sys.argv[1:] = ["run", "--serial", "none", "--cmdline", "iterations=100"]
from vmscope.cli.main import main
sys.exit(main())
"""


def test_sigint_during_start_up_prints_no_traceback() -> None:
    for delay in (0.01, 0.015, 0.02, 0.025, 0.03, 0.05, 0.08, 0.12, 0.16, 0.2, 0.3, 0.5):
        process = subprocess.run(
            [sys.executable, "-c", ENTRY, str(delay)], capture_output=True, text=True, timeout=60,
            env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        assert "Traceback" not in process.stderr, (delay, process.stderr)
        assert process.returncode == 130, (delay, process.returncode, process.stderr)
