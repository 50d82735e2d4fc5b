"""A virtual machine: KVM objects, guest RAM, buses, platform devices and vCPU threads.

``Machine`` is both what the CLI drives and the public Python API::

    vm = Machine(mem="256M", cpus=2)
    vm.load("guest.elf", cmdline="console=ttyS0")
    result = vm.run()          # or vm.start(); ...; vm.wait()
    print(result.exit_status)

Stop, pause and resume work from any thread. The first stop request wins and decides the
exit status: a debug-exit write gives (value << 1) | 1, a clean power-off or reset 0, a crash
1 (with a :class:`CrashReport`), a signal 128 + its number.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from vmscope import sandbox
from vmscope.arch.x86 import cpuid as cpuid_policy
from vmscope.bus import MmioBus, PioBus
from vmscope.devices.base import Device, InterruptLine
from vmscope.errors import ConfigError, KvmError
from vmscope.firmware import FirmwareContributions, FirmwareContributor
from vmscope.kvm import BinaryStats, Cap, Kvm, Vcpu, describe_backend
from vmscope.kvm import structs as s
from vmscope.kvm.constants import INTERNAL_ERROR_EMULATION, ExitReason
from vmscope.kvm.exits import RareExit, decode_rare_exit
from vmscope.kvm.registers import GENERAL_REGISTERS, register_dict
from vmscope.loader.base import LoadedGuest
from vmscope.memory.guest_memory import GuestMemory, check_fits_host, parse_size
from vmscope.records import record_repr
from vmscope.vmm.coalescing import CoalescedWrites
from vmscope.vmm.config import MachineConfig
from vmscope.vmm.entry_state import apply_entry_state
from vmscope.vmm.hooks import ExitEvent, ExitHook, ExitHooks
from vmscope.vmm.interrupts import KvmIrqLine
from vmscope.vmm.rare_exits import RareExitHandlers
from vmscope.vmm.runner import VcpuRunner, install_kick_handler

# Imported where used (start-up time, issue 15): loaders and firmware tables only by load(), which a
# restored machine never calls; paging, crash reports, PCI and the fallback emulator on demand.
if TYPE_CHECKING:
    from vmscope.arch.x86.cpu_state import CpuMode
    from vmscope.arch.x86.e820 import E820Entry
    from vmscope.loader import GuestKind
    from vmscope.memory.paging import PagingMode
    from vmscope.virtio.pci_attach import PciPlatform
    from vmscope.vmm.crash import CrashReport
    from vmscope.vmm.fallback import FallbackEmulator

log = logging.getLogger("vmscope.machine")

Decompression = Literal["auto", "vmm", "guest"]
DECOMPRESSION_CHOICES: tuple[Decompression, ...] = ("auto", "vmm", "guest")

REQUIRED_CAPS = (Cap.USER_MEMORY, Cap.IRQCHIP, Cap.PIT2, Cap.IMMEDIATE_EXIT, Cap.SET_TSS_ADDR, Cap.MP_STATE)


class RunResult:
    """How a run ended."""

    __slots__ = ("crash", "duration_s", "emulated_instructions", "exit_status", "reason")

    exit_status: int
    reason: str
    crash: CrashReport | None
    duration_s: float
    #: instructions KVM could not emulate that vmscope's fallback emulator completed
    emulated_instructions: int

    def __init__(
        self,
        exit_status: int,
        reason: str,
        crash: CrashReport | None = None,
        duration_s: float = 0.0,
        emulated_instructions: int = 0,
    ) -> None:
        self.exit_status = exit_status
        self.reason = reason
        self.crash = crash
        self.duration_s = duration_s
        self.emulated_instructions = emulated_instructions

    __repr__ = record_repr


class UnclaimedCount:
    """Guest accesses of one width to a port or MMIO address that no device claimed.

    A plain class, not a NamedTuple: a tuple's ``count`` method would clash with the field.
    Compared and hashed by value; treat it as read-only.
    """

    __slots__ = ("address", "count", "is_write", "size", "space")

    space: str  # "pio" | "mmio"
    address: int
    size: int
    is_write: bool
    count: int

    def __init__(self, space: str, address: int, size: int, is_write: bool, count: int) -> None:
        self.space = space
        self.address = address
        self.size = size
        self.is_write = is_write
        self.count = count

    def _key(self) -> tuple[str, int, int, bool, int]:
        return (self.space, self.address, self.size, self.is_write, self.count)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UnclaimedCount):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    __repr__ = record_repr


class _StopState:
    __slots__ = ("crash", "exit_status", "reason")

    def __init__(self, reason: str, exit_status: int, crash: CrashReport | None = None) -> None:
        self.reason = reason
        self.exit_status = exit_status
        self.crash = crash


class DeviceMapping:
    """A device registered on a bus, as listed by :meth:`Machine.devices`."""

    __slots__ = ("base", "bus", "device", "extra", "length")

    bus: str
    base: int
    length: int
    device: Device
    extra: dict[str, int]

    def __init__(
        self, bus: str, base: int, length: int, device: Device, extra: dict[str, int] | None = None
    ) -> None:
        self.bus = bus
        self.base = base
        self.length = length
        self.device = device
        self.extra = {} if extra is None else extra

    __repr__ = record_repr


def _to_policy_entries(entries: Sequence[s.kvm_cpuid_entry2]) -> list[cpuid_policy.CpuidEntry]:
    return [
        cpuid_policy.CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in entries
    ]


def _to_kvm_entries(entries: Sequence[cpuid_policy.CpuidEntry]) -> list[s.kvm_cpuid_entry2]:
    return [
        s.kvm_cpuid_entry2(
            function=e.function, index=e.index, flags=e.flags, eax=e.eax, ebx=e.ebx, ecx=e.ecx, edx=e.edx
        )
        for e in entries
    ]


class Machine:
    """One VM with its vCPU threads. Create it, add devices, load a guest, run it."""

    def __init__(
        self,
        mem: int | str = "256M",
        cpus: int = 1,
        *,
        cpu_features: str = "",
        kvm_device: str = "/dev/kvm",
        strict_devices: bool = False,
        emulate_fallback: bool = True,
        memory: GuestMemory | None = None,
        coalesce_writes: bool = True,
    ) -> None:
        """``strict_devices``: a device model that raises stops the VM (status 1) instead of
        being logged and answered with all-ones while the guest runs on.
        ``emulate_fallback``: complete in vmscope the instructions the host's KVM fails to
        emulate (vmm.fallback); off, such a failure ends the run with a crash report.
        ``memory``: guest RAM already mapped (of ``mem`` bytes; e.g. a snapshot's), instead of
        fresh zeroed RAM.
        ``coalesce_writes``: let KVM queue writes no device claims and writes to side-effect-free
        devices (port 0x80) in its coalesced ring instead of exiting (vmm.coalescing); they are
        still delivered in order and counted, as "out coalesced" / "write coalesced"."""
        size = parse_size(mem) if isinstance(mem, str) else int(mem)
        check_fits_host(size)
        if memory is not None and memory.size != size:
            raise ConfigError(f"the given guest memory is {memory.size} bytes, not {size}")
        self.kvm = Kvm(kvm_device)
        self.kvm.require(*REQUIRED_CAPS)
        if self.kvm.backend == "kvm_pvm":
            log.info(
                "%s; some instructions cannot run in guest kernel mode", describe_backend(self.kvm.backend)
            )
        max_cpus = self.kvm.check_extension(Cap.MAX_VCPUS) or self.kvm.check_extension(Cap.NR_VCPUS)
        if not 1 <= cpus <= max_cpus:
            raise ConfigError(f"--cpus {cpus} is out of range: this host allows 1 to {max_cpus} vCPUs")
        self.cpu_count = cpus
        self.cpu_policy = cpuid_policy.parse_feature_policy(cpu_features)
        self.vm = self.kvm.create_vm()
        self.vm.set_tss_address()
        self.vm.set_identity_map_address()
        self.vm.create_irqchip()
        self.vm.create_pit2()

        self.memory = memory if memory is not None else GuestMemory.for_size(size)
        for region in self.memory.regions:
            self.vm.set_user_memory_region(region.slot, region.guest_base, region.size, region.host_address)

        self.pio_bus = PioBus()
        self.mmio_bus = MmioBus()
        if strict_devices:
            self.pio_bus.on_device_error = self.mmio_bus.on_device_error = self._stop_on_device_error
        self._irq_lines: dict[int, KvmIrqLine] = {}
        self._device_mappings: list[DeviceMapping] = []

        #: exit hooks (user observers and the profiler); see vmscope.vmm.hooks
        self.hooks = ExitHooks()
        #: code that takes some rare exits before the default decision (the GDB stub takes
        #: KVM_EXIT_DEBUG, the fallback emulator takes emulation failures)
        self.rare_exit_handlers = RareExitHandlers()
        supported_cpuid = self.kvm.supported_cpuid()
        supported = _to_policy_entries(supported_cpuid)
        #: completes what KVM cannot emulate; made at the first failure (it imports capstone,
        #: which most runs never need: start-up time, issue 15); None until then or when off
        self.fallback: FallbackEmulator | None = None
        self.emulate_fallback = emulate_fallback
        self._supported_cpuid = supported_cpuid
        self._fallback_lock = threading.Lock()
        if emulate_fallback:
            if self.vm.enable_exit_on_emulation_failure():
                log.debug("KVM exits with the instruction bytes on every emulation failure")
            self.rare_exit_handlers.add(ExitReason.INTERNAL_ERROR, self._complete_emulation_failure)
        self.runners: list[VcpuRunner] = []
        for vcpu_id in range(cpus):
            vcpu = self.vm.create_vcpu(vcpu_id)
            entries = cpuid_policy.apply_policy(supported, self.cpu_policy, vcpu_id, cpus)
            vcpu.set_cpuid(_to_kvm_entries(entries))
            runner = VcpuRunner(self, vcpu)
            self.runners.append(runner)
            self.hooks.attach_runner(runner)
        #: KVM's coalesced ring and zones (None when off or the host has none)
        self.coalescing: CoalescedWrites | None = self._start_coalescing() if coalesce_writes else None

        self.guest: LoadedGuest | None = None
        #: how this machine was built (set by vmm.assemble); what a snapshot records
        self.config: MachineConfig | None = None
        #: what devices and attachments add to ACPI tables and a kernel's command line
        self.firmware = FirmwareContributions()
        #: the PCI bus and its routing, made by the first virtio-pci attachment
        self.pci_platform: PciPlatform | None = None
        #: virtio devices attached with vmm.virtio_setup (for stats and request traces)
        self.virtio_attachments: list[Any] = []
        #: resolves a guest address to "function+0xoff" for crash reports (set when symbols exist)
        self.symbolize: Callable[[int], str | None] | None = None

        self._stop: _StopState | None = None
        self._stop_lock = threading.Lock()
        self._all_exited = threading.Event()
        self._exited_count = 0
        self._started_at: float | None = None
        self._finished_at: float | None = None
        self._stats_fds: dict[str, BinaryStats] = {}
        self._closed = False

    def _start_coalescing(self) -> CoalescedWrites | None:
        pio = bool(self.kvm.check_extension(Cap.COALESCED_PIO))
        mmio = bool(self.kvm.check_extension(Cap.COALESCED_MMIO))
        ring = self.runners[0].vcpu.coalesced_ring() if pio or mmio else None
        if ring is None:
            return None
        coalescing = CoalescedWrites(
            self.vm, ring, self.pio_bus, self.mmio_bus, lambda key: bool(self.hooks.match(key)),
            pio=pio, mmio=mmio,
        )  # fmt: skip
        coalescing.default_stats = self.runners[0].stats
        for runner in self.runners:
            runner.stats.before_read = functools.partial(coalescing.deliver, None)
        self.hooks.change_listeners.append(coalescing.revalidate)
        return coalescing

    # -- devices ----------------------------------------------------------------------------

    @property
    def vcpus(self) -> list[Vcpu]:
        return [runner.vcpu for runner in self.runners]

    def interrupt_line(self, gsi: int) -> InterruptLine:
        """The interrupt input ``gsi`` (ISA IRQs 0-15 reach both the PIC and the IOAPIC)."""
        if not 0 <= gsi < 24:
            raise ConfigError(f"GSI {gsi} is out of range: the IOAPIC has pins 0-23")
        line = self._irq_lines.get(gsi)
        if line is None:
            line = self._irq_lines[gsi] = KvmIrqLine(self.vm, gsi)
        return line

    def add_pio_device(self, base: int, length: int, device: Device) -> None:
        """Map ``device`` at I/O ports [base, base+length)."""
        self.pio_bus.register(base, length, device)
        self._device_added(DeviceMapping("pio", base, length, device))

    def add_mmio_device(self, base: int, length: int, device: Device) -> None:
        """Map ``device`` at guest-physical [base, base+length); it must not overlap RAM."""
        for ram_base, ram_size in self.memory.ranges():
            if base < ram_base + ram_size and ram_base < base + length:
                raise ConfigError(
                    f"MMIO window {base:#x}+{length:#x} for {device.name} overlaps guest RAM "
                    f"{ram_base:#x}-{ram_base + ram_size - 1:#x}"
                )
        self.mmio_bus.register(base, length, device)
        self._device_added(DeviceMapping("mmio", base, length, device))

    def _device_added(self, mapping: DeviceMapping) -> None:
        device = mapping.device
        first_window = all(other.device is not device for other in self._device_mappings)
        self._device_mappings.append(mapping)
        if isinstance(device, FirmwareContributor):
            self.firmware.add(device)
        if first_window and self._started_at is not None:  # added to a running machine
            device.start()

    def _start_devices(self) -> None:
        started: set[int] = set()
        for mapping in self._device_mappings:
            if id(mapping.device) not in started:
                started.add(id(mapping.device))
                mapping.device.start()

    def add_exit_hook(
        self,
        callback: Callable[[ExitEvent], None],
        *,
        reasons: Sequence[str | int] | None = None,
        addresses: range | Sequence[tuple[int, int]] | None = None,
        registers: bool = True,
    ) -> ExitHook:
        """Call ``callback(event)`` on the vCPU thread for each matching exit (see vmm.hooks)."""
        return self.hooks.add(callback, reasons=reasons, addresses=addresses, registers=registers)

    def remove_exit_hook(self, hook: ExitHook) -> None:
        self.hooks.remove(hook)

    def devices(self) -> list[DeviceMapping]:
        return list(self._device_mappings)

    def device_name_at(self, bus: str, address: int) -> str | None:
        """Name of the device claiming ``address`` on ``bus`` ("pio" or "mmio"), for reports."""
        found = (self.pio_bus if bus == "pio" else self.mmio_bus).lookup(address)
        return found[0].name if found else None

    def _stop_on_device_error(self, device: Device, error: Exception) -> None:
        self.request_stop(f"device {device.name} failed: {error}", 1)

    # -- guest state (memory anywhere; registers while paused or before start) --------------

    def read_physical(self, address: int, length: int) -> bytes:
        return self.memory.read(address, length)

    def write_physical(self, address: int, data: bytes) -> None:
        self.memory.write(address, data)

    def _paging_mode(self, vcpu: int) -> PagingMode:
        from vmscope.memory.paging import PagingMode

        sregs = self._stopped_vcpu(vcpu).get_sregs()
        return PagingMode.from_sregs(sregs)

    def read_virtual(self, address: int, length: int, *, vcpu: int = 0) -> bytes:
        """Read through ``vcpu``'s page tables (the VM must be paused or not yet started)."""
        from vmscope.memory.paging import read_virtual

        return read_virtual(self.memory, self._paging_mode(vcpu), address, length)

    def write_virtual(self, address: int, data: bytes, *, vcpu: int = 0) -> None:
        from vmscope.memory.paging import write_virtual

        write_virtual(self.memory, self._paging_mode(vcpu), address, data)

    def _stopped_vcpu(self, vcpu: int) -> Vcpu:
        if self._closed:
            raise ConfigError("this machine is closed; create a new Machine")
        if not 0 <= vcpu < len(self.runners):
            raise ConfigError(f"vCPU {vcpu} does not exist: this machine has {len(self.runners)}")
        runner = self.runners[vcpu]
        if self.running and not runner.paused.is_set() and not runner.exited.is_set():
            raise ConfigError(f"vCPU {vcpu} is running: pause() the machine before touching its registers")
        return runner.vcpu

    def get_registers(self, vcpu: int = 0) -> dict[str, int]:
        """General registers, rip, rflags and control registers of a stopped vCPU."""
        target = self._stopped_vcpu(vcpu)
        return register_dict(target.get_regs(), target.get_sregs())

    def set_registers(self, vcpu: int = 0, **values: int) -> None:
        """Change general registers / rip / rflags of a stopped vCPU, e.g. ``set_registers(0, rax=1)``."""
        target = self._stopped_vcpu(vcpu)
        regs = target.get_regs()
        known = set(GENERAL_REGISTERS)
        unknown = sorted(set(values) - known)
        if unknown:
            expected = ", ".join(sorted(known))
            raise ConfigError(f"unknown register(s) {', '.join(unknown)}: expected {expected}")
        for name, value in values.items():
            setattr(regs, name, value)
        target.set_regs(regs)

    # -- guest ------------------------------------------------------------------------------

    def load(
        self,
        path: str | Path,
        *,
        kind: GuestKind = "auto",
        cmdline: str = "",
        modules: Sequence[Path] = (),
        flat_address: int | None = None,
        flat_mode: CpuMode | None = None,
        flat_entry: int | None = None,
        firmware_tables: bool = True,
        decompress: Decompression = "auto",
    ) -> LoadedGuest:
        """Load a guest image and point the boot vCPU at its entry.

        Kernels (bzImage, PVH and plain ELF) also get ACPI tables and an MP table describing
        this machine's CPUs, interrupt controllers and devices; flat binaries get none.

        ``decompress``: who decompresses a bzImage's kernel. "guest" runs the kernel's own
        decompressor; "vmm" decompresses it here and enters the vmlinux directly (no KASLR);
        "auto" picks "vmm" on kvm_pvm hosts, where the decompressor is minutes of emulated
        kernel-mode code, and "guest" elsewhere.
        """
        if decompress not in DECOMPRESSION_CHOICES:
            raise ConfigError(
                f"decompress={decompress!r}: expected one of {', '.join(DECOMPRESSION_CHOICES)}"
            )
        from vmscope.arch.x86.acpi import build_acpi_tables
        from vmscope.arch.x86.mptable import build_mptable
        from vmscope.loader.dispatch import load_guest, takes_cmdline

        on_host = decompress == "vmm" or (decompress == "auto" and self.kvm.backend == "kvm_pvm")
        rsdp_address = 0
        reserved: Sequence[E820Entry] = ()
        firmware = self.firmware.collect()
        if firmware_tables and kind != "flat":
            tables = build_acpi_tables(
                self.memory,
                self.cpu_count,
                virtio_mmio_devices=firmware.virtio_mmio,
                cmos_rtc="cmos_rtc" in firmware.boot_flags,
                i8042="i8042" in firmware.boot_flags,
                extra_dsdt_aml=firmware.dsdt_aml,
            )
            build_mptable(self.memory, self.cpu_count)
            rsdp_address, reserved = tables.rsdp_address, tables.reserved_ranges
        if firmware.cmdline and kind != "flat" and takes_cmdline(Path(path)):
            cmdline = " ".join([cmdline, *firmware.cmdline]).strip()
        if kind != "flat" and self.kvm.backend == "kvm_pvm" and self.emulate_fallback:
            cmdline = self._steer_linux_away_from_unemulated_features(Path(path), cmdline)
        guest = load_guest(
            self.memory,
            Path(path),
            kind=kind,
            cmdline=cmdline,
            modules=modules,
            flat_address=flat_address,
            flat_mode=flat_mode,
            flat_entry=flat_entry,
            rsdp_address=rsdp_address,
            extra_e820=reserved,
            decompress_on_host=on_host,
        )
        log.info("guest: %s", guest.kind)
        self.boot_from(guest)
        return guest

    def _steer_linux_away_from_unemulated_features(self, path: Path, cmdline: str) -> str:
        """On kvm_pvm hosts, clearcpuid= for a Linux kernel (see vmm.cpu_steering)."""
        from vmscope.loader import is_linux_kernel
        from vmscope.vmm.cpu_steering import features_to_hide, host_cpu_flags, with_clearcpuid

        if not is_linux_kernel(path):
            return cmdline
        hidden = features_to_hide(host_cpu_flags())
        if hidden:
            log.info(
                "kvm_pvm host: hiding from the Linux kernel the CPU features whose kernel-mode "
                "instructions neither this host's KVM nor vmscope can complete: clearcpuid=%s",
                ",".join(hidden),
            )
        return with_clearcpuid(cmdline, hidden)

    def boot_from(self, guest: LoadedGuest) -> None:
        """Set the boot vCPU to a loaded guest's entry state (for loaders used directly)."""
        apply_entry_state(self.runners[0].vcpu, guest.entry)
        self.guest = guest
        if guest.symbol_file is not None and self.symbolize is None:
            self.symbolize = _elf_symbolizer(guest.symbol_file)

    def adopt_restored_guest(self, *, kind: str, symbol_file: Path | None) -> None:
        """RAM and vCPU state came from a snapshot: the machine may start without load().

        The guest record only describes the image (symbols, kind); its entry state is never
        applied, since the vCPUs continue from their restored registers.
        """
        from vmscope.arch.x86.modes import real_mode_state

        self.guest = LoadedGuest(real_mode_state(0), symbol_file=symbol_file, kind=kind)
        if symbol_file is not None and self.symbolize is None:
            self.symbolize = _elf_symbolizer(symbol_file)

    # -- running ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start every vCPU thread and return at once."""
        if self._started_at is not None:
            raise ConfigError("this machine was already started; create a new Machine to run again")
        if self.guest is None:
            raise ConfigError("no guest loaded: call load() before start()")
        if threading.current_thread() is threading.main_thread():
            install_kick_handler()
        elif signal.getsignal(signal.SIGRTMIN + 1) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise ConfigError(
                "start the first Machine from the main thread, or call "
                "vmscope.vmm.runner.install_kick_handler() there first (vCPU kicks need a signal handler)"
            )
        self._started_at = time.monotonic()
        self._start_devices()  # after every state is final: a restore loaded it before start()
        for runner in self.runners:
            runner.start()

    def wait(self, timeout: float | None = None) -> RunResult | None:
        """Wait for the run to end; None if ``timeout`` seconds passed first."""
        if not self._all_exited.wait(timeout):
            return None
        return self.result()

    def run(self, timeout: float | None = None, *, confine_caller: bool = False) -> RunResult:
        """Start, wait until the guest stops (or ``timeout``, or Ctrl-C / SIGTERM), return how it ended.

        ``confine_caller``: once the machine runs, bind the calling thread to the sandbox's "main"
        allow-list too (the CLI does; a program embedding vmscope usually cannot live with that)."""
        if timeout is not None and not timeout > 0:  # also NaN
            raise ConfigError(f"timeout {timeout!r}: give a positive number of seconds (or None)")
        previous_term = None
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            previous_term = signal.signal(
                signal.SIGTERM, lambda signum, frame: self.request_stop("stopped by SIGTERM", 128 + signum)
            )
        try:
            self.start()
            if confine_caller:
                sandbox.enter("main")
            try:
                if self.wait(timeout) is None:
                    self.request_stop(f"stopped after the {timeout:g} s time limit", 124)
                    self.wait()
            except KeyboardInterrupt:
                self.request_stop("stopped by Ctrl-C (SIGINT)", 128 + signal.SIGINT)
                self.wait()
        finally:
            if in_main and previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
        self._log_unclaimed()  # legacy ports a guest probes in a loop show up here (-vv)
        return self.result()

    def unclaimed_counts(self) -> list[UnclaimedCount]:
        """Every access no device claimed so far, per space, address, width and direction (the
        one walk of the buses' counters, for logs, profiles and the control socket)."""
        return [
            UnclaimedCount(space, address, size, is_write, count)
            for space, bus in (("pio", self.pio_bus), ("mmio", self.mmio_bus))
            for is_write, counter in ((False, bus.unclaimed_reads), (True, bus.unclaimed_writes))
            # list() copies in one step under the GIL: vCPU threads may add keys meanwhile
            for (address, size), count in list(counter.items())
        ]

    def unclaimed_accesses(self, limit: int = 10) -> list[tuple[str, int, int, str, int]]:
        """The most frequent accesses no device claimed: (bus, address, size, "read"/"write", count)."""
        bus_names = {"pio": self.pio_bus.name, "mmio": self.mmio_bus.name}
        rows = [
            (bus_names[u.space], u.address, u.size, "write" if u.is_write else "read", u.count)
            for u in self.unclaimed_counts()
        ]
        return sorted(rows, key=lambda row: -row[4])[:limit]

    def _log_unclaimed(self) -> None:
        if log.isEnabledFor(logging.DEBUG):
            for bus, address, size, access, count in self.unclaimed_accesses():
                log.debug("unclaimed %s %#x %s (%d bytes): %d accesses", bus, address, access, size, count)

    def result(self) -> RunResult:
        stop = self._stop or _StopState("still running", -1)
        end = self._finished_at or time.monotonic()
        duration = end - self._started_at if self._started_at is not None else 0.0
        return RunResult(stop.exit_status, stop.reason, stop.crash, duration, self.emulated_instructions)

    @property
    def emulated_instructions(self) -> int:
        """How many instructions KVM could not emulate vmscope completed so far."""
        return self.fallback.completed if self.fallback is not None else 0

    def _complete_emulation_failure(self, runner: VcpuRunner, rare_exit: RareExit) -> bool | None:
        """Rare-exit handler: True when vmscope finished the instruction KVM could not emulate;
        None (a crash report follows) for other internal errors or what the fallback cannot do."""
        if rare_exit.code != 1 or not self.emulate_fallback:
            return None
        fallback = self.fallback or self._make_fallback()
        return True if fallback.complete(runner.vcpu) else None

    def _make_fallback(self) -> FallbackEmulator:
        from vmscope.vmm.fallback import FallbackEmulator, xstate_from_cpuid

        with self._fallback_lock:  # two vCPUs may fail at once
            if self.fallback is None:
                supported_xcr0, layout = xstate_from_cpuid(self._supported_cpuid)
                self.fallback = FallbackEmulator(
                    self.memory, supported_xcr0=supported_xcr0, xstate_layout=layout
                )
            return self.fallback

    def fallback_counts(self) -> list[tuple[int, str, int, int, int]]:
        """(vcpu, mnemonic, guest rip, count, total ns) per instruction vmscope completed,
        most frequent first (empty with the fallback off)."""
        if self.fallback is None:
            return []
        return [(r.vcpu, r.mnemonic, r.rip, r.count, r.total_ns) for r in self.fallback.counts()]

    @property
    def running(self) -> bool:
        return self._started_at is not None and not self._all_exited.is_set()

    def request_stop(self, reason: str, exit_status: int) -> None:
        """Stop every vCPU; the first request decides the exit status (MachineControl)."""
        with self._stop_lock:
            if self._stop is None:
                self._stop = _StopState(reason, exit_status)
                log.info("stopping with exit status %d: %s", exit_status, reason)
                if self.emulated_instructions:
                    log.info(
                        "vmscope completed %d instructions KVM could not emulate", self.emulated_instructions
                    )
        for runner in self.runners:
            runner.request_stop()

    def stop(self) -> RunResult:
        """Stop the VM from any thread and wait for the vCPU threads to finish."""
        self.request_stop("stopped by the host", 0)
        if self._started_at is not None:
            self._all_exited.wait()
        return self.result()

    def pause(self, timeout: float = 5.0) -> None:
        """Hold every vCPU outside KVM_RUN (registers can then be read and written)."""
        for runner in self.runners:
            runner.request_pause()
        deadline = time.monotonic() + timeout
        for runner in self.runners:
            while not (runner.paused.is_set() or runner.exited.is_set() or runner.thread is None):
                if time.monotonic() > deadline:
                    raise KvmError(f"vCPU {runner.vcpu.id} did not pause within {timeout} s")
                runner.paused.wait(0.01)

    def resume(self) -> None:
        for runner in self.runners:
            runner.resume()

    def report_crash(self, runner: VcpuRunner, reason: str, *, internal_error: bool = False) -> None:
        """Called on the crashing vCPU's thread: capture its state, then stop with status 1."""
        vcpu = runner.vcpu
        # the exit is still in kvm_run: kvm.exits decodes the failing instruction's bytes
        failure = decode_rare_exit(vcpu.run_struct) if internal_error else None
        emulation_failure = failure is not None and failure.code == INTERNAL_ERROR_EMULATION
        fallback_note = None
        if emulation_failure:
            unsupported = self.fallback.unsupported.pop(vcpu.id, None) if self.fallback else None
            if not self.emulate_fallback:
                fallback_note = "vmscope's fallback emulator is off (--emulate-fallback off)"
            elif unsupported is not None:
                fallback_note = (
                    f"vmscope's fallback emulator could not complete it either: {unsupported.reason}"
                )
        from vmscope.vmm.crash import CrashReport, build_crash_report

        try:
            report = build_crash_report(
                vcpu.id,
                reason,
                vcpu.get_regs(),
                vcpu.get_sregs(),
                self.memory,
                emulation_failure=emulation_failure,
                instruction=failure.instruction if failure is not None else b"",
                symbolize=self.symbolize,
                backend=self.kvm.backend,
                fallback_note=fallback_note,
            )
        except KvmError as error:
            report = CrashReport(vcpu.id, f"{reason} (registers unavailable: {error})")
        with self._stop_lock:
            if self._stop is None:
                self._stop = _StopState(f"guest crashed: {reason}", 1, report)
        self.request_stop(reason, 1)

    def on_vcpu_exited(self, runner: VcpuRunner) -> None:
        if self.coalescing is not None:  # what the guest queued before it stopped
            self.coalescing.deliver(runner.stats)
        with self._stop_lock:
            self._exited_count += 1
            done = self._exited_count == len(self.runners)
            if done and self._stop is None:  # every loop exit requests a stop first; be safe anyway
                self._stop = _StopState(f"vCPU {runner.vcpu.id} stopped", 1)
        if done:
            self._finished_at = time.monotonic()
            self._all_exited.set()
        else:
            # one vCPU ending ends the VM: the others would otherwise run on unobserved
            # (a no-op when a stop was already requested, which is the usual case)
            self.request_stop(f"vCPU {runner.vcpu.id} stopped", 1)

    # -- statistics -------------------------------------------------------------------------

    def kvm_stats(self) -> dict[str, dict[str, int | list[int]]]:
        """KVM's own binary statistics for the VM ("vm") and each vCPU ("vcpuN")."""
        if not self.kvm.check_extension(Cap.BINARY_STATS_FD):
            return {}
        if not self._stats_fds:
            self._stats_fds["vm"] = BinaryStats(self.vm.stats_fd())
            for runner in self.runners:
                self._stats_fds[f"vcpu{runner.vcpu.id}"] = BinaryStats(runner.vcpu.stats_fd())
        return {name: stats.read() for name, stats in self._stats_fds.items()}

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release devices, vCPUs, the VM and guest memory. The machine cannot run again."""
        if self._closed:
            return
        if self.running:
            self.stop()
        self._closed = True
        if self.coalescing is not None:  # delivers the last queued writes, then unmaps the ring
            self.coalescing.close()
        for mapping in self._device_mappings:
            try:
                mapping.device.close()
            except Exception:  # closing one device must not leak the others
                log.exception("closing device %s failed", mapping.device.name)
        for stats in self._stats_fds.values():
            stats.close()
        for runner in self.runners:
            runner.vcpu.close()
        self.vm.close()
        self.kvm.close()
        self.memory.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _elf_symbolizer(path: Path) -> Callable[[int], str | None] | None:
    """'function+0xoffset' lookups from an ELF symbol table, read at the first lookup (only a
    crash report asks, and reading symbols costs pyelftools' import at every start-up)."""
    loaded: list[Callable[[int], str | None] | None] = []

    def symbolize(address: int) -> str | None:
        if not loaded:
            loaded.append(_read_elf_symbols(path))
        lookup = loaded[0]
        return lookup(address) if lookup is not None else None

    return symbolize


def _read_elf_symbols(path: Path) -> Callable[[int], str | None] | None:
    from vmscope.symbols import Symbolizer  # pyelftools: only when a crash report asks

    try:
        symbolizer = Symbolizer.from_elf(path)
    except Exception as error:  # missing symbols must never stop a run
        log.debug("no symbols from %s: %s", path, error)
        return None
    return symbolizer.name_and_offset
