"""Recording a profile of a running machine, from the host, without help from the guest.

Three sources, all on the machine's own mechanisms:

* **Exit accounting** (always on in the vCPU loop) becomes the profile's exit statistics.
* **Exit samples**: an exit hook takes the guest's registers from the kvm_run sync-regs area
  (no ioctl) at every exit and unwinds its stack, so every exit is attributed to the guest
  code that caused it. Past a per-vCPU budget, exits are sampled 1-in-N.
* **Time samples** at ``frequency_hz``: a sampler thread marks each vCPU due once per period.
  A vCPU that exits anyway takes its time sample at its next exit (free); one that has not
  exited during the period is kicked with a signal so KVM_RUN returns and the sample is
  taken then. Kicks cost the guest ~100 us each on software-virtualization hosts, so the
  default rate is low and only vCPUs that do not exit on their own are kicked.

Timeline spans (guest run / exit handling per vCPU) are kept for the first
``max_spans_per_vcpu`` exits of each vCPU.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vmscope import log_sink, sandbox
from vmscope.devices.traces import MarkerSource, RequestTraceSource
from vmscope.host_thread import name_host_thread
from vmscope.memory.paging import PagingMode
from vmscope.profiler.model import IO_PART_NAMES, ORIGIN_EXIT, ORIGIN_TIMER, Profile, Sample, Span
from vmscope.profiler.symbols import load_symbol_file
from vmscope.profiler.unwind import StackUnwinder
from vmscope.vmm.hooks import ExitEvent, ExitHook
from vmscope.vmm.kick_listeners import kick_listeners
from vmscope.vmm.runner import VcpuRunner, decode_exit_key

if TYPE_CHECKING:
    from vmscope.vmm.machine import Machine

DEFAULT_FREQUENCY_HZ = 99.0  # off a round number so it does not beat with guest timers
DEFAULT_EXIT_SAMPLE_BUDGET = 200_000
DEFAULT_MAX_SPANS = 50_000


def exit_detail(reason: str, address: int, access: str) -> str:
    """The ExitStat detail string for an exit: "port 0x3f8 out", "0xd0000000 read" or ""."""
    if reason == "IO":
        return f"port {address:#x} {access}"
    if reason == "MMIO":
        return f"{address:#x} {access}"
    return ""


@dataclass
class _VcpuState:
    unwinder: StackUnwinder
    sample_due: bool = False
    last_exit_count: int = 0
    last_end_ns: int = 0
    exit_samples: int = 0
    exit_sample_stride: int = 1
    exits_seen: int = 0
    spans: int = 0
    kicks_sent: int = 0
    kick_samples: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class ProfileRecorder:
    """Attach to a machine before it runs; ``finish()`` returns the :class:`Profile`."""

    def __init__(
        self,
        machine: Machine,
        *,
        frequency_hz: float = DEFAULT_FREQUENCY_HZ,
        exit_samples: bool = True,
        max_depth: int = 64,
        exit_sample_budget: int = DEFAULT_EXIT_SAMPLE_BUDGET,
        max_spans_per_vcpu: int = DEFAULT_MAX_SPANS,
        symbol_files: Sequence[Path] = (),
    ) -> None:
        if frequency_hz < 0 or frequency_hz > 20_000:
            from vmscope.errors import ConfigError

            raise ConfigError(f"sampling frequency {frequency_hz:g} Hz is out of range (0 to 20000)")
        self.machine = machine
        self.frequency_hz = frequency_hz
        self.exit_samples = exit_samples
        self.exit_sample_budget = exit_sample_budget
        self.max_spans_per_vcpu = max_spans_per_vcpu
        self.symbol_files = list(symbol_files)
        self.profile = Profile()
        self._states = {
            runner.vcpu.id: _VcpuState(StackUnwinder(machine.memory, max_depth)) for runner in machine.runners
        }
        self._hook: ExitHook | None = None
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._t0 = 0
        self._start_wall_ns = 0
        self._finished = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._t0 = time.perf_counter_ns()
        self._start_wall_ns = time.time_ns()
        for state in self._states.values():
            state.last_end_ns = 0
        self._hook = self.machine.add_exit_hook(self._on_exit, registers=True)
        for runner in self.machine.runners:
            kick_listeners(runner).add(self._on_kick)
        if self.frequency_hz > 0:
            self._sampler = threading.Thread(target=self._sampler_loop, name="vmscope-sampler", daemon=True)
            self._sampler.start()

    def finish(self) -> Profile:
        """Stop sampling and assemble the profile (call after the machine stopped or while paused)."""
        if self._finished:
            return self.profile
        self._finished = True
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
        if self._hook is not None:
            self.machine.remove_exit_hook(self._hook)
        for runner in self.machine.runners:
            kick_listeners(runner).remove(self._on_kick)
        self._fill_statistics()
        return self.profile

    # -- sampling ---------------------------------------------------------------------------

    def _now(self) -> int:
        return time.perf_counter_ns() - self._t0

    def _take_sample(
        self,
        runner: VcpuRunner,
        time_ns: int,
        origin: str,
        reason: str | None = None,
        detail: str | None = None,
    ) -> Sample | None:
        vcpu = runner.vcpu
        regs, sregs = runner.registers()
        protected = bool(sregs.cr0 & 1)
        cpl = (sregs.cs.selector & 3) if protected else 0
        mode = PagingMode.from_sregs(sregs)
        wide = bool(sregs.cs.l)
        ip = regs.rip if wide else (sregs.cs.base + regs.rip) & 0xFFFF_FFFF
        state = self._states[vcpu.id]
        stack = state.unwinder.unwind(ip, regs.rbp, regs.rsp, mode, wide)
        return Sample(vcpu.id, time_ns, ip, cpl, sregs.cr3, stack, origin, reason, detail)

    def _on_exit(self, event: ExitEvent) -> None:
        runner = event.runner
        state = self._states[runner.vcpu.id]
        now = self._now()
        start = now - event.handling_ns
        detail = exit_detail(event.reason, event.address, event.access)
        samples = self.profile.samples
        state.exits_seen += 1
        sample: Sample | None = None
        if self.exit_samples and state.exits_seen % state.exit_sample_stride == 0:
            sample = self._take_sample(runner, start, ORIGIN_EXIT, event.reason, detail)
            if sample is not None:
                samples.append(sample)
                state.exit_samples += 1
                if state.exit_samples >= self.exit_sample_budget * state.exit_sample_stride:
                    state.exit_sample_stride *= 2  # past the budget: halve the exit sampling rate
        if state.sample_due:
            state.sample_due = False
            if sample is None:
                sample = self._take_sample(runner, start, ORIGIN_TIMER)
                if sample is not None:
                    samples.append(sample)
            else:
                samples.append(
                    Sample(
                        sample.vcpu,
                        sample.time_ns,
                        sample.ip,
                        sample.cpl,
                        sample.cr3,
                        sample.stack,
                        ORIGIN_TIMER,
                    )
                )
        if state.spans < self.max_spans_per_vcpu:
            track = f"vcpu{runner.vcpu.id}"
            spans = self.profile.spans
            if start > state.last_end_ns:
                spans.append(Span(track, "guest", state.last_end_ns, start))
            label = f"exit:{event.reason} {detail}".rstrip()
            spans.append(Span(track, label, start, now))
            state.spans += 2
        state.last_end_ns = now

    def _on_kick(self, runner: VcpuRunner) -> None:
        """KVM_RUN returned because the sampler kicked this vCPU: take a time sample."""
        state = self._states[runner.vcpu.id]
        if not state.sample_due:
            return
        state.sample_due = False
        sample = self._take_sample(runner, self._now(), ORIGIN_TIMER)
        if sample is not None:
            self.profile.samples.append(sample)
            state.kick_samples += 1

    def _sampler_loop(self) -> None:
        name_host_thread()
        sandbox.enter_or_log("io")  # KVM ioctls, signal kicks and guest memory only
        period = 1.0 / self.frequency_hz
        next_tick = time.monotonic() + period
        while not self._stop.wait(max(0.0, next_tick - time.monotonic())):
            next_tick += period
            for runner in self.machine.runners:
                state = self._states[runner.vcpu.id]
                exits = runner.stats.returns_without_kick
                state.sample_due = True
                if exits == state.last_exit_count:
                    # no exit during the whole period: the guest computes, so kick it out for a sample
                    state.kicks_sent += 1
                    runner.sample_kick()
                state.last_exit_count = exits

    # -- assembling -------------------------------------------------------------------------

    def _fill_statistics(self) -> None:
        machine = self.machine
        profile = self.profile
        meta = profile.metadata
        meta.cpus = machine.cpu_count
        meta.kvm_backend = machine.kvm.backend
        meta.start_time_ns = self._start_wall_ns
        meta.duration_ns = self._now() if self._t0 else 0
        meta.sample_frequency_hz = self.frequency_hz
        if machine.guest is not None:
            meta.guest_kind = machine.guest.kind
            if machine.guest.symbol_file is not None:
                meta.guest_image = str(machine.guest.symbol_file)
        held_back = log_sink.counts()
        meta.extra["log_lines_suppressed"] = str(held_back.suppressed)
        meta.extra["log_lines_dropped"] = str(held_back.dropped)
        meta.extra["kicks"] = str(sum(s.kicks_sent for s in self._states.values()))
        meta.extra["exit_sample_stride_max"] = str(
            max((s.exit_sample_stride for s in self._states.values()), default=1)
        )
        fill_exit_statistics(profile, machine)
        self._add_boot_markers()
        self._add_io_requests()
        symbol_paths = list(self.symbol_files)
        if machine.guest is not None and machine.guest.symbol_file is not None:
            symbol_paths.insert(0, machine.guest.symbol_file)
        seen: set[str] = set()
        for path in symbol_paths:
            if str(path) in seen:
                continue
            seen.add(str(path))
            profile.symbol_tables.extend(load_symbol_file(path))

    def _add_boot_markers(self) -> None:
        """POST codes the guest wrote to port 0x80 become instants on a "port80" timeline track."""
        # markers are stamped with time.monotonic_ns, the same clock as perf_counter_ns on Linux
        offset = time.monotonic_ns() - time.perf_counter_ns() + self._t0
        for mapping in self.machine.devices():
            device = mapping.device
            if not isinstance(device, MarkerSource):
                continue
            for stamp, label in device.markers()[: self.max_spans_per_vcpu]:
                moment = stamp - offset
                if moment >= 0:
                    self.profile.spans.append(Span(device.marker_track, label, moment, moment))

    def _add_io_requests(self) -> None:
        """Each traced virtio request becomes a span on its device's "io:" track, its latency
        split into parts (args, in ns) so reports can show where virtualized I/O time goes."""
        for attachment in self.machine.virtio_attachments:
            device = attachment.device
            if not isinstance(device, RequestTraceSource):
                continue
            for trace in device.traces()[: self.max_spans_per_vcpu]:
                end = trace.interrupt_ns if trace.interrupt_ns is not None else trace.complete_ns
                parts: dict[str, int | float | str | bool] = {
                    IO_PART_NAMES[0]: trace.pickup_ns - trace.notify_ns,
                    IO_PART_NAMES[1]: trace.backend_start_ns - trace.pickup_ns,
                    IO_PART_NAMES[2]: trace.backend_end_ns - trace.backend_start_ns,
                    IO_PART_NAMES[3]: trace.complete_ns - trace.backend_end_ns,
                    IO_PART_NAMES[4]: end - trace.complete_ns,
                    "bytes": trace.length,
                    "thread": trace.thread,
                }
                self.profile.spans.append(
                    Span(f"io:{trace.device}", f"request:{trace.type_name}", trace.notify_ns - self._t0,
                         end - self._t0, parts)
                )  # fmt: skip


def fill_exit_statistics(profile: Profile, machine: Machine) -> None:
    """Copy the machine's always-on exit accounting, unclaimed accesses and KVM stats into ``profile``."""
    for runner in machine.runners:
        # list() copies in one step under the GIL: vCPU threads may add keys while we read
        for key, histogram in list(runner.stats.handling.items()):
            reason, address, access = decode_exit_key(key)
            device = None
            if reason == "IO":
                device = machine.device_name_at("pio", address)
            elif reason == "MMIO":
                device = machine.device_name_at("mmio", address)
            stat = profile.exit_stat(runner.vcpu.id, reason, exit_detail(reason, address, access), device)
            stat.histogram.merge(histogram)
        profile.guest_time_histogram(runner.vcpu.id).merge(runner.stats.guest)
    for space, bus in (("pio", machine.pio_bus), ("mmio", machine.mmio_bus)):
        for counter, is_write in ((bus.unclaimed_reads, False), (bus.unclaimed_writes, True)):
            for (address, size), count in list(counter.items()):
                profile.record_unclaimed(space, address, size, is_write, count=count)
    try:
        for name, values in machine.kvm_stats().items():
            profile.kvm_stats[name] = dict(values)
    except Exception:  # KVM stats are a bonus; their absence must not lose the profile
        pass
