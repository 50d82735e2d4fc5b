"""What to do with every exit that is not port I/O or MMIO.

Two parts, both off the hot path:

- :func:`decide_rare_exit` is a pure function from a decoded exit to a
  :class:`RareExitDecision` (continue, handle a kick, stop, crash), unit-tested with
  synthetic exits.
- :class:`RareExitHandlers` is a registry of code that wants some exits first: the GDB stub
  takes debug exits, the fallback emulator takes emulation failures. A handler answers
  ``True`` (handled, run on), ``False`` (handled, this vCPU must stop; the handler has already
  requested the stop or crash) or ``None`` (not mine: ask the next handler, then decide).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from vmscope.kvm import constants as c
from vmscope.kvm.exits import RareExit

if TYPE_CHECKING:
    from vmscope.vmm.runner import VcpuRunner


class ExitAction(enum.Enum):
    CONTINUE = "continue"
    #: KVM_RUN was interrupted by a signal (KVM_EXIT_INTR): the runner's kick handling decides
    KICK = "kick"
    #: end the run with ``exit_status`` (the guest asked for it, or nothing can wake it)
    STOP = "stop"
    #: a crash report with registers and the faulting instruction, then status 1
    CRASH = "crash"


class RareExitDecision(NamedTuple):
    action: ExitAction
    #: the stop or crash reason shown to the user, or a warning logged for CONTINUE
    message: str = ""
    exit_status: int = 0
    #: a KVM internal error: the crash report looks for emulation-failure instruction bytes
    internal_error: bool = False


def decide_rare_exit(rare_exit: RareExit, vcpu_id: int) -> RareExitDecision:
    """The default action for ``exit`` once no registered handler took it."""
    reason = rare_exit.reason
    if reason == c.ExitReason.INTR:
        return RareExitDecision(ExitAction.KICK)
    if reason in (c.ExitReason.IRQ_WINDOW_OPEN, c.ExitReason.IOAPIC_EOI):
        return RareExitDecision(ExitAction.CONTINUE)
    if reason == c.ExitReason.HLT:
        # Only reached without an in-kernel LAPIC: nothing can wake this vCPU again.
        return RareExitDecision(
            ExitAction.STOP, f"vCPU {vcpu_id} halted with no interrupt controller to wake it", 0
        )
    if reason == c.ExitReason.SYSTEM_EVENT:
        event = c.SYSTEM_EVENT_TYPES.get(rare_exit.code, str(rare_exit.code))
        if event in ("shutdown", "reset"):
            return RareExitDecision(ExitAction.STOP, f"guest requested {event}", 0)
        return RareExitDecision(ExitAction.CRASH, f"guest system event: {event}", 1)
    if reason == c.ExitReason.DEBUG:
        return RareExitDecision(
            ExitAction.CONTINUE,
            f"vCPU {vcpu_id}: unexpected debug exit at {rare_exit.pc:#x} (no debugger attached)",
        )
    if reason == c.ExitReason.SHUTDOWN:
        return RareExitDecision(
            ExitAction.CRASH,
            "triple fault (KVM_EXIT_SHUTDOWN): the guest hit an exception it could not handle",
            1,
        )
    if reason == c.ExitReason.FAIL_ENTRY:
        return RareExitDecision(
            ExitAction.CRASH, f"VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason {rare_exit.code:#x})", 1
        )
    if reason == c.ExitReason.INTERNAL_ERROR:
        name = c.INTERNAL_ERROR_SUBERRORS.get(rare_exit.code, "unknown")
        return RareExitDecision(
            ExitAction.CRASH,
            f"KVM internal error, suberror {rare_exit.code} ({name})",
            1,
            internal_error=True,
        )
    return RareExitDecision(ExitAction.CRASH, f"unhandled exit reason {rare_exit.reason_name}", 1)


RareExitHandler = Callable[["VcpuRunner", RareExit], "bool | None"]


class RareExitHandlers:
    """Handlers by exit reason; the one added last is asked first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_reason: dict[int, tuple[RareExitHandler, ...]] = {}

    def add(self, reason: int, handler: RareExitHandler) -> None:
        with self._lock:
            self._by_reason[reason] = (handler, *self._by_reason.get(reason, ()))

    def remove(self, reason: int, handler: RareExitHandler) -> None:
        with self._lock:
            remaining = tuple(h for h in self._by_reason.get(reason, ()) if h != handler)
            if remaining:
                self._by_reason[reason] = remaining
            else:
                self._by_reason.pop(reason, None)

    def handlers_for(self, reason: int) -> tuple[RareExitHandler, ...]:
        return self._by_reason.get(reason, ())

    def dispatch(self, runner: VcpuRunner, rare_exit: RareExit) -> bool | None:
        """The first answer that is not None, or None when no handler took the exit."""
        for handler in self._by_reason.get(rare_exit.reason, ()):
            answer = handler(runner, rare_exit)
            if answer is not None:
                return answer
        return None
