"""The CLI's quick exit (cli.main._exit): it skips the interpreter's tear-down only when nothing is
left to finish, so output and other threads' work are never lost."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def run_script(body: str) -> subprocess.CompletedProcess[str]:
    code = "from vmscope.cli.main import _exit\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_buffered_output_and_the_status_survive_the_quick_exit() -> None:
    result = run_script(
        """
        import sys
        sys.stdout.write("partial line without a newline")  # sits in the pipe's buffer
        print("to stderr", file=sys.stderr, end="")
        _exit(33)
        """
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        33,
        "partial line without a newline",
        "to stderr",
    )


def test_a_running_non_daemon_thread_is_waited_for(tmp_path: Path) -> None:
    marker = tmp_path / "finished"
    result = run_script(
        f"""
        import threading, time
        def work():
            time.sleep(0.3)
            open({str(marker)!r}, "w").close()
        threading.Thread(target=work).start()
        _exit(5)
        """
    )
    assert result.returncode == 5
    assert marker.exists()


def test_log_records_are_flushed_before_the_quick_exit() -> None:
    result = run_script(
        """
        import logging
        logging.basicConfig(stream=open("/dev/stderr", "w", buffering=1 << 16), format="%(message)s")
        logging.getLogger("t").warning("last words")
        _exit(0)
        """
    )
    assert (result.returncode, result.stderr.strip()) == (0, "last words")
