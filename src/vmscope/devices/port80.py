"""The POST/diagnostic port 0x80: boot-progress markers, and the classic I/O delay port.

Firmware and kernels write progress codes here, and older code writes it only to waste
an I/O cycle. Writes are swallowed; each is kept as ``(time.monotonic_ns(), value)`` so a
profile can show when a guest passed each marker. The list keeps the first ``capacity``
writes (the boot markers are at the start) and counts the rest in :attr:`dropped`, so a
guest using the port as a delay loop cannot grow it without bound.

Reads return the last value written, zero-extended to the access size, as many chipsets
latch it (and as a POST card displays it); before any write they return all-ones, like
an undriven bus. That value is more useful to a guest reading back its own marker than
the all-ones an unclaimed port would give. :meth:`reset` forgets the latched value but
keeps the record, which describes the whole run.

Its writes are side-effect free, so the machine lets KVM queue them in the coalesced ring
(vmm.coalescing): they arrive here in order, in batches, at the guest's next exit, and the
time recorded is when vmscope delivered them, not when the guest wrote them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from vmscope.devices.base import Device, int_to_bytes
from vmscope.devices.state import StateReader
from vmscope.errors import ConfigError

POST_CODE_PORT = 0x80
DEFAULT_CAPACITY = 100_000


class Port80(Device):
    """Records writes to the POST code port; reads return the last value written."""

    # a read exits, and the VMM delivers queued writes before it handles any exit
    writes_are_side_effect_free = True

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        name: str = "port80",
    ) -> None:
        if capacity < 0:
            raise ConfigError(f"port80 record capacity must be >= 0, not {capacity}")
        self.name = name
        self.capacity = capacity
        self._clock_ns = clock_ns
        self._lock = threading.Lock()  # several vCPUs may write at once
        #: (time.monotonic_ns() at the write, value written), oldest first
        self.records: list[tuple[int, int]] = []
        #: writes seen after ``records`` was full
        self.dropped = 0
        self._last: int | None = None

    @property
    def last_value(self) -> int | None:
        """The value most recently written, or None before the first write."""
        return self._last

    def read(self, offset: int, size: int) -> bytes:
        last = self._last
        if last is None or size <= 0:
            return b"\xff" * size
        return int_to_bytes(last, size)

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        value = data[0] if len(data) == 1 else int.from_bytes(data, "little")
        stamp = self._clock_ns()
        with self._lock:
            self._last = value
            if len(self.records) < self.capacity:
                self.records.append((stamp, value))
            else:
                self.dropped += 1

    @property
    def marker_track(self) -> str:
        """The timeline track its markers go on (a :class:`~vmscope.devices.traces.MarkerSource`)."""
        return self.name

    def markers(self) -> list[tuple[int, str]]:
        """(time.monotonic_ns(), "POST 0x..") for every recorded write, oldest first."""
        with self._lock:
            records = list(self.records)
        return [(stamp, f"POST {value:#04x}") for stamp, value in records]

    def save_state(self) -> dict[str, object]:
        # the record of writes describes the run, not the device: it is not state
        return {"last_value": self._last}

    def load_state(self, state: Mapping[str, object]) -> None:
        self._last = StateReader(self.name, state).optional_integer("last_value", 0, 0xFFFF_FFFF)

    def reset(self) -> None:
        self._last = None
