"""Fallback emulator: completes instructions the host's KVM cannot emulate.

Pure logic (no KVM): a VMM adapts its vCPU to :class:`CpuAccess` and calls :func:`emulate`
with the instruction's bytes; see vmscope.vmm.fallback for the KVM side.
"""

from vmscope.emulate.cpu import (
    DEFAULT_XSTATE_LAYOUT,
    PF_FETCH,
    PF_PRESENT,
    PF_USER,
    PF_WRITE,
    REGISTER_NAMES,
    ControlState,
    CpuAccess,
    MemoryFault,
    UnsupportedAccess,
    XstateComponent,
)
from vmscope.emulate.engine import emulate
from vmscope.emulate.outcome import Completed, Outcome, RaiseException, Unsupported

__all__ = [
    "DEFAULT_XSTATE_LAYOUT",
    "PF_FETCH",
    "PF_PRESENT",
    "PF_USER",
    "PF_WRITE",
    "REGISTER_NAMES",
    "Completed",
    "ControlState",
    "CpuAccess",
    "MemoryFault",
    "Outcome",
    "RaiseException",
    "Unsupported",
    "UnsupportedAccess",
    "XstateComponent",
    "emulate",
]
