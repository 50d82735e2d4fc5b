"""The shared attachment skeleton: clean-ups undone in reverse order, after the I/O thread stops."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from vmscope.virtio.attachment import VirtioAttachment


class FakeIo:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def stop(self) -> None:
        self.log.append("io stop")

    def close(self) -> None:
        self.log.append("io close")


class FakeTransport:
    def __init__(self, attachment: Fake) -> None:
        self.attachment = attachment

    def close(self) -> None:
        self.attachment._teardown()


@dataclass
class Fake(VirtioAttachment):
    device: Any
    log: list[str]
    io: Any = None
    transport: Any = None
    _cleanups: list[Callable[[], None]] = field(default_factory=list)

    def _quiesce(self) -> None:
        self.log.append("quiesce")


class Named:
    name = "fake0"


def test_teardown_stops_io_quiesces_then_undoes_in_reverse_even_past_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[str] = []
    attachment = Fake(Named(), log)
    attachment.io, attachment.transport = FakeIo(log), FakeTransport(attachment)
    fd = attachment.owned_eventfd()
    attachment.add_cleanup(lambda: log.append("first added"))

    def broken() -> None:
        raise RuntimeError("boom")

    attachment.add_cleanup(broken)
    attachment.add_cleanup(lambda: log.append("last added"))
    attachment.close()
    assert log == ["io stop", "quiesce", "last added", "first added", "io close"]
    assert "a teardown step failed" in caplog.text
    with pytest.raises(OSError):
        os.fstat(fd)  # the owned eventfd was closed
    attachment.close()  # a second close finds nothing left to undo
    assert log.count("first added") == 1
