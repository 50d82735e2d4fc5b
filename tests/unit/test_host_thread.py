"""Kernel-visible thread names and timer slack (Linux prctl)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from vmscope.host_thread import HOST_NAME_BYTES, name_host_thread, set_timer_slack

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")


def _in_thread(action: object, name: str = "py-name") -> tuple[object, str, str]:
    """Run ``action`` on a new thread; its result, then the thread's comm and timerslack_ns."""
    seen: list[tuple[object, str, str]] = []

    def body() -> None:
        result = action()  # type: ignore[operator]
        tid = threading.get_native_id()
        slack_file = Path(f"/proc/{tid}/timerslack_ns")  # a thread id works as a pid in /proc
        try:
            slack = slack_file.read_text().strip()
        except OSError:
            slack = ""
        seen.append((result, Path(f"/proc/self/task/{tid}/comm").read_text().strip(), slack))

    thread = threading.Thread(target=body, name=name)
    thread.start()
    thread.join()
    return seen[0]


def test_the_kernel_sees_the_given_name() -> None:
    assert _in_thread(lambda: name_host_thread("io:virtio-blk0"))[:2] == (True, "io:virtio-blk0")


def test_default_is_the_python_thread_name_cut_to_15_bytes() -> None:
    result, comm, _ = _in_thread(name_host_thread, name="io:virtio-console0")
    assert result is True and comm == "io:virtio-console0"[:HOST_NAME_BYTES] == "io:virtio-conso"


def test_timer_slack_is_per_thread() -> None:
    _, _, slack = _in_thread(lambda: set_timer_slack(1_000))
    if not slack:
        pytest.skip("/proc/<tid>/timerslack_ns is not readable here")
    assert slack == "1000"
