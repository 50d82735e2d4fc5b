"""A KVM virtual machine: memory slots, interrupt controllers, eventfds, vCPUs."""

from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING

from vmscope.errors import KvmError
from vmscope.kvm import constants as c
from vmscope.kvm import structs as s
from vmscope.kvm._ioctl import ioctl

if TYPE_CHECKING:
    from vmscope.kvm.system import Kvm
    from vmscope.kvm.vcpu import Vcpu

# Where KVM on Intel hosts keeps its real-mode TSS and identity map (3 pages below the
# 4 GiB boundary, inside the MMIO hole so they never collide with RAM).
TSS_ADDRESS = 0xFFFB_D000
IDENTITY_MAP_ADDRESS = 0xFFFB_C000


class Vm:
    """A VM file descriptor and the ioctls that act on the whole VM."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def check_extension(self, cap: c.Cap) -> int:
        return ioctl(self.fd, c.KVM_CHECK_EXTENSION, int(cap), f"KVM_CHECK_EXTENSION({cap.name})")

    def set_user_memory_region(
        self, slot: int, guest_address: int, size: int, host_address: int, flags: int = 0
    ) -> None:
        region = s.kvm_userspace_memory_region(slot, flags, guest_address, size, host_address)
        ioctl(self.fd, c.KVM_SET_USER_MEMORY_REGION, region, f"KVM_SET_USER_MEMORY_REGION(slot {slot})")

    def set_tss_address(self, address: int = TSS_ADDRESS) -> None:
        ioctl(self.fd, c.KVM_SET_TSS_ADDR, address, "KVM_SET_TSS_ADDR")

    def set_identity_map_address(self, address: int = IDENTITY_MAP_ADDRESS) -> None:
        value = s.u64(address)
        ioctl(self.fd, c.KVM_SET_IDENTITY_MAP_ADDR, value, "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        """In-kernel PIC, IOAPIC and per-vCPU LAPICs."""
        ioctl(self.fd, c.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        """In-kernel i8254 PIT (speaker port dummy included, as QEMU and Firecracker ask)."""
        config = s.kvm_pit_config(flags=1)  # KVM_PIT_SPEAKER_DUMMY
        ioctl(self.fd, c.KVM_CREATE_PIT2, config, "KVM_CREATE_PIT2")

    def set_irq_line(self, gsi: int, level: bool) -> None:
        ioctl(self.fd, c.KVM_IRQ_LINE, s.kvm_irq_level(gsi, int(level)), f"KVM_IRQ_LINE(gsi {gsi})")

    def signal_msi(self, address: int, data: int) -> int:
        msi = s.kvm_msi(address_lo=address & 0xFFFF_FFFF, address_hi=address >> 32, data=data)
        return ioctl(self.fd, c.KVM_SIGNAL_MSI, msi, "KVM_SIGNAL_MSI")

    def set_gsi_routing(self, entries: list[s.kvm_irq_routing_entry]) -> None:
        table = s.irq_routing_with_entries(len(entries))()
        table.nr = len(entries)
        for index, entry in enumerate(entries):
            table.entries[index] = entry
        ioctl(self.fd, c.KVM_SET_GSI_ROUTING, table, "KVM_SET_GSI_ROUTING")

    def register_irqfd(self, event_fd: int, gsi: int, resample_fd: int | None = None) -> None:
        """Let a write to ``event_fd`` raise ``gsi`` in the kernel, without a vCPU exit."""
        flags = c.IRQFD_FLAG_RESAMPLE if resample_fd is not None else 0
        irqfd = s.kvm_irqfd(fd=event_fd, gsi=gsi, flags=flags, resamplefd=resample_fd or 0)
        ioctl(self.fd, c.KVM_IRQFD, irqfd, f"KVM_IRQFD(gsi {gsi})")

    def unregister_irqfd(self, event_fd: int, gsi: int) -> None:
        irqfd = s.kvm_irqfd(fd=event_fd, gsi=gsi, flags=c.IRQFD_FLAG_DEASSIGN)
        ioctl(self.fd, c.KVM_IRQFD, irqfd, f"KVM_IRQFD deassign (gsi {gsi})")

    def register_ioeventfd(
        self,
        event_fd: int,
        address: int,
        length: int,
        *,
        pio: bool,
        datamatch: int | None = None,
        deassign: bool = False,
    ) -> None:
        """Let a guest write to ``address`` signal ``event_fd`` inside the kernel (no exit to us)."""
        flags = (c.IOEVENTFD_FLAG_PIO if pio else 0) | (c.IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= c.IOEVENTFD_FLAG_DATAMATCH
        request = s.kvm_ioeventfd(
            datamatch=datamatch or 0, addr=address, len=length, fd=event_fd, flags=flags
        )
        ioctl(self.fd, c.KVM_IOEVENTFD, request, f"KVM_IOEVENTFD({address:#x})")

    def register_coalesced_zone(self, address: int, size: int, *, pio: bool) -> None:
        """Queue guest writes to [address, address+size) in the coalesced ring (kvm.coalesced)
        instead of exiting; reads there still exit."""
        zone = s.kvm_coalesced_mmio_zone(addr=address, size=size, pio=int(pio))
        ioctl(self.fd, c.KVM_REGISTER_COALESCED_MMIO, zone, f"KVM_REGISTER_COALESCED_MMIO({address:#x})")

    def unregister_coalesced_zone(self, address: int, size: int, *, pio: bool) -> None:
        zone = s.kvm_coalesced_mmio_zone(addr=address, size=size, pio=int(pio))
        ioctl(self.fd, c.KVM_UNREGISTER_COALESCED_MMIO, zone, f"KVM_UNREGISTER_COALESCED_MMIO({address:#x})")

    def enable_cap(self, cap: c.Cap, *args: int) -> None:
        request = s.kvm_enable_cap(cap=int(cap))
        for index, value in enumerate(args):
            request.args[index] = value
        ioctl(self.fd, c.KVM_ENABLE_CAP, request, f"KVM_ENABLE_CAP({cap.name})")

    def enable_exit_on_emulation_failure(self) -> bool:
        """Ask KVM to exit with the instruction bytes on every emulation failure, where the
        host has KVM_CAP_EXIT_ON_EMULATION_FAILURE. Returns whether it is now on."""
        if not self.check_extension(c.Cap.EXIT_ON_EMULATION_FAILURE):
            return False
        self.enable_cap(c.Cap.EXIT_ON_EMULATION_FAILURE, 1)
        return True

    # -- saved state (snapshots): raw structure bytes, restored with the matching setter --------

    def get_pit2(self) -> bytes:
        state = s.kvm_pit_state2()
        ioctl(self.fd, c.KVM_GET_PIT2, state, "KVM_GET_PIT2")
        return bytes(state)

    def set_pit2(self, data: bytes) -> None:
        ioctl(self.fd, c.KVM_SET_PIT2, s.from_bytes(s.kvm_pit_state2, data, "PIT2"), "KVM_SET_PIT2")

    def get_clock(self) -> s.kvm_clock_data:
        clock = s.kvm_clock_data()
        ioctl(self.fd, c.KVM_GET_CLOCK, clock, "KVM_GET_CLOCK")
        return clock

    def set_clock(self, nanoseconds: int) -> None:
        """Set kvmclock's base (flags 0: the guest's clock continues from ``nanoseconds``)."""
        ioctl(self.fd, c.KVM_SET_CLOCK, s.kvm_clock_data(clock=nanoseconds), "KVM_SET_CLOCK")

    def get_irqchip(self, chip_id: int) -> bytes:
        """The 512-byte state of one in-kernel chip (c.IRQCHIP_PIC_MASTER, _PIC_SLAVE, _IOAPIC)."""
        chip = s.kvm_irqchip(chip_id=chip_id)
        ioctl(self.fd, c.KVM_GET_IRQCHIP, chip, f"KVM_GET_IRQCHIP({chip_id})")
        return bytes(chip.chip)

    def set_irqchip(self, chip_id: int, data: bytes) -> None:
        chip = s.kvm_irqchip(chip_id=chip_id)
        if len(data) != len(chip.chip):
            raise KvmError(f"irqchip {chip_id} state is {len(data)} bytes, KVM wants {len(chip.chip)}")
        ctypes.memmove(chip.chip, data, len(data))
        ioctl(self.fd, c.KVM_SET_IRQCHIP, chip, f"KVM_SET_IRQCHIP({chip_id})")

    def stats_fd(self) -> int:
        """A file descriptor for the VM's binary statistics (see kvm.stats)."""
        return ioctl(self.fd, c.KVM_GET_STATS_FD, 0, "KVM_GET_STATS_FD")

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        from vmscope.kvm.vcpu import Vcpu

        fd = ioctl(self.fd, c.KVM_CREATE_VCPU, vcpu_id, f"KVM_CREATE_VCPU({vcpu_id})")
        return Vcpu(self, vcpu_id, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
