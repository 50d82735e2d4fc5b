"""What a device that records its own activity offers to observers such as the profiler.

Two kinds, both structural (a device only has to have the members):

* :class:`MarkerSource`: instants the guest marked (POST codes at port 0x80), stamped with
  ``time.monotonic_ns()``, shown on a timeline track of their own;
* :class:`RequestTraceSource`: served requests with the timestamps that split their latency
  (virtio-blk's :class:`~vmscope.virtio.block.RequestTrace`), stamped with
  ``time.perf_counter_ns()``.

The profiler finds them among the machine's devices with ``isinstance``; nothing looks for
attributes by name or for a device at a particular port.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class MarkerSource(Protocol):
    """A device whose guest-set markers belong on a timeline."""

    @property
    def marker_track(self) -> str:
        """The name of the timeline track (e.g. "port80")."""
        ...

    def markers(self) -> Sequence[tuple[int, str]]:
        """(time.monotonic_ns() of the marker, label), oldest first."""
        ...


class RequestTrace(Protocol):
    """One served request's timestamps (``time.perf_counter_ns``), notification to interrupt."""

    @property
    def device(self) -> str: ...
    @property
    def type_name(self) -> str: ...
    @property
    def length(self) -> int: ...
    @property
    def thread(self) -> str: ...
    @property
    def notify_ns(self) -> int: ...
    @property
    def pickup_ns(self) -> int: ...
    @property
    def backend_start_ns(self) -> int: ...
    @property
    def backend_end_ns(self) -> int: ...
    @property
    def complete_ns(self) -> int: ...
    @property
    def interrupt_ns(self) -> int | None: ...


@runtime_checkable
class RequestTraceSource(Protocol):
    """A device that keeps traces of the requests it served."""

    def traces(self) -> Sequence[RequestTrace]:
        """The recorded requests, oldest first (a copy)."""
        ...
