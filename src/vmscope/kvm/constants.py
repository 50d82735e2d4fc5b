"""KVM API numbers: ioctl requests (built from the _IOC encoding), capabilities, exit reasons.

Values come from linux/kvm.h and asm/kvm.h; tests/unit/test_kvm_abi.py checks them against
the system headers with a compiled C program.
"""

from __future__ import annotations

import ctypes
import enum

from vmscope.kvm import structs as s

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2
KVMIO = 0xAE


def _ioc(direction: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | number


def _io(number: int) -> int:
    return _ioc(_IOC_NONE, number, 0)


def _ior(number: int, ctype: type) -> int:
    return _ioc(_IOC_READ, number, ctypes.sizeof(ctype))


def _iow(number: int, ctype: type) -> int:
    return _ioc(_IOC_WRITE, number, ctypes.sizeof(ctype))


def _iowr(number: int, ctype: type) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, number, ctypes.sizeof(ctype))


# system ioctls (/dev/kvm)
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, s.kvm_msr_list)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, s.kvm_cpuid2)

# VM ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, s.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, s.kvm_irq_level)
KVM_GET_IRQCHIP = _iowr(0x62, s.kvm_irqchip)
KVM_SET_IRQCHIP = _ior(0x63, s.kvm_irqchip)  # sic: the kernel defines it as _IOR
KVM_SET_GSI_ROUTING = _iow(0x6A, s.kvm_irq_routing)
KVM_IRQFD = _iow(0x76, s.kvm_irqfd)
KVM_CREATE_PIT2 = _iow(0x77, s.kvm_pit_config)
KVM_SET_CLOCK = _iow(0x7B, s.kvm_clock_data)
KVM_GET_CLOCK = _ior(0x7C, s.kvm_clock_data)
KVM_GET_PIT2 = _ior(0x9F, s.kvm_pit_state2)
KVM_SET_PIT2 = _iow(0xA0, s.kvm_pit_state2)
KVM_IOEVENTFD = _iow(0x79, s.kvm_ioeventfd)
KVM_SIGNAL_MSI = _iow(0xA5, s.kvm_msi)
KVM_REGISTER_COALESCED_MMIO = _iow(0x67, s.kvm_coalesced_mmio_zone)
KVM_UNREGISTER_COALESCED_MMIO = _iow(0x68, s.kvm_coalesced_mmio_zone)
#: the page of the vCPU mmap (asm/kvm.h, x86) where the VM's coalesced ring is mapped (x86)
KVM_COALESCED_MMIO_PAGE_OFFSET = 2  # page 1 is the PIO data page
KVM_ENABLE_CAP = _iow(0xA3, s.kvm_enable_cap)
KVM_GET_STATS_FD = _io(0xCE)

# vCPU ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, s.kvm_regs)
KVM_SET_REGS = _iow(0x82, s.kvm_regs)
KVM_GET_SREGS = _ior(0x83, s.kvm_sregs)
KVM_SET_SREGS = _iow(0x84, s.kvm_sregs)
KVM_GET_MSRS = _iowr(0x88, s.kvm_msrs)
KVM_SET_MSRS = _iow(0x89, s.kvm_msrs)
KVM_GET_FPU = _ior(0x8C, s.kvm_fpu)
KVM_SET_FPU = _iow(0x8D, s.kvm_fpu)
KVM_GET_LAPIC = _ior(0x8E, s.kvm_lapic_state)
KVM_SET_LAPIC = _iow(0x8F, s.kvm_lapic_state)
KVM_SET_CPUID2 = _iow(0x90, s.kvm_cpuid2)
KVM_GET_CPUID2 = _iowr(0x91, s.kvm_cpuid2)
KVM_GET_MP_STATE = _ior(0x98, s.kvm_mp_state)
KVM_SET_MP_STATE = _iow(0x99, s.kvm_mp_state)
KVM_SET_GUEST_DEBUG = _iow(0x9B, s.kvm_guest_debug)
KVM_GET_VCPU_EVENTS = _ior(0x9F, s.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _iow(0xA0, s.kvm_vcpu_events)
KVM_GET_DEBUGREGS = _ior(0xA1, s.kvm_debugregs)
KVM_SET_DEBUGREGS = _iow(0xA2, s.kvm_debugregs)
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, s.kvm_xsave)
KVM_SET_XSAVE = _iow(0xA5, s.kvm_xsave)
KVM_GET_XCRS = _ior(0xA6, s.kvm_xcrs)
KVM_SET_XCRS = _iow(0xA7, s.kvm_xcrs)

