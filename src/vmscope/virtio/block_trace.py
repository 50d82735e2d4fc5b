"""Request traces of virtio-blk: what each served request leaves for a profiler.

Serving a batch keeps one plain tuple per request (:data:`TraceRecord`) and one
:class:`TraceBatch` per completion; :class:`RequestTraceLog` bounds them per device (oldest
batches dropped) and builds :class:`RequestTrace` objects only when someone asks, so the hot
path allocates no trace objects. Also the request types, whose names traces show.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import NamedTuple

# request types (virtio 1.2 section 5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

REQUEST_TYPE_NAMES = {
    VIRTIO_BLK_T_IN: "read",
    VIRTIO_BLK_T_OUT: "write",
    VIRTIO_BLK_T_FLUSH: "flush",
    VIRTIO_BLK_T_GET_ID: "get-id",
    VIRTIO_BLK_T_DISCARD: "discard",
    VIRTIO_BLK_T_WRITE_ZEROES: "write-zeroes",
}


@dataclass(slots=True)
class RequestTrace:
    """Timestamps (``time.perf_counter_ns``) of one virtio-blk request, for latency splitting.

    ``notify_ns``: the notification was seen (I/O thread woke on the queue eventfd, or the
    vCPU's QueueNotify exit reached the device); ``pickup_ns``: the chain was taken off the
    available ring; ``backend_start_ns`` / ``backend_end_ns``: around the host syscalls
    (equal when the request needed none); ``complete_ns``: the used element was published;
    ``interrupt_ns``: the interrupt was injected, or None when notification suppression
    (EVENT_IDX / NO_INTERRUPT) decided none was needed.
    """

    device: str
    queue: int
    head: int
    request_type: int
    sector: int
    #: data bytes moved (read, written, discarded or zeroed)
    length: int
    status: int
    notify_ns: int
    pickup_ns: int
    backend_start_ns: int
    backend_end_ns: int
    complete_ns: int
    interrupt_ns: int | None = None
    #: the thread that served it ("io:virtio-blk0", or a vCPU thread with --iothreads=off)
    thread: str = ""

    @property
    def type_name(self) -> str:
        return REQUEST_TYPE_NAMES.get(self.request_type, f"type-{self.request_type}")

    @property
    def queue_wait_ns(self) -> int:
        """Notification to pickup: time the request sat in the ring."""
        return self.pickup_ns - self.notify_ns

    @property
    def backend_ns(self) -> int:
        return self.backend_end_ns - self.backend_start_ns

    @property
    def total_ns(self) -> int:
        """Notification to interrupt (or to completion when no interrupt was sent)."""
        end = self.interrupt_ns if self.interrupt_ns is not None else self.complete_ns
        return end - self.notify_ns


#: what a served request leaves for its :class:`RequestTrace`, kept as a plain tuple on the hot
#: path (queue, head, request_type, sector, length, status, notify_ns, pickup_ns,
#: backend_start_ns, backend_end_ns, complete_ns); traces are built from these when asked for
TraceRecord = tuple[int, int, int, int, int, int, int, int, int, int, int]


class TraceBatch(NamedTuple):
    """Requests completed together: one interrupt decision and one serving thread."""

    records: list[TraceRecord]
    interrupt_ns: int | None
    thread: str


class RequestTraceLog:
    """The last ``limit`` requests of one device, kept as records, built into traces on demand."""

    def __init__(self, limit: int) -> None:
        self.limit = max(0, limit)
        self._batches: collections.deque[TraceBatch] = collections.deque()
        self._count = 0  # requests in _batches
        self._lock = threading.Lock()

    def keep(self, records: list[TraceRecord], interrupt_ns: int | None, thread: str) -> None:
        """Store a completed batch's records, dropping the oldest batches beyond the limit."""
        if not self.limit:
            return
        with self._lock:
            batches = self._batches
            batches.append(TraceBatch(records, interrupt_ns, thread))
            self._count += len(records)
            while self._count - len(batches[0].records) >= self.limit:
                self._count -= len(batches.popleft().records)

    def traces(self, device: str) -> list[RequestTrace]:
        """The recorded requests (the last ``limit``), oldest first (a copy)."""
        with self._lock:
            batches = list(self._batches)
        return self._build(device, batches)

    def drain(self, device: str) -> list[RequestTrace]:
        """The recorded requests, oldest first, removing them."""
        with self._lock:
            batches = list(self._batches)
            self._batches.clear()
            self._count = 0
        return self._build(device, batches)

    def _build(self, device: str, batches: list[TraceBatch]) -> list[RequestTrace]:
        traces = [
            RequestTrace(device, *record, interrupt_ns=batch.interrupt_ns, thread=batch.thread)
            for batch in batches
            for record in batch.records
        ]
        return traces[len(traces) - self.limit :] if len(traces) > self.limit else traces
