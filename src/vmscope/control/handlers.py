"""The control protocol's commands, run against a machine (:class:`ControlProtocol`).

Takes a request line, validates it against :mod:`vmscope.control.schema`, runs the command on
the machine and returns the response line. The socket server (:mod:`vmscope.control.server`)
feeds it; tests drive it directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from vmscope.control.schema import (
    COMMANDS,
    ControlRequestError,
    _RequestLineError,
    encode_response,
    parse_request,
)
from vmscope.errors import ConfigError, GuestMemoryError, KvmError, PageFault, VmscopeError
from vmscope.histogram import LatencyHistogram
from vmscope.kvm.registers import control_registers, general_registers
from vmscope.vmm.kick_listeners import kick_listeners

if TYPE_CHECKING:
    from vmscope.profiler.model import Profile
    from vmscope.profiler.recorder import ProfileRecorder
    from vmscope.vmm.machine import Machine


log = logging.getLogger("vmscope.control")


def _histogram_summary(histogram: LatencyHistogram) -> dict[str, Any]:
    return {
        "count": histogram.count,
        "total_ns": histogram.sum,
        "min_ns": histogram.min,
        "max_ns": histogram.max,
        "mean_ns": round(histogram.mean, 1),
        "p50_ns": histogram.percentile(50),
        "p99_ns": histogram.percentile(99),
    }


class ControlProtocol:
    """Turns request lines into response lines for one machine (no sockets here)."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self._recorder: ProfileRecorder | None = None
        self._profile: Profile | None = None
        self._handlers: dict[str, Callable[[dict[str, Any]], object]] = {
            "help": self._help,
            "query-status": self._query_status,
            "pause": self._pause,
            "resume": self._resume,
            "quit": self._quit,
            "query-stats": self._query_stats,
            "profile-start": self._profile_start,
            "profile-stop": self._profile_stop,
            "profile-dump": self._profile_dump,
            "read-memory": self._read_memory,
            "read-registers": self._read_registers,
            "snapshot": self._snapshot,
        }

    def handle_line(self, line: bytes) -> bytes:
        """The response line for one request line; never raises."""
        try:
            request = parse_request(line)
        except _RequestLineError as error:
            return encode_response(error.request_id, error=(error.code, error.message))
        try:
            result = self._handlers[request.command.name](request.arguments)
        except ControlRequestError as error:
            return encode_response(request.id, error=(error.code, error.message))
        except PageFault as error:
            return encode_response(request.id, error=("page-fault", str(error)))
        except GuestMemoryError as error:
            return encode_response(request.id, error=("memory-error", str(error)))
        except KvmError as error:
            return encode_response(request.id, error=("kvm-error", str(error)))
        except ConfigError as error:
            return encode_response(request.id, error=("invalid-argument", str(error)))
        except VmscopeError as error:
            return encode_response(request.id, error=("failed", str(error)))
        except Exception as error:  # a VMM bug must answer the client, not kill the server thread
            log.exception("control command %s failed", request.command.name)
            return encode_response(request.id, error=("internal-error", f"{type(error).__name__}: {error}"))
        try:
            return encode_response(request.id, result)
        except (TypeError, ValueError) as error:
            log.error("control command %s returned an unencodable result: %s", request.command.name, error)
            return encode_response(request.id, error=("internal-error", f"result not encodable: {error}"))

    def close(self) -> None:
        """End a recording still running so its hooks and sampler leave the machine."""
        if self._recorder is not None:
            try:
                self._finish_recording()
            except Exception:
                log.exception("finishing the control socket's profile recording failed")

    # -- state helpers ------------------------------------------------------------------------

    def _started(self) -> bool:
        return any(runner.thread is not None for runner in self.machine.runners)

    def _all_paused(self) -> bool:
        """Every live vCPU is held by a pause that nobody has lifted yet."""
        return all(
            runner.exited.is_set() or (runner.pause_requested and runner.paused.is_set())
            for runner in self.machine.runners
        )

    def state(self) -> str:
        if not self._started():
            return "created"
        if not self.machine.running:
            return "stopped"
        return "paused" if self._all_paused() else "running"

    def _require_running(self, command: str) -> None:
        state = self.state()
        if state in ("created", "stopped"):
            raise ControlRequestError("not-running", f"{command}: the VM is {state}, not running")

    @contextlib.contextmanager
    def _vcpus_held(self) -> Iterator[None]:
        """Keep every vCPU out of KVM_RUN inside the block; resume afterwards only if we paused."""
        machine = self.machine
        if not machine.running or self._all_paused():
            yield
            return
        try:
            machine.pause()
        except BaseException:
            machine.resume()  # do not leave the vCPUs that did pause held
            raise
        try:
            yield
        finally:
            machine.resume()

    def _check_vcpu(self, index: int) -> None:
        if index >= len(self.machine.runners):
            raise ControlRequestError(
                "invalid-argument", f"vcpu {index} does not exist (the VM has {len(self.machine.runners)})"
            )

    # -- handlers -----------------------------------------------------------------------------

    def _help(self, arguments: dict[str, Any]) -> object:
        return {
            "commands": [
                {
                    "name": command.name,
                    "description": command.description,
                    "arguments": {argument.name: argument.schema() for argument in command.arguments},
                }
                for command in COMMANDS
            ]
        }

    def _query_status(self, arguments: dict[str, Any]) -> object:
        machine = self.machine
        state = self.state()
        result = machine.result()
        guest = machine.guest
        status: dict[str, Any] = {
            "state": state,
            "uptime_s": round(result.duration_s, 6),
            "cpus": machine.cpu_count,
            "kvm_backend": machine.kvm.backend,
            "guest_kind": guest.kind if guest is not None else None,
            "guest_image": str(guest.symbol_file) if guest is not None and guest.symbol_file else None,
            "profiling": self._recorder is not None,
            #: instructions the host's KVM could not emulate that vmscope completed so far
            "emulated_instructions": machine.emulated_instructions,
        }
        if state == "stopped":
            status["exit_status"] = result.exit_status
            status["reason"] = result.reason
            status["crash"] = result.crash.format() if result.crash is not None else None
        return status

    def _pause(self, arguments: dict[str, Any]) -> object:
        self._require_running("pause")
        self.machine.pause()
        return {"state": self.state()}

    def _resume(self, arguments: dict[str, Any]) -> object:
        self._require_running("resume")
        self.machine.resume()
        return {"state": self.state()}

    def _quit(self, arguments: dict[str, Any]) -> object:
        if self.state() == "stopped":
            raise ControlRequestError("not-running", "quit: the VM has already stopped")
        self.machine.request_stop("quit via control socket", 0)
        return {"stopping": True}

    def _exit_row(self, key: int, histogram: LatencyHistogram) -> dict[str, Any]:
        from vmscope.vmm.exit_keys import decode_exit_key, exit_detail

        reason, address, access = decode_exit_key(key)
        device = None
        if reason == "IO":
            device = self.machine.device_name_at("pio", address)
        elif reason == "MMIO":
            device = self.machine.device_name_at("mmio", address)
        detail = exit_detail(reason, address, access)
        return {
            "key": f"{reason} {detail}".rstrip(),
            "reason": reason,
            "address": address if address >= 0 else None,
            "access": access or None,
            "detail": detail,
            "device": device,
            **_histogram_summary(histogram),
        }

    def _query_stats(self, arguments: dict[str, Any]) -> object:
        machine = self.machine
        sampled_ns = time.monotonic_ns()
        totals: dict[int, LatencyHistogram] = {}
        vcpus = []
        total_guest_ns = 0
        for runner in machine.runners:
            stats = runner.stats
            # list() of a dict's items is one C call under the GIL: a consistent copy even while
            # the vCPU thread adds keys
            handling = list(stats.handling.items())
            rows = []
            for key, live in handling:
                histogram = live.copy()
                rows.append(self._exit_row(key, histogram))
                totals.setdefault(key, LatencyHistogram()).merge(histogram)
            rows.sort(key=lambda row: (-row["count"], row["key"]))
            guest_ns = stats.guest.sum
            total_guest_ns += guest_ns
            vcpus.append(
                {
                    "vcpu": runner.vcpu.id,
                    "exits": sum(row["count"] for row in rows),
                    "handling_ns": sum(row["total_ns"] for row in rows),
                    "guest_ns": guest_ns,
                    "kicks": stats.kicks,
                    "exit_keys": rows,
                }
            )
        total_rows = [self._exit_row(key, histogram) for key, histogram in totals.items()]
        total_rows.sort(key=lambda row: (-row["count"], row["key"]))
        merged: dict[str, dict[tuple[int, int], dict[str, int]]] = {"pio": {}, "mmio": {}}
        for access in machine.unclaimed_counts():
            entry = merged[access.space].setdefault(
                (access.address, access.size),
                {"address": access.address, "size": access.size, "reads": 0, "writes": 0},
            )
            entry["writes" if access.is_write else "reads"] = access.count
        unclaimed = {space: [places[place] for place in sorted(places)] for space, places in merged.items()}
        result: dict[str, Any] = {
            "state": self.state(),
            "uptime_s": round(machine.result().duration_s, 6),
            "sampled_ns": sampled_ns,
            "vcpus": vcpus,
            "totals": {
                "exits": sum(row["count"] for row in total_rows),
                "handling_ns": sum(row["total_ns"] for row in total_rows),
                "guest_ns": total_guest_ns,
                "exit_keys": total_rows,
            },
            "unclaimed": unclaimed,
        }
        if arguments["kvm"]:
            try:
                result["kvm"] = machine.kvm_stats()
            except (VmscopeError, OSError, ValueError) as error:
                result["kvm"] = {}
                result["kvm_error"] = str(error)
        return result

    def _profile_start(self, arguments: dict[str, Any]) -> object:
        from vmscope.profiler.recorder import ProfileRecorder

        if self._recorder is not None:
            raise ControlRequestError("profile-active", "profile-start: a profile is already being recorded")
        if self.state() == "stopped":
            raise ControlRequestError("not-running", "profile-start: the VM has stopped")
        if any(kick_listeners(runner) for runner in self.machine.runners):
            raise ControlRequestError("busy", "profile-start: another profiler is attached to this VM")
        recorder = ProfileRecorder(
            self.machine,
            frequency_hz=float(arguments["frequency_hz"]),
            exit_samples=arguments["exit_samples"],
        )
        with self._vcpus_held():  # hooks and sync-regs change only while no vCPU is in KVM_RUN
            recorder.start()
        self._recorder = recorder
        self._profile = None
        return {"recording": True, "frequency_hz": recorder.frequency_hz}

    def _finish_recording(self) -> Profile:
        recorder = self._recorder
        assert recorder is not None
        with self._vcpus_held():
            profile = recorder.finish()
        self._recorder = None
        self._profile = profile
        return profile

    def _profile_summary(self, profile: Profile) -> dict[str, Any]:
        return {
            "samples": len(profile.samples),
            "exit_stats": len(profile.exit_stats),
            "duration_s": round(profile.metadata.duration_ns / 1e9, 6),
        }

    def _profile_stop(self, arguments: dict[str, Any]) -> object:
        if self._recorder is None:
            raise ControlRequestError(
                "no-profile", "profile-stop: no recording is running (use profile-start)"
            )
        return self._profile_summary(self._finish_recording())

    def _profile_dump(self, arguments: dict[str, Any]) -> object:
        from vmscope.profiler import profile_file

        path = arguments["path"]
        if not path or "\0" in path:
            raise ControlRequestError(
                "invalid-argument", "profile-dump: 'path' must be a non-empty file name"
            )
        if self._recorder is not None:
            profile = self._finish_recording()
        elif self._profile is not None:
            profile = self._profile
        else:
            raise ControlRequestError(
                "no-profile", "profile-dump: no profile was recorded (use profile-start)"
            )
        full_path = os.path.abspath(path)
        profile_file.save(profile, full_path)
        return {"path": full_path, "bytes": os.path.getsize(full_path), **self._profile_summary(profile)}

    def _snapshot(self, arguments: dict[str, Any]) -> object:
        from vmscope.snapshot.save import save_snapshot

        self._require_running("snapshot")
        path = arguments["path"]
        if not path or "\0" in path:
            raise ControlRequestError(
                "invalid-argument", "snapshot: 'path' must be a non-empty directory name"
            )
        info = save_snapshot(self.machine, os.path.abspath(path), stop=arguments["stop"])
        return {
            "path": str(info.path),
            "state_bytes": info.state_bytes,
            "memory_bytes": info.memory_bytes,
            "memory_data_bytes": info.memory_data_bytes,
            "paused_s": round(info.paused_s, 6),
            "stopped": arguments["stop"],
        }

    def _read_memory(self, arguments: dict[str, Any]) -> object:
        address: int = arguments["address"]
        length: int = arguments["length"]
        vcpu_index: int = arguments["vcpu"]
        memory = self.machine.memory
        try:
            if arguments["virtual"]:
                from vmscope.memory.paging import PagingMode, read_virtual, translate

                self._check_vcpu(vcpu_index)
                with self._vcpus_held():
                    sregs = self.machine.runners[vcpu_index].vcpu.get_sregs()
                mode = PagingMode.from_sregs(sregs)
                physical = translate(memory, mode, address)
                data = read_virtual(memory, mode, address, length)
            else:
                physical = address
                data = memory.read(address, length)
        except ValueError as error:  # the mapping is gone: the machine was closed
            raise ControlRequestError(
                "not-running", f"read-memory: guest memory is unavailable ({error})"
            ) from None
        return {
            "address": address,
            "physical_address": physical,
            "length": len(data),
            "virtual": arguments["virtual"],
            "data": data.hex(),
        }

    def _read_registers(self, arguments: dict[str, Any]) -> object:
        vcpu_index: int = arguments["vcpu"]
        self._check_vcpu(vcpu_index)
        vcpu = self.machine.runners[vcpu_index].vcpu
        with self._vcpus_held():
            regs = vcpu.get_regs()
            sregs = vcpu.get_sregs()
        result: dict[str, Any] = {"vcpu": vcpu.id, **general_registers(regs)}
        segments = {}
        for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
            segment = getattr(sregs, name)
            segments[name] = {
                "selector": int(segment.selector),
                "base": int(segment.base),
                "limit": int(segment.limit),
            }
        result["segments"] = segments
        result.update(control_registers(sregs, ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")))
        if sregs.efer & (1 << 10) and sregs.cs.l:
            result["mode"] = "long"
        elif sregs.cr0 & 1:
            result["mode"] = "protected"
        else:
            result["mode"] = "real"
        return result
