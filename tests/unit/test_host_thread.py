"""Kernel-visible thread names and timer slack (Linux prctl)."""

from __future__ import annotations

import threading
import time
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


def test_watchers_see_running_named_threads_at_once_and_new_ones_as_they_start() -> None:
    from vmscope.host_thread import watch_host_threads

    release = threading.Event()
    early = threading.Thread(target=lambda: (name_host_thread("io:early"), release.wait(5)))
    early.start()
    seen: list[tuple[str, int, int]] = []
    try:
        while not any(t.name == early.name for t in threading.enumerate()):
            pass
        time.sleep(0.05)  # let it name itself
        unwatch = watch_host_threads(lambda name, tid: seen.append((name, tid, threading.get_native_id())))
        late_ids: list[int] = []
        late = threading.Thread(
            target=lambda: (name_host_thread("vcpu9"), late_ids.append(threading.get_native_id()))
        )
        late.start()
        late.join()
        unwatch()
        after = threading.Thread(target=lambda: name_host_thread("vcpu10"))
        after.start()
        after.join()
    finally:
        release.set()
        early.join()
    names = [name for name, _, _ in seen]
    assert "io:early" in names and "vcpu9" in names and "vcpu10" not in names
    (late_call,) = [call for call in seen if call[0] == "vcpu9"]
    assert late_call[1] == late_call[2] == late_ids[0]  # called on the new thread, with its own id
