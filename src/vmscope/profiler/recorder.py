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
``max_spans_per_vcpu`` exits of each vCPU. The sampler thread also polls, at the sampling rate,
how many instructions vmscope's fallback emulator completed per vCPU (a counter track on the
timeline; polling costs the vCPUs nothing, unlike a callback per completion).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vmscope import log_sink, sandbox
from vmscope.devices.traces import MarkerSource, RequestTraceSource
from vmscope.errors import GuestMemoryError, VmscopeError
from vmscope.host_thread import name_host_thread
from vmscope.memory.paging import PagingMode, read_virtual
from vmscope.profiler.guest_symbols import find_kernel_slide, guest_symbol_tables, pti_kernel_paging
from vmscope.profiler.interrupt_entry import InterruptEntries
from vmscope.profiler.model import (
    EMULATED_EVENT,
    IO_PART_NAMES,
    ORIGIN_EXIT,
    ORIGIN_TIMER,
    CounterSeries,
    EmulatedInstruction,
    Profile,
    Sample,
    Span,
    TaskInfo,
)
from vmscope.profiler.options import DEFAULT_FREQUENCY_HZ
from vmscope.profiler.stack_quality import INTERRUPT_ENTRY_KEY
from vmscope.profiler.unwinders.base import STOP_NO_TABLE, Registers
from vmscope.profiler.unwinders.cfi import CfiTable, CfiUnwinder
from vmscope.profiler.unwinders.chooser import UnwinderChooser
from vmscope.vmm.exit_keys import decode_exit_key, exit_detail
from vmscope.vmm.hooks import ExitEvent, ExitHook
from vmscope.vmm.kick_listeners import kick_listeners
from vmscope.vmm.runner import VcpuRunner

if TYPE_CHECKING:
    from vmscope.kvm.vcpu import Vcpu
    from vmscope.profiler.kernel.context import KernelProfileInfo
    from vmscope.profiler.kernel.modules import ModuleTracker
    from vmscope.profiler.kernel.per_vcpu import VcpuKernelState
    from vmscope.profiler.unwinders.orc_tables import OrcTables
    from vmscope.vmm.machine import Machine

DEFAULT_EXIT_SAMPLE_BUDGET = 200_000
DEFAULT_MAX_SPANS = 50_000
_KERNEL_HALF = 0xFFFF_8000_0000_0000


