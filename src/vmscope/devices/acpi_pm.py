"""ACPI fixed-hardware power management: PM1a event/control blocks and the PM timer.

The FADT vmscope generates (arch/x86/acpi.py) points the guest here: PM1a_EVT at 0x600
(status, enable), PM1a_CNT at 0x604 and PM_TMR at 0x608. Writing SLP_TYP=5 with SLP_EN to
PM1a_CNT is ACPI soft-off (S5): the machine powers off with exit status 0, which is how
Linux's `poweroff` ends a vmscope run. SCI_EN always reads set: the machine starts in ACPI mode.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from vmscope.arch.x86.acpi_registers import (
    PM1_CNT_SCI_EN,
    PM1_CNT_SLP_EN,
    PM1_CNT_SLP_TYP_MASK,
    PM1_CNT_SLP_TYP_SHIFT,
    PM1A_CNT_PORT,
    PM1A_EVT_PORT,
    PM_TMR_PORT,
)
from vmscope.devices.base import Device, MachineControl, int_to_bytes
from vmscope.devices.state import StateReader

#: the window this device covers: PM1a event block through the PM timer
ACPI_PM_BASE = PM1A_EVT_PORT
ACPI_PM_LENGTH = PM_TMR_PORT + 4 - PM1A_EVT_PORT
PM_TIMER_HZ = 3_579_545
SLEEP_TYPE_SOFT_OFF = 5  # matches the DSDT's \\_S5 package

_STATUS = 0
_ENABLE = 2
_CONTROL = PM1A_CNT_PORT - ACPI_PM_BASE
_TIMER = PM_TMR_PORT - ACPI_PM_BASE


class AcpiPm(Device):
    """PM1a status/enable/control and the 24-bit PM timer, for a machine that can power off."""

    def __init__(
        self, machine: MachineControl, clock_ns: Callable[[], int] = time.monotonic_ns, name: str = "acpi-pm"
    ) -> None:
        self.name = name
        self._machine = machine
        self._clock_ns = clock_ns
        self._epoch_ns = clock_ns()
        self._lock = threading.Lock()
        self.status = 0
        self.enable = 0
        self.control = PM1_CNT_SCI_EN

    def timer_value(self) -> int:
        elapsed = self._clock_ns() - self._epoch_ns
        return (elapsed * PM_TIMER_HZ // 1_000_000_000) & 0xFF_FFFF

    def save_state(self) -> dict[str, object]:
        with self._lock:
            return {
                "status": self.status,
                "enable": self.enable,
                "control": self.control,
                # the timer keeps counting from where it was, not from the host's clock
                "timer_elapsed_ns": self._clock_ns() - self._epoch_ns,
            }

    def load_state(self, state: Mapping[str, object]) -> None:
        reader = StateReader(self.name, state)
        status = reader.integer("status", 0, 0xFFFF)
        enable = reader.integer("enable", 0, 0xFFFF)
        control = reader.integer("control", 0, 0xFFFF)
        elapsed = reader.integer("timer_elapsed_ns")
        with self._lock:
            self.status, self.enable = status, enable
            self.control = (control & ~PM1_CNT_SLP_EN) | PM1_CNT_SCI_EN
            self._epoch_ns = self._clock_ns() - elapsed

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            if _TIMER <= offset < _TIMER + 4:
                value = self.timer_value() >> (8 * (offset - _TIMER))
            elif _CONTROL <= offset < _CONTROL + 2:
                value = self.control >> (8 * (offset - _CONTROL))
            elif _ENABLE <= offset < _ENABLE + 2:
                value = self.enable >> (8 * (offset - _ENABLE))
            elif _STATUS <= offset < _STATUS + 2:
                value = self.status >> (8 * (offset - _STATUS))
            else:
                value = (1 << (8 * size)) - 1  # the gap between the blocks reads as all-ones
        return int_to_bytes(value, size)

    def write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        power_off = False
        with self._lock:
            if offset == _STATUS:
                self.status &= ~value & 0xFFFF  # write 1 to clear
            elif offset == _ENABLE:
                self.enable = value & 0xFFFF
            elif offset == _CONTROL:
                self.control = (value & ~PM1_CNT_SLP_EN & 0xFFFF) | PM1_CNT_SCI_EN
                sleep_type = (value & PM1_CNT_SLP_TYP_MASK) >> PM1_CNT_SLP_TYP_SHIFT
                power_off = bool(value & PM1_CNT_SLP_EN) and sleep_type == SLEEP_TYPE_SOFT_OFF
        if power_off:
            self._machine.request_stop("guest powered off (ACPI S5)", 0)
