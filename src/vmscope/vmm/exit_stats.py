"""Always-on exit accounting: what the exit loop records per vCPU.

Per exit key (see ``runner.decode_exit_key``) one :class:`LatencyHistogram` of the time the
VMM spent handling the exit, plus one histogram of guest time between exits. Recording is a
single ``histogram.record(ns)`` call; everything else happens at report time.
"""

from __future__ import annotations

from vmscope.histogram import LatencyHistogram


class VcpuExitStats:
    """The exit loop's counters for one vCPU."""

    def __init__(self, vcpu_id: int) -> None:
        self.vcpu_id = vcpu_id
        #: exit key -> time spent handling that kind of exit in the VMM
        self.handling: dict[int, LatencyHistogram] = {}
        #: time in the guest per KVM_RUN call (entry to exit or kick); count - kicks = real exits
        self.guest = LatencyHistogram()
        #: KVM_RUN returns caused by a signal kick (pause, stop, sampling)
        self.kicks = 0

    @property
    def returns_without_kick(self) -> int:
        """KVM_RUN returns that were real exits (cheap: no walk over the exit keys)."""
        return self.guest.count - self.kicks

    def total_exits(self) -> int:
        return sum(histogram.count for histogram in self.handling.values())

    def count(self, key: int) -> int:
        histogram = self.handling.get(key)
        return histogram.count if histogram is not None else 0
