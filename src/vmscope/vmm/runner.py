"""One vCPU thread: the KVM_RUN loop and exit dispatch.

This is the hot path. The loop keeps everything it touches in local variables, reads the
exit from the shared kvm_run page with precompiled structs, and records two timestamps
per exit (guest time since the previous exit, then handling time). Rare exits go to
``_handle_rare_exit``. Control (stop, pause, sampling kicks) arrives as a signal that makes
KVM_RUN fail with EINTR, so the common path carries no flag checks at all.
"""

from __future__ import annotations

import logging
import signal
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vmscope import sandbox
from vmscope.host_thread import name_host_thread
from vmscope.kvm import Vcpu
from vmscope.kvm import constants as c
from vmscope.kvm import structs as s
from vmscope.profiler.histogram import LatencyHistogram
from vmscope.vmm.exit_stats import VcpuExitStats
from vmscope.vmm.hooks import ExitEvent, ExitHook

if TYPE_CHECKING:
    from vmscope.vmm.machine import Machine

log = logging.getLogger("vmscope.vcpu")

#: real-time signal used to kick a vCPU thread out of KVM_RUN (stop, pause, sampling)
KICK_SIGNAL = signal.SIGRTMIN + 1

_IO_EXIT = struct.Struct("<BBHIQ")  # kvm_run.io: direction, size, port, count, data_offset
_MMIO_EXIT = struct.Struct("<Q8sIB")  # kvm_run.mmio: phys_addr, data[8], len, is_write
_EXIT_UNION_OFFSET = 32

# Exit keys are ints so the hot path hashes cheaply: reason << 56 | access << 52 | address.
ACCESS_NONE, ACCESS_IN, ACCESS_OUT, ACCESS_READ, ACCESS_WRITE = 0, 1, 2, 3, 4
ACCESS_NAMES = {
    ACCESS_NONE: "",
    ACCESS_IN: "in",
    ACCESS_OUT: "out",
    ACCESS_READ: "read",
    ACCESS_WRITE: "write",
}
_IO_OUT_KEY = (c.ExitReason.IO << 56) | (ACCESS_OUT << 52)
_IO_IN_KEY = (c.ExitReason.IO << 56) | (ACCESS_IN << 52)
_MMIO_WRITE_KEY = (c.ExitReason.MMIO << 56) | (ACCESS_WRITE << 52)
_MMIO_READ_KEY = (c.ExitReason.MMIO << 56) | (ACCESS_READ << 52)
_ADDRESS_MASK = (1 << 52) - 1


def decode_exit_key(key: int) -> tuple[str, int, str]:
    """(reason name, port or address or -1, access) for an int exit key."""
    reason = key >> 56
    try:
        name = c.ExitReason(reason).name
    except ValueError:
        name = f"EXIT_{reason}"
    access = (key >> 52) & 0xF
    address = key & _ADDRESS_MASK
    if reason not in (c.ExitReason.IO, c.ExitReason.MMIO):
        return name, -1, ACCESS_NAMES.get(access, "")
    return name, address, ACCESS_NAMES.get(access, "")


def rare_exit_key(reason: int) -> int:
    return reason << 56