@dataclass
class _VcpuState:
    unwinder: UnwinderChooser
    sample_due: bool = False
    last_exit_count: int = 0
    last_end_ns: int = 0
    exit_samples: int = 0
    exit_sample_stride: int = 1
    exits_seen: int = 0
    spans: int = 0
    kicks_sent: int = 0
    kick_samples: int = 0
    #: "unwinder" and "unwinder: stop reason" -> stacks, for the report's stack-quality lines
    unwind_counts: dict[str, int] = field(default_factory=dict)
    #: the current task's lookup state (stock kernels with BTF only)
    kernel: VcpuKernelState | None = None
    #: the guest's IDT handler addresses, for kicks that find an interrupt delivered but not run
    entries: InterruptEntries = field(default_factory=InterruptEntries)
    interrupt_entry_samples: int = 0
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
        kernel_image: Path | None = None,
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
        regions = _cfi_regions(machine, self.symbol_files, max_depth) if kernel_image is None else []
        self._states = {
            runner.vcpu.id: _VcpuState(UnwinderChooser(machine.memory, max_depth, regions))
            for runner in machine.runners
        }
        # a stock kernel's own kallsyms and ORC tables, placed by the KASLR slide found at run time
        self.kernel: KernelProfileInfo | None = None
        self.kernel_problem = ""
        self._slide_tries = 0
        #: the image's ORC table (once the slide is known) and the modules' (once found), for all vCPUs
        self.orc_tables: OrcTables | None = None
        if kernel_image is not None:
            from vmscope.profiler.kernel.context import KernelProfileInfo
            from vmscope.profiler.unwinders.orc_tables import OrcTables

            try:
                self.kernel = KernelProfileInfo.load(kernel_image)
            except VmscopeError as error:  # not a Linux image with kallsyms: profile without them
                self.kernel_problem = str(error)
            else:
                self.orc_tables = OrcTables(self.kernel.orc_table())
                for state in self._states.values():
                    state.unwinder.set_kernel_orc(self.orc_tables)
        self.modules: ModuleTracker | None = None
        if self.kernel is not None:
            self._attach_kernel_state(self.kernel)
        self._modules_lock = threading.Lock()
        self._hook: ExitHook | None = None
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._emulated_series = {
            runner.vcpu.id: CounterSeries(f"vcpu{runner.vcpu.id}", EMULATED_EVENT)
            for runner in machine.runners
        }
        self._t0 = 0
        self._start_wall_ns = 0
        self._finished = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._t0 = time.perf_counter_ns()
        self._start_wall_ns = time.time_ns()
        for state in self._states.values():
            state.last_end_ns = 0
        for series in self._emulated_series.values():  # counts start at 0 with the run
            append_count_point(series, 0, 0, self.max_spans_per_vcpu)
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
        self._poll_emulated()
        self._fill_statistics()
        return self.profile

    @property
    def clock_origin_ns(self) -> int:
        """The perf_counter_ns value that profile times count from (set by :meth:`start`)."""
        return self._t0

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
        if self.kernel is not None and self.kernel.slide is None and cpl == 0 and wide:
            self._find_slide(runner, mode, sregs.idt.base)
        sp = regs.rsp
        counts = state.unwind_counts
        if origin == ORIGIN_TIMER and cpl == 0 and wide and mode.long_mode:
            interrupted = state.entries.interrupted(
                ip, sp, sregs.idt.base, sregs.idt.limit, self._guest_reader(mode)
            )
            if interrupted is not None:  # charged to the code the interrupt stopped, see interrupt_entry
                ip, sp, cpl = interrupted.ip, interrupted.sp, interrupted.cpl
                state.interrupt_entry_samples += 1
        start = Registers(ip, sp, regs.rbp, cpl)
        kernel_code = cpl == 0 and wide and mode.long_mode
        if kernel_code:  # before unwinding: a module found now unwinds with its own ORC table
            self._note_module_code(state, mode, ip)
        result = state.unwinder.unwind(start, mode, wide)
        if result.stop == STOP_NO_TABLE and self._note_module_code(state, mode, result.frames[-1]):
            result = state.unwinder.unwind(start, mode, wide)  # it returns into a module found just now
        counts[result.unwinder] = counts.get(result.unwinder, 0) + 1
        stop_key = f"{result.unwinder}: {result.stop}"
        counts[stop_key] = counts.get(stop_key, 0) + 1
        task = None
        if state.kernel is not None and wide and mode.long_mode:
            task = self._kernel_side(state, state.kernel, mode, cpl, sregs.gs.base)
        return Sample(
            vcpu.id, time_ns, ip, cpl, sregs.cr3, result.frames, origin, reason, detail, task, result.unwinder
        )

    def _attach_kernel_state(self, kernel: KernelProfileInfo) -> None:
        """Task naming (needs BTF) and module tracking for a stock kernel's samples."""
        from vmscope.profiler.kernel.modules import ModuleLayout, ModuleTracker
        from vmscope.profiler.kernel.per_vcpu import MSR_KERNEL_GS_BASE, VcpuKernelState
        from vmscope.profiler.kernel.tasks import TaskNamer

        if kernel.btf is not None:
            orc_format = None if kernel.orc is None else kernel.orc.format_version
            try:
                layout = ModuleLayout.from_kernel(kernel.kallsyms, kernel.btf)
            except VmscopeError as error:
                self.kernel_problem = str(error)
            else:
                self.modules = ModuleTracker(layout, orc=self.orc_tables, orc_format=orc_format)
        if kernel.tasks is None:
            return
        namer = TaskNamer(kernel.tasks)
        for runner in self.machine.runners:

            def read_msr(vcpu: Vcpu = runner.vcpu) -> int | None:
                try:
                    return vcpu.get_msrs([MSR_KERNEL_GS_BASE]).get(MSR_KERNEL_GS_BASE)
                except VmscopeError:
                    return None

            self._states[runner.vcpu.id].kernel = VcpuKernelState(namer, read_msr)

    def _kernel_side(
        self, state: _VcpuState, kernel: VcpuKernelState, mode: PagingMode, cpl: int, gs_base: int
    ) -> TaskInfo | None:
        """The running task."""
        walker = state.unwinder.frame_pointers

        def read(address: int) -> int | None:
            return walker.read_word(mode, address, 8)

        kernel_read = None
        kernel_mode = pti_kernel_paging(mode, cpl)
        if kernel_mode is not None:

            def kernel_read(address: int) -> int | None:
                return walker.read_word(kernel_mode, address, 8)

        return kernel.current_task(cpl, gs_base, read, kernel_read)

    def _note_module_code(self, state: _VcpuState, mode: PagingMode, ip: int) -> bool:
        """Kernel code outside the image: the tracker (lazily) finds the module it lies in. True
        when this found it, so a stack that ended there can be unwound again."""
        tracker, kernel = self.modules, self.kernel
        if tracker is None or kernel is None or kernel.slide is None:
            return False
        if ip < _KERNEL_HALF or kernel.covers_text(ip):
            return False
        walker = state.unwinder.frame_pointers

        def read(address: int) -> int | None:
            return walker.read_word(mode, address, 8)

        with self._modules_lock:
            return tracker.note(ip, read, self._guest_reader(mode), kernel.slide)

    def _guest_reader(self, mode: PagingMode) -> Callable[[int, int], bytes | None]:
        """Guest-virtual reads through ``mode``'s page tables; None where nothing is mapped."""

        def read(address: int, length: int) -> bytes | None:
            try:
                return read_virtual(self.machine.memory, mode, address, length)
            except GuestMemoryError:
                return None

        return read

    def _find_slide(self, runner: VcpuRunner, mode: PagingMode, idt_base: int) -> None:
        """Look for the KASLR slide on a few samples, then every 64th (it needs an MSR ioctl)."""
        assert self.kernel is not None
        self._slide_tries += 1
        if self._slide_tries > 8 and self._slide_tries % 64:
            return
        unwinder = self._states[runner.vcpu.id].unwinder.frame_pointers
        slide = find_kernel_slide(
            self.kernel, runner.vcpu, idt_base, lambda address: unwinder.read_word(mode, address, 8)
        )
        if slide is not None and self.orc_tables is not None:
            self.orc_tables.set_kernel(self.kernel.orc_table())

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
                        task=sample.task,
                        unwinder=sample.unwinder,
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

    def _poll_emulated(self) -> None:
        """Add a point to each vCPU's emulated-instruction series (see :func:`append_count_point`)."""
        if self.machine.fallback is None:
            return
        per_vcpu: dict[int, int] = {}
        for vcpu, _, _, count, _ in self.machine.fallback_counts():
            per_vcpu[vcpu] = per_vcpu.get(vcpu, 0) + count
        now = self._now()
        for vcpu, series in self._emulated_series.items():
            append_count_point(series, now, per_vcpu.get(vcpu, 0), self.max_spans_per_vcpu)

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
            self._poll_emulated()

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
        totals: dict[str, int] = {}
        for state in self._states.values():
            for key, count in state.unwind_counts.items():
                totals[key] = totals.get(key, 0) + count
        for key, count in sorted(totals.items()):
            meta.extra[f"stacks.{key}"] = str(count)
        meta.extra[INTERRUPT_ENTRY_KEY] = str(sum(s.interrupt_entry_samples for s in self._states.values()))
        if self.kernel_problem:
            meta.extra["kernel_tables"] = self.kernel_problem
        # the kernel's table; placed now from the stopped vCPUs if no sample found the slide
        profile.symbol_tables = guest_symbol_tables(machine, self.symbol_files, self.kernel)
        if self.modules is not None:
            profile.symbol_tables.extend(self.modules.symbol_tables())
        if self.kernel is not None:
            slide = self.kernel.slide
            meta.extra["kernel_slide"] = "not found" if slide is None else f"{slide:#x}"
            self._task_statistics(self.kernel)
        fill_exit_statistics(profile, machine)
        profile.emulated_series = [series for series in self._emulated_series.values() if any(series.values)]
        self._add_boot_markers()
        self._add_io_requests()

    def _task_statistics(self, kernel: KernelProfileInfo) -> None:
        """How task naming went (counts and cost), for the report and the benchmark."""
        extra = self.profile.metadata.extra
        if kernel.task_problem:
            extra["tasks"] = f"not named: {kernel.task_problem}"
        states = [state.kernel for state in self._states.values() if state.kernel is not None]
        lookups = sum(state.lookups for state in states)
        if lookups:
            extra["tasks.lookups"] = str(lookups)
            extra["tasks.named"] = str(sum(state.named for state in states))
            extra["tasks.msr_reads"] = str(sum(state.msr_reads for state in states))
            extra["tasks.lookup_us_mean"] = f"{sum(state.lookup_ns for state in states) / lookups / 1000:.2f}"
        if self.modules is not None and self.modules.scans:
            extra["modules.scans"] = str(self.modules.scans)
            extra["modules.found"] = str(len(self.modules.modules))
            if self.modules.layout.orc is not None:
                extra["modules.with_orc"] = str(sum(m.orc is not None for m in self.modules.modules.values()))

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


