#!/usr/bin/env python3
"""The cheapest exit loop Python can run: the floor for any Python VMM on this host.

    python bench/python_floor.py GUEST.elf n=200000 [MEM]

Sets the guest up with vmscope (memory, CPUID, PVH load), then runs vCPU 0 in a bare loop:
KVM_RUN, read the exit reason and port, nothing else: no devices, no accounting, no hooks.
The guest's debug-exit write to port 0xf4 ends it with QEMU's status, (value << 1) | 1.
bench/exit_roundtrip runs it beside vmscope and the C reference.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vmscope.kvm import ExitReason
from vmscope.vmm.machine import Machine


def main() -> int:
    guest, cmdline = sys.argv[1], sys.argv[2]
    mem = sys.argv[3] if len(sys.argv) > 3 else "64M"
    with Machine(mem=mem) as machine:
        machine.load(guest, cmdline=cmdline)
        vcpu = machine.runners[0].vcpu
        kvm_run, run_page = vcpu.kvm_run, vcpu.run_buffer
        unpack_io = struct.Struct("<BBHIQ").unpack_from
        io_exit = int(ExitReason.IO)
        while True:
            kvm_run()
            if run_page[8] != io_exit:
                return 1
            _, _, port, _, offset = unpack_io(run_page, 32)
            if port == 0xF4:
                return (run_page[offset] << 1) | 1


if __name__ == "__main__":
    raise SystemExit(main())
