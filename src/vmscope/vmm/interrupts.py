"""Interrupt lines backed by the in-kernel interrupt controllers (PIC + IOAPIC)."""

from __future__ import annotations

import threading

from vmscope.kvm import Vm


class KvmIrqLine:
    """A GSI raised with KVM_IRQ_LINE; only level changes reach the kernel."""

    def __init__(self, vm: Vm, gsi: int) -> None:
        self._vm = vm
        self.gsi = gsi
        self._level = False
        self._lock = threading.Lock()  # several vCPU / I/O threads may drive one line

    def set_level(self, asserted: bool) -> None:
        with self._lock:
            if asserted == self._level:
                return
            self._level = asserted
            self._vm.set_irq_line(self.gsi, asserted)
