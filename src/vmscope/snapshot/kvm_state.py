"""KVM's share of a machine's state: per vCPU and per VM, to JSON-able data and back.

Structures are kept as hex strings of their exact bytes (the ABI is checked against
linux/kvm.h), so nothing is lost or reinterpreted. Order matters, as Firecracker documents for
its vCPUs: KVM_GET_MP_STATE first when saving (it makes the LAPIC accept pending INIT/SIPI
events, which changes other state); when restoring CPUID, MP_STATE, REGS, SREGS, XSAVE, XCRS,
DEBUGREGS, LAPIC, MSRs and VCPU_EVENTS last (events depend on the LAPIC and MSRs being set).
The VM's PIT, clock and interrupt controllers are restored before any vCPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from vmscope.arch.x86.cpuid import FEATURES
from vmscope.errors import KvmError, SnapshotError
from vmscope.kvm import Vcpu, Vm
from vmscope.kvm import constants as c
from vmscope.kvm import structs as s

log = logging.getLogger("vmscope.snapshot")

_CHIPS = {"pic_master": c.IRQCHIP_PIC_MASTER, "pic_slave": c.IRQCHIP_PIC_SLAVE, "ioapic": c.IRQCHIP_IOAPIC}
_CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")


def readable_msrs(vcpu: Vcpu, indices: Sequence[int]) -> dict[int, int]:
    """Values of the listed MSRs that KVM_GET_MSRS reads (it stops at the first it refuses:
    skip that one and go on)."""
    values: dict[int, int] = {}
    remaining = list(indices)
    while remaining:
        got = vcpu.get_msrs(remaining)
        values.update(got)
        refused = len(got)
        if refused < len(remaining):
            log.debug("MSR %#x is listed but not readable; not saved", remaining[refused])
        remaining = remaining[refused + 1 :]
    return values


def _hex(structure: Any) -> str:
    return bytes(structure).hex()


def _cpuid_rows(entries: Sequence[s.kvm_cpuid_entry2]) -> list[list[int]]:
    return [[int(getattr(entry, name)) for name in _CPUID_FIELDS] for entry in entries]


def _cpuid_entries(rows: Sequence[Sequence[int]]) -> list[s.kvm_cpuid_entry2]:
    return [s.kvm_cpuid_entry2(**dict(zip(_CPUID_FIELDS, row, strict=True))) for row in rows]


def capture_vcpu(vcpu: Vcpu, msr_indices: Sequence[int]) -> dict[str, Any]:
    """Everything KVM holds for a paused vCPU."""
    mp_state = vcpu.get_mp_state()  # first: it may change LAPIC and event state
    return {
        "id": vcpu.id,
        "mp_state": mp_state,
        "regs": _hex(vcpu.get_regs()),
        "sregs": _hex(vcpu.get_sregs()),
        "xsave": vcpu.get_xsave().hex(),
        "xcrs": [[index, value] for index, value in sorted(vcpu.get_xcrs().items())],
        "debugregs": _hex(vcpu.get_debugregs()),
        "lapic": vcpu.get_lapic().hex(),
        "tsc_khz": vcpu.get_tsc_khz(),
        "cpuid": _cpuid_rows(vcpu.get_cpuid()),
        "msrs": [[index, value] for index, value in readable_msrs(vcpu, msr_indices).items()],
        "events": _hex(vcpu.get_vcpu_events()),
    }


#: bits KVM changes in a vCPU's table as the guest runs (CR4.OSXSAVE, CR4.PKE, MISC_ENABLE's
#: MWAIT bit): what they say is the guest's doing, not a requirement on the host
_RUNTIME_FEATURES = frozenset({"osxsave", "ospke", "monitor"})


def missing_cpu_features(
    saved_rows: Sequence[Sequence[int]], host: Sequence[s.kvm_cpuid_entry2]
) -> list[str]:
    """Named CPUID features the saved table has and the host's table for this machine lacks."""
    saved = {(row[0], row[1]): row for row in saved_rows}
    here = {(entry.function, entry.index): entry for entry in host}
    registers = {"eax": 3, "ebx": 4, "ecx": 5, "edx": 6}
    missing: list[str] = []
    for name, feature in FEATURES.items():
        if name in _RUNTIME_FEATURES:
            continue
        row = saved.get((feature.function, feature.index))
        if row is None or not row[registers[feature.register]] >> feature.bit & 1:
            continue
        entry = here.get((feature.function, feature.index))
        if entry is None or not getattr(entry, feature.register) >> feature.bit & 1:
            missing.append(name)
    return sorted(missing)


def apply_vcpu(vcpu: Vcpu, state: dict[str, Any]) -> None:
    """Load a captured vCPU state into a vCPU that has not run yet (order: see module docstring)."""
    try:
        tsc_khz = int(state["tsc_khz"])
        if tsc_khz and tsc_khz != vcpu.get_tsc_khz():
            try:
                vcpu.set_tsc_khz(tsc_khz)
            except KvmError as error:
                # without TSC scaling the guest's TSC runs at this host's rate: it still runs
                log.warning(
                    "vCPU %d: cannot set the snapshot's TSC rate of %d kHz: %s", vcpu.id, tsc_khz, error
                )
        vcpu.set_cpuid(_cpuid_entries(state["cpuid"]))
        vcpu.set_mp_state(int(state["mp_state"]))
        vcpu.set_regs(s.from_bytes(s.kvm_regs, bytes.fromhex(state["regs"]), "REGS"))
        vcpu.set_sregs(s.from_bytes(s.kvm_sregs, bytes.fromhex(state["sregs"]), "SREGS"))
        vcpu.set_xsave(bytes.fromhex(state["xsave"]))
        vcpu.set_xcrs({int(index): int(value) for index, value in state["xcrs"]})
        vcpu.set_debugregs(s.from_bytes(s.kvm_debugregs, bytes.fromhex(state["debugregs"]), "DEBUGREGS"))
        vcpu.set_lapic(bytes.fromhex(state["lapic"]))
        vcpu.set_msrs({int(index): int(value) for index, value in state["msrs"]})
        vcpu.set_vcpu_events(s.from_bytes(s.kvm_vcpu_events, bytes.fromhex(state["events"]), "VCPU_EVENTS"))
    except (KeyError, TypeError, ValueError) as error:
        raise SnapshotError(
            f"vCPU {vcpu.id}: malformed saved state ({type(error).__name__}: {error})"
        ) from None
    except KvmError as error:
        raise SnapshotError(f"vCPU {vcpu.id}: KVM refused the saved state: {error}") from None


def capture_vm(vm: Vm) -> dict[str, Any]:
    """The in-kernel PIT, kvmclock and interrupt controllers (PIC master, slave, IOAPIC)."""
    return {
        "pit2": vm.get_pit2().hex(),
        "clock_ns": int(vm.get_clock().clock),
        "irqchips": {name: vm.get_irqchip(chip).hex() for name, chip in _CHIPS.items()},
    }


def apply_vm(vm: Vm, state: dict[str, Any]) -> None:
    try:
        vm.set_pit2(bytes.fromhex(state["pit2"]))
        vm.set_clock(int(state["clock_ns"]))
        for name, chip in _CHIPS.items():
            vm.set_irqchip(chip, bytes.fromhex(state["irqchips"][name]))
    except (KeyError, TypeError, ValueError) as error:
        raise SnapshotError(f"malformed saved VM state ({type(error).__name__}: {error})") from None
    except KvmError as error:
        raise SnapshotError(f"KVM refused the saved VM state: {error}") from None
