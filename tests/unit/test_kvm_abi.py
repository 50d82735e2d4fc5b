"""The ctypes mirrors and ioctl numbers match the system's linux/kvm.h (compiled C program)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from vmscope.kvm import constants as c
from vmscope.kvm import exits
from vmscope.kvm import structs as s

STRUCTS = {
    "kvm_regs": s.kvm_regs,
    "kvm_sregs": s.kvm_sregs,
    "kvm_segment": s.kvm_segment,
    "kvm_vcpu_events": s.kvm_vcpu_events,
    "kvm_sync_regs": s.kvm_sync_regs,
    "kvm_run": s.kvm_run,
    "kvm_userspace_memory_region": s.kvm_userspace_memory_region,
    "kvm_cpuid_entry2": s.kvm_cpuid_entry2,
    "kvm_fpu": s.kvm_fpu,
    "kvm_irqfd": s.kvm_irqfd,
    "kvm_ioeventfd": s.kvm_ioeventfd,
    "kvm_msi": s.kvm_msi,
    "kvm_coalesced_mmio_zone": s.kvm_coalesced_mmio_zone,
    "kvm_coalesced_mmio": s.kvm_coalesced_mmio,
    "kvm_coalesced_mmio_ring": s.kvm_coalesced_mmio_ring,
    "kvm_enable_cap": s.kvm_enable_cap,
    "kvm_guest_debug": s.kvm_guest_debug,
    "kvm_irq_routing_entry": s.kvm_irq_routing_entry,
    "kvm_stats_header": s.kvm_stats_header,
    "kvm_stats_desc": s.kvm_stats_desc,
    "kvm_msr_list": s.kvm_msr_list,
    "kvm_xsave": s.kvm_xsave,
    "kvm_xcr": s.kvm_xcr,
    "kvm_xcrs": s.kvm_xcrs,
    "kvm_debugregs": s.kvm_debugregs,
    "kvm_clock_data": s.kvm_clock_data,
    "kvm_pit_channel_state": s.kvm_pit_channel_state,
    "kvm_pit_state2": s.kvm_pit_state2,
    "kvm_irqchip": s.kvm_irqchip,
    "kvm_lapic_state": s.kvm_lapic_state,
    "kvm_mp_state": s.kvm_mp_state,
}
OFFSETS = {
    ("kvm_run", "exit_reason"): exits.EXIT_REASON_OFFSET,
    ("kvm_run", "io"): exits.EXIT_UNION_OFFSET,
    ("kvm_run", "kvm_valid_regs"): s.kvm_run.kvm_valid_regs.offset,
    ("kvm_run", "io.port"): s.kvm_run.exit.offset + s._exit_io.port.offset,
    ("kvm_run", "io.count"): s.kvm_run.exit.offset + s._exit_io.count.offset,
    ("kvm_run", "io.data_offset"): s.kvm_run.exit.offset + s._exit_io.data_offset.offset,
    ("kvm_run", "mmio.data"): exits.MMIO_DATA_OFFSET,
    ("kvm_run", "mmio.len"): s.kvm_run.exit.offset + s._exit_mmio.len.offset,
    ("kvm_run", "mmio.is_write"): s.kvm_run.exit.offset + s._exit_mmio.is_write.offset,
    ("kvm_run", "internal.data"): s.kvm_run.exit.offset + s._exit_internal.data.offset,
    ("kvm_run", "kvm_dirty_regs"): s.kvm_run.kvm_dirty_regs.offset,
    ("kvm_run", "s"): s.kvm_run.s.offset,
    ("kvm_sregs", "efer"): s.kvm_sregs.efer.offset,
    ("kvm_sregs", "interrupt_bitmap"): s.kvm_sregs.interrupt_bitmap.offset,
    ("kvm_vcpu_events", "exception_payload"): s.kvm_vcpu_events.exception_payload.offset,
    ("kvm_sync_regs", "events"): s.kvm_sync_regs.events.offset,
    ("kvm_run", "emulation_failure.flags"): s.kvm_run.exit.offset + s._exit_emulation_failure.flags.offset,
    ("kvm_run", "emulation_failure.insn_size"): (
        s.kvm_run.exit.offset + s._exit_emulation_failure.insn_size.offset
    ),
    ("kvm_run", "emulation_failure.insn_bytes"): (
        s.kvm_run.exit.offset + s._exit_emulation_failure.insn_bytes.offset
    ),
    ("kvm_xcrs", "xcrs"): s.kvm_xcrs.xcrs.offset,
    ("kvm_xcrs", "padding"): s.kvm_xcrs.padding.offset,
    ("kvm_debugregs", "flags"): s.kvm_debugregs.flags.offset,
    ("kvm_clock_data", "host_tsc"): s.kvm_clock_data.host_tsc.offset,
    ("kvm_pit_channel_state", "count_load_time"): s.kvm_pit_channel_state.count_load_time.offset,
    ("kvm_pit_state2", "flags"): s.kvm_pit_state2.flags.offset,
    ("kvm_irqchip", "chip"): s.kvm_irqchip.chip.offset,
    ("kvm_coalesced_mmio", "data"): s.kvm_coalesced_mmio.data.offset,
    ("kvm_coalesced_mmio_ring", "coalesced_mmio"): ctypes.sizeof(s.kvm_coalesced_mmio_ring),
}
CONSTANTS = {
    "KVM_INTERNAL_ERROR_EMULATION": c.INTERNAL_ERROR_EMULATION,
    "KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES": c.INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    "KVM_CAP_XCRS": c.Cap.XCRS,
    "KVM_CAP_EXIT_ON_EMULATION_FAILURE": c.Cap.EXIT_ON_EMULATION_FAILURE,
    "KVM_VCPUEVENT_VALID_PAYLOAD": c.VCPUEVENT_VALID_PAYLOAD,
}
IOCTLS = [name for name in dir(c) if name.startswith("KVM_") and name not in ("KVM_API_VERSION",)]


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if shutil.which("cc") is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("needs a C compiler and linux/kvm.h (Debian: apt-get install gcc linux-libc-dev)")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for name in STRUCTS:
        lines.append(f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
    for (struct, field), _ in OFFSETS.items():
        lines.append(f'printf("offsetof {struct}.{field} %zu\\n", offsetof(struct {struct}, {field}));')
    for name in CONSTANTS:
        lines.append(f'printf("constant {name} %llu\\n", (unsigned long long)({name}));')
    for name in IOCTLS:
        lines.append(f'printf("ioctl {name} %lu\\n", (unsigned long)({name}));')
    lines.append("return 0; }")
    work = tmp_path_factory.mktemp("abi")
    (work / "abi.c").write_text("\n".join(lines))
    subprocess.run(["cc", "-o", str(work / "abi"), str(work / "abi.c")], check=True)
    out = subprocess.run([str(work / "abi")], check=True, capture_output=True, text=True).stdout
    return {" ".join(line.split()[:2]): int(line.split()[2]) for line in out.splitlines()}


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_sizes_match_headers(header_values: dict[str, int], name: str) -> None:
    assert ctypes.sizeof(STRUCTS[name]) == header_values[f"sizeof {name}"]


@pytest.mark.parametrize("key", sorted(OFFSETS))
def test_field_offsets_match_headers(header_values: dict[str, int], key: tuple[str, str]) -> None:
    assert OFFSETS[key] == header_values[f"offsetof {key[0]}.{key[1]}"]


@pytest.mark.parametrize("name", sorted(IOCTLS))
def test_ioctl_numbers_match_headers(header_values: dict[str, int], name: str) -> None:
    assert getattr(c, name) == header_values[f"ioctl {name}"], name


@pytest.mark.parametrize("name", sorted(CONSTANTS))
def test_constants_match_headers(header_values: dict[str, int], name: str) -> None:
    assert CONSTANTS[name] == header_values[f"constant {name}"], name