def install_kick_handler() -> None:
    """Give KICK_SIGNAL a real handler so it interrupts KVM_RUN (SIG_IGN would not).

    Python runs signal handlers in the main thread only, so this must be called from it;
    the handler itself does nothing: the point is the EINTR in the vCPU thread.
    """
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class VcpuRunner:
    """Owns one vCPU and the thread that runs it."""

    def __init__(self, machine: Machine, vcpu: Vcpu) -> None:
        self.machine = machine
        self.vcpu = vcpu
        self.stats = VcpuExitStats(vcpu.id)
        self.thread: threading.Thread | None = None
        self.thread_ident: int | None = None
        #: [] when no exit hook is registered, [True] otherwise; mutated in place so the loop's
        #: local reference sees changes made from other threads
        self.hooks_active: list[bool] = []
        #: exit key -> the hooks matching it (filled lazily, cleared when hooks change)
        self.hook_cache: dict[int, tuple[ExitHook, ...]] = {}
        self._hook_failures_logged: set[int] = set()
        self._decoded_keys: dict[int, tuple[str, int, str]] = {}
        #: whether the kvm_run sync area holds this exit's registers (see registers())
        self.registers_fresh = False
        #: set by the machine; read by the loop only after a kick (EINTR)
        self.stop_requested = False
        self.pause_requested = False
        self.paused = threading.Event()
        self._resume = threading.Condition()
        #: called with this runner when KVM_RUN was interrupted by a kick that was neither
        #: stop nor pause (the sampling profiler's timer)
        self.on_kick: Callable[[VcpuRunner], None] | None = None
        self.exited = threading.Event()

    # -- hooks ------------------------------------------------------------------------------

    def set_hooks_active(self, active: bool, needs_registers: bool) -> None:
        self.hook_cache.clear()
        self.hooks_active[:] = [True] if active else []
        if not needs_registers:
            self.vcpu.enable_sync_regs(0)
        # Registers are synced lazily: the first exit a register-hungry hook matches turns
        # syncing on, so hooks that never match cost nothing per exit.

    def _dispatch_hooks(self, hooks: tuple[ExitHook, ...], key: int, handling_ns: int) -> None:
        vcpu = self.vcpu
        run = vcpu.run_struct
        decoded = self._decoded_keys.get(key)
        if decoded is None:
            decoded = self._decoded_keys[key] = decode_exit_key(key)
        name, address, access = decoded
        data = b""
        if name == "IO":
            io = run.exit.io
            data = vcpu.run_buffer[io.data_offset : io.data_offset + io.size * io.count]
        elif name == "MMIO":
            mmio = run.exit.mmio
            data = bytes(mmio.data)[: min(mmio.len, 8)]
        rip = 0
        self.registers_fresh = bool(run.kvm_valid_regs & c.SYNC_X86_REGS)
        if self.registers_fresh:
            rip = run.s.regs.regs.rip
        elif any(hook.wants_registers for hook in hooks):
            rip = vcpu.get_regs().rip  # this once by ioctl; synced from the next exit on
            vcpu.enable_sync_regs(c.SYNC_X86_REGS | c.SYNC_X86_SREGS)
        event = ExitEvent(vcpu.id, name, address, access, data, handling_ns, rip, self)
        for hook in hooks:
            hook.calls += 1
            try:
                hook.callback(event)
            except Exception:  # a broken hook is reported once and must not stop the guest
                hook.errors += 1
                if id(hook) not in self._hook_failures_logged:
                    self._hook_failures_logged.add(id(hook))
                    log.exception(
                        "exit hook %r failed (further failures are counted, not logged)", hook.callback
                    )

    def registers(self) -> tuple[s.kvm_regs, s.kvm_sregs]:
        """The guest's registers at the current exit or kick (call on this vCPU's thread).

        From the kvm_run sync area when KVM filled it for this exit, else by ioctl: the exit
        during which syncing was switched on still has an empty sync area.
        """
        run = self.vcpu.run_struct
        if self.registers_fresh and run.kvm_valid_regs & c.SYNC_X86_SREGS:
            return run.s.regs.regs, run.s.regs.sregs
        return self.vcpu.get_regs(), self.vcpu.get_sregs()

    # -- thread control ---------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.vcpu.id}", daemon=True)
        self.thread.start()

    def kick(self) -> None:
        """Make KVM_RUN return now (or immediately when next entered)."""
        self.vcpu.set_immediate_exit(True)
        if self.thread_ident != threading.get_ident():  # our own thread is not in KVM_RUN now
            self._signal()

    def sample_kick(self) -> None:
        """A kick for sampling: only a signal, so a kick that misses KVM_RUN costs nothing."""
        self._signal()

    def _signal(self) -> None:
        ident = self.thread_ident
        if ident is not None and not self.exited.is_set():
            try:
                signal.pthread_kill(ident, KICK_SIGNAL)
            except ProcessLookupError:  # the thread ended between the check and the kill
                pass

    def request_stop(self) -> None:
        self.stop_requested = True
        with self._resume:
            self._resume.notify_all()
        self.kick()

    def request_pause(self) -> None:
        self.pause_requested = True
        self.kick()

    def resume(self) -> None:
        with self._resume:
            self.pause_requested = False
            self._resume.notify_all()

    # -- the loop ---------------------------------------------------------------------------

    def _thread_main(self) -> None:
        self.thread_ident = threading.get_ident()
        try:
            name_host_thread()
            sandbox.enter("vcpu")  # after the thread's own set-up; a no-op unless configured
            self._exit_loop()
        except Exception as error:  # a VMM bug must still stop the VM with a report, not hang it
            log.exception("vCPU %d: internal error in the exit loop", self.vcpu.id)
            self.machine.request_stop(f"vmscope internal error on vCPU {self.vcpu.id}: {error}", 1)
        finally:
            self.exited.set()
            self.machine.on_vcpu_exited(self)

    def _handle_kick(self) -> bool:
        """KVM_RUN returned EINTR. Returns False when the loop must end."""
        self.stats.kicks += 1
        if self.stop_requested:
            return False
        if self.pause_requested:
            with self._resume:
                self.paused.set()
                while self.pause_requested and not self.stop_requested:
                    self._resume.wait()
                self.paused.clear()
            if self.stop_requested:
                return False
        self.vcpu.set_immediate_exit(False)
        if self.stop_requested:  # a stop that raced with clearing immediate_exit
            return False
        if self.on_kick is not None:
            # syncing is only ever switched on between runs, so a set bit means KVM filled it
            self.registers_fresh = bool(self.vcpu.run_struct.kvm_valid_regs & c.SYNC_X86_REGS)
            self.on_kick(self)
        return True

    def _exit_loop(self) -> None:
        vcpu = self.vcpu
        kvm_run = vcpu.kvm_run
        run_page = vcpu.run_buffer
        unpack_io = _IO_EXIT.unpack_from
        unpack_mmio = _MMIO_EXIT.unpack_from
        pio_read = self.machine.pio_bus.read
        pio_write = self.machine.pio_bus.write
        mmio_read = self.machine.mmio_bus.read
        mmio_write = self.machine.mmio_bus.write
        clock = time.perf_counter_ns
        handling = self.stats.handling
        record_guest = self.stats.guest.record
        hooks_active = self.hooks_active
        hook_cache = self.hook_cache
        match_hooks = self.machine.hooks.match
        io_exit, mmio_exit = int(c.ExitReason.IO), int(c.ExitReason.MMIO)
        union = _EXIT_UNION_OFFSET
        if self.stop_requested:
            return
        now = clock()
        while True:
            try:
                kvm_run()
            except BlockingIOError:
                # EAGAIN: an AP left wait-for-SIPI (INIT handled in the kernel); run it again
                now = clock()
                continue
            except InterruptedError:
                record_guest(clock() - now)  # guest time up to the kick (counted in stats.kicks too)
                if not self._handle_kick():
                    return
                now = clock()
                continue
            entered = now
            now = clock()
            record_guest(now - entered)

            reason = run_page[8]
            if reason == io_exit:
                direction, size, port, count, offset = unpack_io(run_page, union)
                if direction:
                    key = _IO_OUT_KEY | port
                    if count == 1:
                        pio_write(port, run_page[offset : offset + size])
                    else:
                        for item in range(count):
                            start = offset + item * size
                            pio_write(port, run_page[start : start + size])
                else:
                    key = _IO_IN_KEY | port
                    for item in range(count):
                        start = offset + item * size
                        run_page[start : start + size] = pio_read(port, size)
            elif reason == mmio_exit:
                address, data, length, is_write = unpack_mmio(run_page, union)
                length = min(length, 8)
                if is_write:
                    key = _MMIO_WRITE_KEY | (address & _ADDRESS_MASK)
                    mmio_write(address, data[:length])
                else:
                    key = _MMIO_READ_KEY | (address & _ADDRESS_MASK)
                    run_page[union + 8 : union + 8 + length] = mmio_read(address, length)
            else:
                key = rare_exit_key(int.from_bytes(run_page[8:12], "little"))
                if not self._handle_rare_exit():
                    return

            end = clock()
            elapsed = end - now
            histogram = handling.get(key)
            if histogram is None:
                histogram = handling[key] = LatencyHistogram()
            histogram.record(elapsed)
            if hooks_active:
                matched = hook_cache.get(key)
                if matched is None:
                    matched = hook_cache[key] = match_hooks(key)
                if matched:
                    self._dispatch_hooks(matched, key, elapsed)
                    end = clock()  # hook time is not guest time
            now = end

    def _handle_rare_exit(self) -> bool:
        """Everything but port I/O and MMIO. Returns False when the vCPU must stop."""
        run = self.vcpu.run_struct
        reason = run.exit_reason
        machine = self.machine
        if reason == c.ExitReason.HLT:
            # Only reached without an in-kernel LAPIC: nothing can wake this vCPU again.
            machine.request_stop(f"vCPU {self.vcpu.id} halted with no interrupt controller to wake it", 0)
            return False
        if reason == c.ExitReason.INTR:
            return self._handle_kick()
        if reason == c.ExitReason.SYSTEM_EVENT:
            event = c.SYSTEM_EVENT_TYPES.get(run.exit.system_event.type, str(run.exit.system_event.type))
            if event in ("shutdown", "reset"):
                machine.request_stop(f"guest requested {event}", 0)
            else:
                machine.report_crash(self, f"guest system event: {event}")
            return False
        if reason == c.ExitReason.DEBUG:
            handler = machine.debug_exit_handler
            if handler is not None:
                return handler(self)
            log.warning("vCPU %d: unexpected debug exit at %#x", self.vcpu.id, run.exit.debug.pc)
            return True
        if reason == c.ExitReason.IRQ_WINDOW_OPEN or reason == c.ExitReason.IOAPIC_EOI:
            return True
        if reason == c.ExitReason.SHUTDOWN:
            machine.report_crash(
                self, "triple fault (KVM_EXIT_SHUTDOWN): the guest hit an exception it could not handle"
            )
            return False
        if reason == c.ExitReason.FAIL_ENTRY:
            hw = run.exit.fail_entry.hardware_entry_failure_reason
            machine.report_crash(self, f"VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason {hw:#x})")
            return False
        if reason == c.ExitReason.INTERNAL_ERROR:
            internal = run.exit.internal
            name = c.INTERNAL_ERROR_SUBERRORS.get(internal.suberror, "unknown")
            machine.report_crash(
                self, f"KVM internal error, suberror {internal.suberror} ({name})", internal_error=True
            )
            return False
        try:
            name = c.ExitReason(reason).name
        except ValueError:
            name = str(reason)
        machine.report_crash(self, f"unhandled exit reason {name}")
        return False
