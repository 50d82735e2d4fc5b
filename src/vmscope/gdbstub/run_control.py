"""Stopping and resuming the guest for the GDB stub: debug exits, parking every vCPU, stepping
off breakpoints, thread selection and c/s/vCont (see :mod:`vmscope.gdbstub.stub` for how)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmscope.errors import KvmError
from vmscope.gdbstub import protocol as p
from vmscope.gdbstub.constants import (
    DR6_SINGLE_STEP,
    EINVAL_REPLY,
    ENOSPC_REPLY,
    ESRCH_REPLY,
    OK,
    PARK_TIMEOUT_S,
    SIGSEGV,
    SIGTRAP,
)
from vmscope.gdbstub.debugregs import WATCH_PREFIX, Z_TYPES, DebugRegisters
from vmscope.gdbstub.target_access import TargetAccess
from vmscope.kvm import constants as c

if TYPE_CHECKING:
    from vmscope.vmm.runner import VcpuRunner

log = logging.getLogger("vmscope.gdbstub")


@dataclass(frozen=True)
class StopEvent:
    vcpu_index: int
    signal: int
    extra: str = ""  # "hwbreak:;" or "watch:ADDR;" and the like

    def reply(self) -> bytes:
        return p.stop_reply(self.signal, self.vcpu_index + 1, self.extra)


class RunControl(TargetAccess):
    """Run control of :class:`~vmscope.gdbstub.stub.GdbStub` (a mixin; the stub owns the state)."""

    hardware_watchpoints: bool
    _lock: threading.Lock
    _breakpoints: DebugRegisters
    _session_active: bool
    _held: bool
    _pending: StopEvent | None
    _step_over: set[int]
    _wake_read: int
    _wake_write: int
    _continue_thread: int
    _exit_reported: bool
    _last_stop: StopEvent

    # -- vCPU side ---------------------------------------------------------------------------

    def _on_debug_exit(self, runner: VcpuRunner) -> bool:
        """KVM_EXIT_DEBUG, on the vCPU's own thread: record the stop and park every vCPU."""
        vcpu = runner.vcpu
        debug = vcpu.run_struct.exit.debug
        dr6, pc = int(debug.dr6), int(debug.pc)
        index = vcpu.id
        with self._lock:
            if index in self._step_over:
                self._step_over.discard(index)
                watched = [hit for hit in self._breakpoints.hits(dr6) if hit.kind != "exec"]
                if not watched or not self._session_active:
                    # stepped off a breakpoint: re-arm and run on, gdb never hears of it
                    self._arm(runner, disarm_exec_at=None, single_step=False)
                    return True
                event = self._classify(index, pc, dr6)
            elif not self._session_active:
                # left over from a client that detached while this vCPU was running
                self._set_guest_debug(runner, 0, ())
                return True
            else:
                event = self._classify(index, pc, dr6)
            if self._pending is None and not self._held:
                self._pending = event
                self._pause_all()
                self._wake()
            # Otherwise a stop is already being reported: this vCPU parks with the others
            # and its event is dropped; a breakpoint fires again when the vCPU resumes.
        return True

    def _classify(self, index: int, pc: int, dr6: int) -> StopEvent:
        hits = self._breakpoints.hits(dr6)
        for hit in hits:
            if hit.kind != "exec":
                return StopEvent(index, SIGTRAP, f"{WATCH_PREFIX[hit.kind]}:{hit.address:x};")
        if hits or (not dr6 & DR6_SINGLE_STEP and self._breakpoints.exec_at(pc)):
            return StopEvent(index, SIGTRAP, "hwbreak:;")
        return StopEvent(index, SIGTRAP)

    # -- vCPU control (callers hold _lock unless noted) ----------------------------------------

    def _pause_all(self) -> None:
        for runner in self.machine.runners:
            runner.request_pause()

    def _wait_parked(self) -> None:
        """Wait (without _lock: a vCPU may need it to get there) until no vCPU is in KVM_RUN."""
        deadline = time.monotonic() + PARK_TIMEOUT_S
        for runner in self.machine.runners:
            while not (runner.paused.is_set() or runner.exited.is_set() or runner.thread is None):
                if time.monotonic() > deadline:
                    log.warning("vCPU %d did not pause within %g s", runner.vcpu.id, PARK_TIMEOUT_S)
                    return
                runner.paused.wait(0.005)

    def _vm_finished(self) -> bool:
        return all(runner.exited.is_set() for runner in self.machine.runners)

    def _set_guest_debug(self, runner: VcpuRunner, control: int, debugregs: Sequence[int]) -> None:
        try:
            runner.vcpu.set_guest_debug(control, debugregs)
        except KvmError as error:  # the machine may be closing under us
            log.debug("KVM_SET_GUEST_DEBUG on vCPU %d failed: %s", runner.vcpu.id, error)

    def _arm(self, runner: VcpuRunner, *, disarm_exec_at: int | None, single_step: bool) -> None:
        control = 0
        debugregs: list[int] = []
        if self._breakpoints.active:
            control = c.GUESTDBG_ENABLE | c.GUESTDBG_USE_HW_BP
            debugregs = self._breakpoints.debugregs(disarm_exec_at=disarm_exec_at)
        if single_step:
            control |= c.GUESTDBG_ENABLE | c.GUESTDBG_SINGLESTEP
        self._set_guest_debug(runner, control, debugregs)

    def _linear_rip(self, runner: VcpuRunner) -> int:
        regs = runner.vcpu.get_regs()
        sregs = runner.vcpu.get_sregs()
        if sregs.efer & (1 << 10) and sregs.cs.l:  # 64-bit code: segment bases are ignored
            return int(regs.rip)
        return (int(sregs.cs.base) + int(regs.rip)) & 0xFFFF_FFFF

    def _resume(self, actions: dict[int, str]) -> None:
        """Run the vCPUs in ``actions`` ("c" or "s"); the others stay parked."""
        with self._lock:
            self._step_over.clear()
            for index, action in actions.items():
                runner = self.machine.runners[index]
                rip = self._linear_rip(runner)
                if action == "s":
                    self._arm(runner, disarm_exec_at=rip, single_step=True)
                elif self._breakpoints.exec_at(rip):
                    self._step_over.add(index)
                    self._arm(runner, disarm_exec_at=rip, single_step=True)
                else:
                    self._arm(runner, disarm_exec_at=None, single_step=False)
            self._held = False
            self._pending = None
            for index in actions:
                self.machine.runners[index].resume()

    def _release_vm(self) -> None:
        """Detach: no breakpoints, no single-step, every vCPU running (unless the VM ended)."""
        with self._lock:
            self._pause_all()
        self._wait_parked()
        with self._lock:
            self._breakpoints.clear()
            self._step_over.clear()
            for runner in self.machine.runners:
                if not runner.exited.is_set():
                    self._set_guest_debug(runner, 0, ())
            self._held = False
            self._pending = None
            self.machine.resume()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe already wakes the server
            os.write(self._wake_write, b"!")

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self._wake_read, 4096):
                pass

    # -- threads and resuming ----------------------------------------------------------------

    def _valid_thread(self, thread: int) -> bool:
        return thread in (-1, 0) or 1 <= thread <= len(self.machine.runners)

    def _set_thread(self, body: bytes) -> bytes:
        operation, thread = body[:1], p.parse_thread_id(body[1:])
        if not self._valid_thread(thread):
            return ESRCH_REPLY
        if operation == b"g":
            if thread > 0:
                self._general_thread = thread - 1
        elif operation == b"c":
            self._continue_thread = thread - 1 if thread > 0 else -1
        else:
            return EINVAL_REPLY
        return OK

    def _ensure_resumable(self) -> bytes | None:
        if self._vm_finished():
            self._exit_reported = True
            return self._exit_packet()
        return None

    def _legacy_resume(self, head: bytes, body: bytes) -> bytes | None:
        """c/s [ADDR] and C/S SIG[;ADDR]: the signal is ignored (a VM has no signals)."""
        finished = self._ensure_resumable()
        if finished is not None:
            return finished
        address_text = body.partition(b";")[2] if head in (b"C", b"S") else body
        thread = self._continue_thread if self._continue_thread >= 0 else self._last_stop.vcpu_index
        if address_text:
            self._write_registers({"rip": p.parse_hex_int(address_text)}, vcpu_index=thread)
        if head in (b"s", b"S"):
            self._resume({thread: "s"})
        else:
            self._resume({index: "c" for index in range(len(self.machine.runners))})
        return None

    def _vcont(self, spec: bytes) -> bytes | None:
        count = len(self.machine.runners)
        actions: dict[int, str] = {}
        for item in spec.split(b";"):
            action, sep, thread_text = item.partition(b":")
            if action[:1] not in (b"c", b"C", b"s", b"S"):
                return EINVAL_REPLY
            kind = "s" if action[:1] in (b"s", b"S") else "c"
            thread = p.parse_thread_id(thread_text) if sep else -1
            if thread == 0 or not self._valid_thread(thread):
                return ESRCH_REPLY
            targets = range(count) if thread == -1 else (thread - 1,)
            for index in targets:
                actions.setdefault(index, kind)  # the leftmost action naming a thread wins
        if not actions:
            return EINVAL_REPLY
        finished = self._ensure_resumable()
        if finished is not None:
            return finished
        self._resume(actions)
        return None

    def _breakpoint_packet(self, insert: bool, body: bytes) -> bytes:
        fields = body.split(b";", 1)[0].split(b",")
        if len(fields) != 3:
            return EINVAL_REPLY
        z_type = p.parse_hex_int(fields[0], limit=0xFF)
        kind = Z_TYPES.get(z_type)
        if kind is None or (kind != "exec" and not self.hardware_watchpoints):
            return b""
        address = p.parse_hex_int(fields[1])
        length = p.parse_hex_int(fields[2], limit=0xFFFF)
        with self._lock:
            if not insert:
                self._breakpoints.remove(kind, address, length)
                return OK
            return OK if self._breakpoints.insert(kind, address, length) else ENOSPC_REPLY

    def _exit_packet(self) -> bytes:
        result = self.machine.result()
        if result.crash is not None:
            return p.killed_reply(SIGSEGV)
        return p.exit_reply(result.exit_status)