def _cfi_regions(machine: Machine, symbol_files: Sequence[Path], max_depth: int) -> list[CfiUnwinder]:
    """DWARF CFI unwinders for the guest image and ELF symbol files that carry call frame info."""
    paths = list(symbol_files)
    if machine.guest is not None and machine.guest.symbol_file is not None:
        paths.insert(0, machine.guest.symbol_file)
    regions = []
    for path in dict.fromkeys(paths):
        try:
            with open(path, "rb") as stream:
                if stream.read(4) != b"\x7fELF":
                    continue
            regions.append(CfiUnwinder(CfiTable.from_elf(path), max_depth))
        except (OSError, VmscopeError):
            continue  # no CFI: frame pointers cover this image
    return regions


def append_count_point(series: CounterSeries, time_ns: int, value: int, limit: int) -> None:
    """Add the cumulative ``value`` polled at ``time_ns``, keeping only the points a timeline needs:
    those where the count moved, and the first poll after a move (where the rate falls to zero).
    Skipped polls repeat the last kept value, so each point's difference to the previous kept one
    is still the count of its own poll interval. At most ``limit`` points (the earliest)."""
    times, values = series.times_ns, series.values
    if len(times) >= limit:
        return
    moved = not values or value != values[-1]
    previous_moved = len(values) >= 2 and values[-1] != values[-2]
    if moved or previous_moved:
        times.append(time_ns)
        values.append(value)


def fill_exit_statistics(profile: Profile, machine: Machine) -> None:
    """Copy the machine's always-on exit accounting, unclaimed accesses, KVM stats and the
    instructions its fallback emulator completed into ``profile``."""
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
    for unclaimed in machine.unclaimed_counts():
        profile.record_unclaimed(
            unclaimed.space, unclaimed.address, unclaimed.size, unclaimed.is_write, unclaimed.count
        )
    profile.emulated = [EmulatedInstruction(*row) for row in machine.fallback_counts()]
    try:
        for name, values in machine.kvm_stats().items():
            profile.kvm_stats[name] = dict(values)
    except Exception:  # KVM stats are a bonus; their absence must not lose the profile
        pass
