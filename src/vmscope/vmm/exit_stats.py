"""Always-on exit accounting: what the exit loop records per vCPU.

Per exit key (see ``vmm.exit_keys``) one :class:`LatencyHistogram` of the time the VMM spent
handling the exit, plus one histogram of guest time between exits.

The exit loop does not touch the histograms. It extends :attr:`VcpuExitStats.log` by one
record of :data:`RECORD_FIELDS` ints per exit, ``key, exit_ns, handled_ns, resume_ns`` (clock
reads when KVM_RUN returned, when the exit was handled, and before KVM_RUN is called again: the
same read as handled_ns unless exit hooks ran), which costs one list extend instead of two
histogram updates. The log is flat, not a list of tuples: the loop's temporary tuple is freed at
once (so every exit reuses the same memory) and a fold takes each field with one slice.
:meth:`VcpuExitStats.fold` turns pending records into exactly the histograms that recording
each duration would have built (guest time = exit_ns - previous resume_ns, handling =
handled_ns - exit_ns), with C-level bulk passes. It runs when the loop's log reaches
:data:`FOLD_EVERY` records and whenever someone reads :attr:`handling` or :attr:`guest`, so
readers (stat -i, the control socket, the profiler, top) always see every exit so far.

Writes KVM queued in its coalesced ring (vmm.coalescing) are no exits: they are appended to
:attr:`VcpuExitStats.coalesced` as ``(key, handling_ns)`` when delivered, with keys of their
own access (exit_keys.ACCESS_OUT_COALESCED / ACCESS_WRITE_COALESCED), and fold into
``handling`` like exits but never into guest time. A reader first asks
:attr:`VcpuExitStats.before_read` to deliver what the ring still holds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from operator import sub

from vmscope.histogram import LatencyHistogram
from vmscope.vmm.exit_keys import is_coalesced_key

#: record key: guest time up to exit_ns, no handling time (kicks, exits that end the loop)
GUEST_ONLY = -1
#: record key: neither guest nor handling time; the next guest interval starts at resume_ns
#: (time spent in hooks, or restarting KVM_RUN after EAGAIN)
REBASE = -2
#: the exit loop folds its own log after this many records, which bounds its memory
FOLD_EVERY = 4096

#: (key or GUEST_ONLY or REBASE, exit_ns, handled_ns, resume_ns)
ExitRecord = tuple[int, int, int, int]
#: ints per record in the flat log
RECORD_FIELDS = 4


class VcpuExitStats:
    """The exit loop's counters for one vCPU."""

    def __init__(self, vcpu_id: int) -> None:
        self.vcpu_id = vcpu_id
        #: raw records, flat (RECORD_FIELDS ints each), added by the exit loop with one extend
        #: per record (owned by it; only fold() removes from it)
        self.log: list[int] = []
        self._handling: dict[int, LatencyHistogram] = {}
        self._guest = LatencyHistogram()
        #: resume_ns of the last folded record: where the next guest interval starts
        self._base_ns = 0
        self._fold_lock = threading.Lock()
        #: KVM_RUN returns caused by a signal kick (pause, stop, sampling)
        self.kicks = 0
        #: (coalesced key, handling_ns) per delivered coalesced write; fold() takes them
        self.coalesced: list[tuple[int, int]] = []
        #: called before the histograms are read: delivers writes still in the coalesced ring
        #: (set by the machine when it coalesces; must not read these stats itself)
        self.before_read: Callable[[], None] | None = None

    def begin(self, now_ns: int) -> None:
        """The loop is about to enter the guest for the first time at ``now_ns``."""
        self.log.extend((REBASE, now_ns, now_ns, now_ns))

    def add_records(self, records: Iterable[ExitRecord]) -> None:
        """Append records as the exit loop does (for code that replays or synthesizes exits)."""
        extend = self.log.extend
        for record in records:
            extend(record)

    @property
    def handling(self) -> dict[int, LatencyHistogram]:
        """exit key -> time spent handling that kind of exit in the VMM (folded now), coalesced
        writes included under their own keys."""
        if self.before_read is not None:
            self.before_read()
        self.fold()
        return self._handling

    @property
    def guest(self) -> LatencyHistogram:
        """Time in the guest per KVM_RUN call (entry to exit or kick); count - kicks = real exits."""
        self.fold()
        return self._guest

    @property
    def returns_without_kick(self) -> int:
        """KVM_RUN returns that were real exits."""
        return self.guest.count - self.kicks

    def total_exits(self) -> int:
        """Real exits plus delivered coalesced writes (every access the guest made here)."""
        return sum(histogram.count for histogram in self.handling.values())

    def coalesced_writes(self) -> int:
        """Delivered writes that KVM queued instead of exiting."""
        return sum(
            histogram.count for key, histogram in self.handling.items() if is_coalesced_key(key)
        )

    def count(self, key: int) -> int:
        histogram = self.handling.get(key)
        return histogram.count if histogram is not None else 0

    # -- folding ----------------------------------------------------------------------------

    def fold(self) -> None:
        """Move every pending record into the histograms (any thread)."""
        if self.coalesced:
            self._fold_coalesced()
        log = self.log
        if not log:
            return
        with self._fold_lock:
            # Copy and delete are each one C call under the GIL, and the loop only extends at
            # the end by whole records: the ints taken are exactly the ones removed, whole records.
            count = len(log)
            records = log[:count]
            del log[:count]
            if records:
                self._fold_records(records)

    def _fold_coalesced(self) -> None:
        pending = self.coalesced
        with self._fold_lock:
            count = len(pending)  # appended to at the end only, as the log is
            taken = pending[:count]
            del pending[:count]
            by_key: dict[int, list[int]] = {}
            for key, handling_ns in taken:
                by_key.setdefault(key, []).append(handling_ns)
            for key, values in by_key.items():
                self._histogram(key).record_many(values)

    def _fold_records(self, records: list[int]) -> None:
        keys = records[0::RECORD_FIELDS]
        if min(keys) < 0:  # kicks, EAGAIN, the start: rare, so record by record
            self._fold_slowly(records)
            return
        exits, handled = records[1::RECORD_FIELDS], records[2::RECORD_FIELDS]
        previous_resumes = records[3::RECORD_FIELDS]
        previous_resumes.insert(0, self._base_ns)  # each exit's guest time starts at the last resume
        self._base_ns = previous_resumes.pop()
        self._guest.record_many(list(map(sub, exits, previous_resumes)))
        handling = list(map(sub, handled, exits))
        first = keys[0]
        if keys.count(first) == len(keys):
            self._histogram(first).record_many(handling)
            return
        by_key: dict[int, list[int]] = {}
        for key, handling_ns in zip(keys, handling, strict=True):
            values = by_key.get(key)
            if values is None:
                by_key[key] = [handling_ns]
            else:
                values.append(handling_ns)
        for key, values in by_key.items():
            self._histogram(key).record_many(values)

    def _fold_slowly(self, records: list[int]) -> None:
        base = self._base_ns
        guest = self._guest
        fields = [iter(records)] * RECORD_FIELDS
        for key, exit_ns, handled_ns, resume_ns in zip(*fields, strict=True):
            if key != REBASE:
                guest.record(exit_ns - base)
                if key >= 0:
                    self._histogram(key).record(handled_ns - exit_ns)
            base = resume_ns
        self._base_ns = base

    def _histogram(self, key: int) -> LatencyHistogram:
        histogram = self._handling.get(key)
        if histogram is None:
            histogram = self._handling[key] = LatencyHistogram()
        return histogram
