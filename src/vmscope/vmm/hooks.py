"""Exit hooks: user code that sees VM exits without editing vmscope.

A hook is a callable taking an :class:`ExitEvent`, registered with filters on exit reason and
port/address range. The vCPU loop keeps, per exit key, the tuple of hooks that match it, so
an exit no hook wants costs one dict lookup, and a machine without hooks pays one truth test.
The profiler registers through the same mechanism.

Hooks run on the vCPU thread, after the exit was handled and before the guest resumes: they
see consistent guest state, and their own cost shows up as exit handling time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from vmscope.kvm import constants as c
from vmscope.records import record_repr
from vmscope.vmm.exit_keys import key_address, key_reason

if TYPE_CHECKING:
    from vmscope.vmm.runner import VcpuRunner


class ExitEvent:
    """One VM exit as a hook sees it (created per hooked exit: a plain class with slots)."""

    __slots__ = ("access", "address", "data", "handling_ns", "reason", "rip", "runner", "vcpu")

    vcpu: int
    reason: str
    #: port (IO), guest-physical address (MMIO), or -1
    address: int
    #: "in", "out", "read", "write" or ""
    access: str
    #: bytes the guest wrote, or the bytes it was given for a read ("" for other exits)
    data: bytes
    #: nanoseconds the VMM spent handling the exit
    handling_ns: int
    #: guest instruction pointer at the exit (0 when registers are not synced)
    rip: int
    runner: VcpuRunner

    def __init__(
        self,
        vcpu: int,
        reason: str,
        address: int,
        access: str,
        data: bytes,
        handling_ns: int,
        rip: int,
        runner: VcpuRunner,
    ) -> None:
        self.vcpu = vcpu
        self.reason = reason
        self.address = address
        self.access = access
        self.data = data
        self.handling_ns = handling_ns
        self.rip = rip
        self.runner = runner

    __repr__ = record_repr


HookCallback = Callable[[ExitEvent], None]


class ExitHook:
    """A registered callback with its filter; returned by :meth:`ExitHooks.add`."""

    def __init__(
        self,
        callback: HookCallback,
        reasons: frozenset[int] | None,
        address_ranges: tuple[tuple[int, int], ...] | None,
        wants_registers: bool,
    ) -> None:
        self.callback = callback
        self.reasons = reasons
        self.address_ranges = address_ranges
        self.wants_registers = wants_registers
        self.calls = 0
        self.errors = 0

    def matches(self, key: int) -> bool:
        if self.reasons is not None and key_reason(key) not in self.reasons:
            return False
        if self.address_ranges is None:
            return True
        address = key_address(key)
        if address is None:
            return False
        return any(start <= address < end for start, end in self.address_ranges)


def _reason_numbers(reasons: Iterable[str | int] | None) -> frozenset[int] | None:
    if reasons is None:
        return None
    numbers = set()
    for reason in reasons:
        if isinstance(reason, str):
            try:
                numbers.add(int(c.ExitReason[reason.upper()]))
            except KeyError:
                from vmscope.errors import ConfigError

                known = ", ".join(r.name for r in c.ExitReason)
                raise ConfigError(f"unknown exit reason {reason!r}: expected one of {known}") from None
        else:
            numbers.add(int(reason))
    return frozenset(numbers)


class ExitHooks:
    """The machine-wide hook registry; each vCPU runner consults its match cache."""

    def __init__(self) -> None:
        self._hooks: list[ExitHook] = []
        self._lock = threading.Lock()
        self._runners: list[VcpuRunner] = []
        #: called after a hook was added or removed (the machine drops coalesced zones a new
        #: hook wants: hooks see every exit they ask for)
        self.change_listeners: list[Callable[[], None]] = []

    def attach_runner(self, runner: VcpuRunner) -> None:
        self._runners.append(runner)

    def add(
        self,
        callback: HookCallback,
        *,
        reasons: Iterable[str | int] | None = None,
        addresses: Iterable[tuple[int, int]] | range | None = None,
        registers: bool = True,
    ) -> ExitHook:
        """Call ``callback`` for every exit matching all given filters.

        ``reasons``: exit reason names ("IO", "MMIO", "HLT", ...) or numbers; ``addresses``: a
        range or (start, end) pairs of ports / guest-physical addresses (IO and MMIO exits only);
        ``registers``: sync guest registers so ExitEvent.rip is filled (costs a little per exit).
        """
        ranges: tuple[tuple[int, int], ...] | None
        if addresses is None:
            ranges = None
        elif isinstance(addresses, range):
            ranges = ((addresses.start, addresses.stop),)
        else:
            ranges = tuple((int(start), int(end)) for start, end in addresses)
        hook = ExitHook(callback, _reason_numbers(reasons), ranges, registers)
        with self._lock:
            self._hooks.append(hook)
            self._refresh()
        self._notify()
        return hook

    def remove(self, hook: ExitHook) -> None:
        with self._lock:
            if hook in self._hooks:
                self._hooks.remove(hook)
            self._refresh()
        self._notify()

    def _notify(self) -> None:
        for listener in list(self.change_listeners):
            listener()

    @property
    def hooks(self) -> tuple[ExitHook, ...]:
        return tuple(self._hooks)

    def match(self, key: int) -> tuple[ExitHook, ...]:
        return tuple(hook for hook in self._hooks if hook.matches(key))

    def _refresh(self) -> None:
        needs_registers = any(hook.wants_registers for hook in self._hooks)
        for runner in self._runners:
            runner.set_hooks_active(bool(self._hooks), needs_registers)
