"""One vCPU thread: the KVM_RUN loop and exit dispatch.

This is the hot path. The loop keeps everything it touches in local variables, reads the
exit from the shared kvm_run page with precompiled structs, calls the device's write bound
once per port, and adds one flat record (the exit key and its clock reads) to the vCPU's exit log, which
``VcpuExitStats.fold`` turns into the exact histograms off the per-exit path. Rare exits go to
``_handle_rare_exit``. Control (stop, pause, sampling kicks) arrives as a signal that makes
KVM_RUN fail with EINTR, so the common path carries no flag checks at all.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vmscope import sandbox
from vmscope.host_thread import name_host_thread
from vmscope.kvm import Vcpu
from vmscope.kvm import constants as c
from vmscope.kvm import structs as s
from vmscope.kvm.exits import (
    EXIT_REASON_OFFSET,
    EXIT_UNION_OFFSET,
    IO_EXIT,
    MMIO_DATA_OFFSET,
    MMIO_EXIT,
    RareExit,
    decode_rare_exit,
)
from vmscope.vmm.exit_keys import (
    ADDRESS_MASK,
    IO_IN_KEY,
    IO_OUT_KEY,
    MMIO_READ_KEY,
    MMIO_WRITE_KEY,
    DecodedExitKey,
    decode_exit_key,
    rare_exit_key,
)
from vmscope.vmm.exit_stats import FOLD_EVERY, GUEST_ONLY, REBASE, VcpuExitStats
from vmscope.vmm.hooks import ExitEvent, ExitHook
from vmscope.vmm.kick_listeners import KickListeners
from vmscope.vmm.rare_exits import ExitAction, RareExitDecision, decide_rare_exit

if TYPE_CHECKING:
    from vmscope.vmm.machine import Machine

log = logging.getLogger("vmscope.vcpu")

#: real-time signal used to kick a vCPU thread out of KVM_RUN (stop, pause, sampling)
KICK_SIGNAL = signal.SIGRTMIN + 1

# Re-exported for code that imported them from here before vmm.exit_keys existed.
__all__ = ["KICK_SIGNAL", "VcpuRunner", "decode_exit_key", "install_kick_handler", "rare_exit_key"]


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
        self._decoded_keys: dict[int, DecodedExitKey] = {}
        #: whether the kvm_run sync area holds this exit's registers (see registers())
        self.registers_fresh = False
        #: set by the machine; read by the loop only after a kick (EINTR)
        self.stop_requested = False
        self.pause_requested = False
        self.paused = threading.Event()
        self._resume = threading.Condition()
        #: called with this runner when KVM_RUN was interrupted by a kick that was neither
        #: stop nor pause (the sampling profiler's timer); see vmm.kick_listeners
        self.kick_listeners = KickListeners()
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
        if self.kick_listeners:
            # syncing is only ever switched on between runs, so a set bit means KVM filled it
            self.registers_fresh = bool(self.vcpu.run_struct.kvm_valid_regs & c.SYNC_X86_REGS)
            self.kick_listeners(self)
        return True

    def _exit_loop(self) -> None:
        vcpu = self.vcpu
        kvm_run = vcpu.kvm_run
        run_page = vcpu.run_buffer
        unpack_io = IO_EXIT.unpack_from
        unpack_mmio = MMIO_EXIT.unpack_from
        pio_bus, mmio_bus = self.machine.pio_bus, self.machine.mmio_bus
        pio_read = pio_bus.read
        mmio_read = mmio_bus.read
        # port/address -> the device's write with its offset bound (resolved once per port;
        # the buses clear these dicts in place when their maps change)
        pio_writers = pio_bus.write_handlers
        mmio_writers = mmio_bus.write_handlers
        bind_pio_write = pio_bus.bind_write
        bind_mmio_write = mmio_bus.bind_write
        coalescing = self.machine.coalescing
        # [first, last] of KVM's coalesced ring: unequal when it queued writes since the last
        # exit, which are delivered before this exit is handled (a constant pair without one)
        ring: Sequence[int] = coalescing.ring.indices if coalescing is not None else (0, 0)
        clock = time.perf_counter_ns
        stats = self.stats
        # one flat record per exit; stats.fold() turns them into the exact histograms later
        record = stats.log.extend
        fold = stats.fold
        settle_pio, settle_mmio = pio_bus.settle_unclaimed_writes, mmio_bus.settle_unclaimed_writes
        fold_countdown = FOLD_EVERY
        hooks_active = self.hooks_active
        hook_cache = self.hook_cache
        match_hooks = self.machine.hooks.match
        io_exit, mmio_exit = int(c.ExitReason.IO), int(c.ExitReason.MMIO)
        union = EXIT_UNION_OFFSET
        reason_at = EXIT_REASON_OFFSET
        mmio_data = MMIO_DATA_OFFSET
        if self.stop_requested:
            return
        now = clock()
        stats.begin(now)
        while True:
            try:
                kvm_run()
            except BlockingIOError:
                # EAGAIN: an AP left wait-for-SIPI (INIT handled in the kernel); run it again
                now = clock()
                record((REBASE, now, now, now))
                continue
            except InterruptedError:
                now = clock()
                if ring[0] != ring[1]:
                    self._deliver_coalesced()
                record((GUEST_ONLY, now, now, now))  # guest time up to the kick (counted in stats.kicks too)
                if not self._handle_kick():
                    return
                now = clock()
                record((REBASE, now, now, now))
                continue
            exited = clock()
            if ring[0] != ring[1]:
                self._deliver_coalesced()  # handling time of their own, not this exit's
                exited = clock()

            reason = run_page[reason_at]
            if reason == io_exit:
                direction, size, port, count, offset = unpack_io(run_page, union)
                if direction:
                    key = IO_OUT_KEY | port
                    write = pio_writers.get(port)
                    if write is None:  # first write here: bind it, and coalesce later ones if we may
                        write = bind_pio_write(port)
                        if coalescing is not None:
                            coalescing.offer(True, port, size)
                    try:
                        if count == 1:
                            write(run_page[offset : offset + size])
                        else:
                            for item in range(count):
                                start = offset + item * size
                                write(run_page[start : start + size])
                    except Exception as error:  # a device bug must not take the VM down
                        pio_bus.write_failed(port, error)
                else:
                    key = IO_IN_KEY | port
                    for item in range(count):
                        start = offset + item * size
                        run_page[start : start + size] = pio_read(port, size)
            elif reason == mmio_exit:
                address, data, length, is_write = unpack_mmio(run_page, union)
                length = min(length, 8)
                if is_write:
                    key = MMIO_WRITE_KEY | (address & ADDRESS_MASK)
                    write = mmio_writers.get(address)
                    if write is None:
                        write = bind_mmio_write(address)
                        if coalescing is not None:
                            coalescing.offer(False, address, length)
                    try:
                        write(data[:length])
                    except Exception as error:  # a device bug must not take the VM down
                        mmio_bus.write_failed(address, error)
                else:
                    key = MMIO_READ_KEY | (address & ADDRESS_MASK)
                    run_page[mmio_data : mmio_data + length] = mmio_read(address, length)
            else:
                key = rare_exit_key(int.from_bytes(run_page[reason_at : reason_at + 4], "little"))
                if not self._handle_rare_exit():
                    record((GUEST_ONLY, exited, exited, exited))
                    return

            now = handled = clock()
            if hooks_active:
                matched = hook_cache.get(key)
                if matched is None:
                    matched = hook_cache[key] = match_hooks(key)
                if matched:
                    self._dispatch_hooks(matched, key, handled - exited)
                    now = clock()  # hook time is neither handling nor guest time
            fold_countdown -= 1
            if not fold_countdown:
                fold()  # bounds the log; folding costs far less than recording each exit did
                settle_pio()  # and the buses' pending unclaimed writes
                settle_mmio()
                fold_countdown = FOLD_EVERY
                now = clock()  # nor is folding time: the next guest interval starts after it
            record((key, exited, handled, now))

    def _deliver_coalesced(self) -> None:
        coalescing = self.machine.coalescing
        if coalescing is not None:
            coalescing.deliver(self.stats)

    def _handle_rare_exit(self) -> bool:
        """Everything but port I/O and MMIO. Returns False when the vCPU must stop."""
        rare_exit = decode_rare_exit(self.vcpu.run_struct)
        machine = self.machine
        handled = machine.rare_exit_handlers.dispatch(self, rare_exit)
        if handled is not None:
            return handled
        return self._apply(decide_rare_exit(rare_exit, self.vcpu.id), rare_exit)

    def _apply(self, decision: RareExitDecision, rare_exit: RareExit) -> bool:
        action = decision.action
        if action is ExitAction.CONTINUE:
            if decision.message:
                log.warning("%s", decision.message)
            return True
        if action is ExitAction.KICK:
            return self._handle_kick()
        if action is ExitAction.STOP:
            self.machine.request_stop(decision.message, decision.exit_status)
            return False
        self.machine.report_crash(self, decision.message, internal_error=decision.internal_error)
        return False