KVM_API_VERSION = 12


class Cap(enum.IntEnum):
    """KVM_CAP_* values vmscope asks about."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    MP_STATE = 14
    COALESCED_MMIO = 15
    SET_GUEST_DEBUG = 23
    IRQ_ROUTING = 25
    IRQFD = 32
    PIT2 = 33
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    ADJUST_CLOCK = 39
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    XSAVE = 55
    XCRS = 56
    TSC_CONTROL = 60
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    SYNC_REGS = 74
    SIGNAL_MSI = 77
    READONLY_MEM = 81
    SPLIT_IRQCHIP = 121
    IMMEDIATE_EXIT = 136
    X86_DISABLE_EXITS = 143
    COALESCED_PIO = 162
    BINARY_STATS_FD = 203
    EXIT_ON_EMULATION_FAILURE = 204
    PMU_CAPABILITY = 212


class ExitReason(enum.IntEnum):
    """KVM_EXIT_* values (kvm_run.exit_reason)."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    X86_BUS_LOCK = 33
    NOTIFY = 37


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# kvm_run.internal.suberror
INTERNAL_ERROR_SUBERRORS = {
    1: "emulation failure",
    2: "simultaneous exceptions",
    3: "delivery event",
    4: "unexpected exit reason",
}

#: kvm_run.emulation_failure.flags: insn_size/insn_bytes hold the failing instruction
INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0
INTERNAL_ERROR_EMULATION = 1

# kvm_vcpu_events.flags: which parts KVM_SET_VCPU_EVENTS applies
VCPUEVENT_VALID_NMI_PENDING = 1 << 0
VCPUEVENT_VALID_SIPI_VECTOR = 1 << 1
VCPUEVENT_VALID_SHADOW = 1 << 2
VCPUEVENT_VALID_PAYLOAD = 1 << 4

# kvm_run.system_event.type
SYSTEM_EVENT_TYPES = {1: "shutdown", 2: "reset", 3: "crash", 4: "wakeup", 5: "suspend", 6: "SEV termination"}

# KVM_SYNC_X86_* bits for kvm_valid_regs / kvm_dirty_regs
SYNC_X86_REGS = 1 << 0
SYNC_X86_SREGS = 1 << 1
SYNC_X86_EVENTS = 1 << 2

# KVM_MP_STATE_*
MP_STATE_RUNNABLE = 0
MP_STATE_UNINITIALIZED = 1
MP_STATE_INIT_RECEIVED = 2
MP_STATE_HALTED = 3
MP_STATE_SIPI_RECEIVED = 4

# KVM_GUESTDBG_*
GUESTDBG_ENABLE = 1 << 0
GUESTDBG_SINGLESTEP = 1 << 1
GUESTDBG_USE_SW_BP = 1 << 16
GUESTDBG_USE_HW_BP = 1 << 17
GUESTDBG_INJECT_DB = 1 << 18
GUESTDBG_INJECT_BP = 1 << 19

# ioeventfd / irqfd flags
IOEVENTFD_FLAG_DATAMATCH = 1 << 0
IOEVENTFD_FLAG_PIO = 1 << 1
IOEVENTFD_FLAG_DEASSIGN = 1 << 2
IRQFD_FLAG_DEASSIGN = 1 << 0
IRQFD_FLAG_RESAMPLE = 1 << 1

# KVM_X86_DISABLE_EXITS_*
X86_DISABLE_EXITS_MWAIT = 1 << 0
X86_DISABLE_EXITS_HLT = 1 << 1
X86_DISABLE_EXITS_PAUSE = 1 << 2
X86_DISABLE_EXITS_CSTATE = 1 << 3

# kvm_irqchip.chip_id
IRQCHIP_PIC_MASTER = 0
IRQCHIP_PIC_SLAVE = 1
IRQCHIP_IOAPIC = 2

MEM_LOG_DIRTY_PAGES = 1 << 0
MEM_READONLY = 1 << 1
