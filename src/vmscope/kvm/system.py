"""/dev/kvm: the system-level handle (API version, capabilities, supported CPUID)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING

from vmscope.errors import KvmError, KvmUnavailableError
from vmscope.kvm import constants as c
from vmscope.kvm import structs as s
from vmscope.kvm._ioctl import ioctl

if TYPE_CHECKING:
    from vmscope.kvm.vm import Vm

DEFAULT_DEVICE = "/dev/kvm"


def detect_backend(sys_module: Path = Path("/sys/module")) -> str:
    """Which KVM backend the host kernel runs: kvm_intel, kvm_amd, kvm_pvm or unknown.

    kvm_pvm is a software-virtualization backend (no VT-x/AMD-V): guest kernel code is
    emulated and some instructions fail, so diagnostics mention it.
    """
    for name in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if (sys_module / name).exists():
            return name
    return "unknown"


BACKEND_DESCRIPTIONS = {
    "kvm_pvm": "software virtualization, no VT-x/AMD-V: guest kernel code is emulated",
    "kvm_intel": "Intel VT-x",
    "kvm_amd": "AMD-V",
}


def describe_backend(backend: str | None = None) -> str:
    """'KVM backend kvm_pvm (software virtualization, ...)' for logs and benchmark headers."""
    name = backend or detect_backend()
    detail = BACKEND_DESCRIPTIONS.get(name)
    return f"KVM backend {name} ({detail})" if detail else f"KVM backend {name}"


class Kvm:
    """An open /dev/kvm."""

    def __init__(self, device: str = DEFAULT_DEVICE) -> None:
        self.device = device
        try:
            self.fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{device} does not exist: load KVM (modprobe kvm_intel or kvm_amd) on a host with "
                "hardware virtualization enabled"
            ) from None
        except PermissionError:
            raise KvmUnavailableError(
                f"no permission to open {device}: add your user to the 'kvm' group "
                "(sudo usermod -aG kvm $USER, then log in again) or run as root"
            ) from None
        except OSError as error:
            raise KvmUnavailableError(f"cannot open {device}: {error.strerror}") from None
        version = ioctl(self.fd, c.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != c.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailableError(f"{device} speaks KVM API version {version}, vmscope needs 12")
        self.vcpu_mmap_size = ioctl(self.fd, c.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        self.backend = detect_backend()

    def check_extension(self, cap: c.Cap) -> int:
        """0 when the capability is absent, otherwise its value (often 1, or a count)."""
        return ioctl(self.fd, c.KVM_CHECK_EXTENSION, int(cap), f"KVM_CHECK_EXTENSION({cap.name})")

    def require(self, *caps: c.Cap) -> None:
        """Raise a clear error when any capability vmscope depends on is missing."""
        missing = [cap.name for cap in caps if not self.check_extension(cap)]
        if missing:
            raise KvmUnavailableError(
                f"this host's KVM lacks {', '.join('KVM_CAP_' + m for m in missing)}; "
                "vmscope needs a Linux 5.x or newer KVM host"
            )

    def supported_cpuid(self) -> list[s.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID, growing the buffer until the kernel's list fits."""
        count = 128
        while True:
            table = s.cpuid2_with_entries(count)()
            table.nent = count
            try:
                ioctl(self.fd, c.KVM_GET_SUPPORTED_CPUID, table, "KVM_GET_SUPPORTED_CPUID")
            except KvmError as error:
                if error.errno == 7 and count < 4096:  # E2BIG: the kernel has more entries
                    count *= 2
                    continue
                raise
            entries: list[s.kvm_cpuid_entry2] = []
            for index in range(table.nent):
                entry = s.kvm_cpuid_entry2()
                ctypes.pointer(entry)[0] = table.entries[index]
                entries.append(entry)
            return entries

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a vCPU (a snapshot's list)."""
        probe = s.kvm_msr_list(nmsrs=0)
        try:
            ioctl(self.fd, c.KVM_GET_MSR_INDEX_LIST, probe, "KVM_GET_MSR_INDEX_LIST")
        except KvmError as error:
            if error.errno != 7:  # E2BIG: the kernel wrote the count it needs
                raise
        table = s.msr_list_with_entries(probe.nmsrs)()
        table.nmsrs = probe.nmsrs
        ioctl(self.fd, c.KVM_GET_MSR_INDEX_LIST, table, "KVM_GET_MSR_INDEX_LIST")
        return [int(table.indices[i]) for i in range(table.nmsrs)]

    def create_vm(self) -> Vm:
        from vmscope.kvm.vm import Vm

        return Vm(self, ioctl(self.fd, c.KVM_CREATE_VM, 0, "KVM_CREATE_VM"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
