"""The profile data model: what a profiling run recorded, filled from the vCPU loop, saved at the end.

Filling it (the recorder side)
------------------------------
* One :class:`Profile` per run; set ``profile.metadata`` fields as they become known and
  ``metadata.duration_ns`` at the end.
* Per VM exit: ``stat = profile.exit_stat(vcpu, reason, detail, device)`` (get-or-create, safe to call
  from every vCPU thread; cache the returned object per port/address to skip even the dict lookup)
  then ``stat.record(handling_ns)``.
* Guest time between exits (KVM_RUN entry to exit): ``profile.guest_time_histogram(vcpu).record(ns)``.
* Samples: ``profile.samples.append(Sample(...))``. ``time_ns`` and span times are nanoseconds since
  the start of the run (a monotonic clock); ``stack`` is leaf first and starts with ``ip``.
  A sample taken *at* an exit has ``origin="exit"`` and that exit's ``exit_reason``/``exit_detail``
  (same strings as the :class:`ExitStat`); reports spread each exit key's count and handling time
  over the guest code its exit samples point at, so sampling every exit or every Nth works.
* Timeline: ``profile.spans.append(Span(track, name, start_ns, end_ns))``, tracks like ``"vcpu0"``
  or ``"io:virtio-blk0"``, names like ``"guest"`` or ``"exit:IO port 0x3f8 out"``.
* Unhandled port/MMIO accesses: ``profile.record_unclaimed("pio"|"mmio", address, size, is_write,
  count=1)``.
* KVM binary stats at the end: ``profile.kvm_stats["vm"] = {...}``, ``["vcpu0"] = {...}``.
* Host perf counters per thread (:mod:`vmscope.profiler.counters`): ``profile.counters`` (final
  values per "vcpuN"/"io:..." thread), ``profile.counter_series`` (cumulative values over time for
  the timeline) and ``profile.counter_notes`` (one line per counter that could not be opened).
* Instructions vmscope's fallback emulator completed (KVM could not emulate them):
  ``profile.emulated`` (:class:`EmulatedInstruction` per vCPU, mnemonic and guest rip, totals at
  the end) and ``profile.emulated_series`` (cumulative completions per "vcpuN" over time).
* Symbols: append :class:`~vmscope.symbols.SymbolTable` objects (from
  :mod:`vmscope.symbols` loaders) to ``profile.symbol_tables``; the tables travel inside the
  profile file so reports symbolize on any machine. Call :meth:`Profile.compact_symbols` before
  saving to keep only the symbols that sampled addresses hit.

Symbolization happens at report time from the stored tables (raw addresses are kept), so adding a
better symbol file later improves an old profile. Unknown addresses are never dropped: they are
shown as ``module+0xoffset`` inside a known module range, else as hex.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from vmscope.errors import VmscopeError
from vmscope.histogram import LatencyHistogram
from vmscope.symbols import SymbolEntry, Symbolizer, SymbolTable
from vmscope.version import __version__

ORIGIN_EXIT = "exit"
ORIGIN_TIMER = "timer"
ORIGINS = (ORIGIN_EXIT, ORIGIN_TIMER)
UNCLAIMED_SPACES = ("pio", "mmio")

#: the parts a virtio request's latency is split into: Span args (ns) on "io:<device>" tracks,
#: spans named "request:<type>", from the notification to the completion interrupt
IO_PART_NAMES = ("queue wait", "request parsing", "backend", "completion", "interrupt")

KvmStatValue = int | float | list[int]
SpanArgValue = str | int | float | bool


@dataclass(slots=True)
class ProfileMetadata:
    """Where and how the profile was recorded."""

    vmscope_version: str = __version__
    #: path of the guest image as given on the command line
    guest_image: str = ""
    #: loader that booted it: "elf", "pvh", "bzimage", "flat", ...
    guest_kind: str = ""
    #: vmscope's own argv for the run
    command_line: list[str] = field(default_factory=list)
    #: guest kernel command line, if any
    kernel_command_line: str = ""
    cpus: int = 1
    #: host KVM module: "kvm_intel", "kvm_amd", "kvm_pvm"
    kvm_backend: str = ""
    #: wall-clock start, ns since the Unix epoch (time.time_ns())
    start_time_ns: int = 0
    duration_ns: int = 0
    #: timer sampling frequency; 0 when only exits were sampled
    sample_frequency_hz: float = 0.0
    #: anything else worth keeping (host kernel, CPU model, ...)
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class ExitStat:
    """Count and handling-time distribution of one kind of exit on one vCPU.

    ``reason`` is the KVM exit reason ("IO", "MMIO", "HLT", "SHUTDOWN", ...); ``detail`` narrows it
    ("port 0x3f8 out", "mmio 0xd0000000 read", or ""); ``device`` names the device model that
    handled it, None when none did.
    """

    vcpu: int
    reason: str
    detail: str = ""
    device: str | None = None
    histogram: LatencyHistogram = field(default_factory=LatencyHistogram)

    def record(self, handling_ns: int) -> None:
        self.histogram.record(handling_ns)

    @property
    def count(self) -> int:
        return self.histogram.count

    @property
    def total_ns(self) -> int:
        return self.histogram.sum

    @property
    def key(self) -> tuple[int, str, str, str | None]:
        return (self.vcpu, self.reason, self.detail, self.device)

    @property
    def event(self) -> str:
        """``reason detail`` as one label, e.g. "IO port 0x3f8 out"."""
        return exit_label(self.reason, self.detail)


def exit_label(reason: str, detail: str | None) -> str:
    return f"{reason} {detail}" if detail else reason


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """The guest task a sample ran for: its command name, thread id (pid) and process id (tgid).
    The idle task of CPU n is ``swapper/n`` with pid 0."""

    comm: str
    pid: int
    tgid: int

    @property
    def label(self) -> str:
        """``comm (pid)``: the process frame of flame graphs and the timeline's task names."""
        return f"{self.comm} ({self.pid})"


@dataclass(slots=True)
class Sample:
    """One guest stack sample.

    ``stack`` holds return addresses leaf first, ``stack[0] == ip``. ``origin`` is "timer" for
    periodic samples and "exit" for samples taken at a VM exit, which then carry the exit's
    ``exit_reason``/``exit_detail``. ``task`` is the guest task that was running, when the kernel's
    tables told (stock kernels); ``unwinder`` names the unwinder that produced ``stack``
    ("orc", "cfi", "fp", "orc+fp", ...), None in profiles recorded before it was kept.
    """

    vcpu: int
    time_ns: int
    ip: int
    cpl: int
    cr3: int
    stack: tuple[int, ...]
    origin: str = ORIGIN_TIMER
    exit_reason: str | None = None
    exit_detail: str | None = None
    task: TaskInfo | None = None
    unwinder: str | None = None

    @property
    def frames(self) -> tuple[int, ...]:
        """The stack, guaranteed to start with ``ip``."""
        if self.stack and self.stack[0] == self.ip:
            return self.stack
        return (self.ip, *self.stack)

    @property
    def exit_key(self) -> tuple[str, str] | None:
        if self.exit_reason is None:
            return None
        return (self.exit_reason, self.exit_detail or "")


@dataclass(slots=True)
class Span:
    """A timeline interval on one track ("vcpu0", "io:virtio-blk0"), times in ns since run start."""

    track: str
    name: str
    start_ns: int
    end_ns: int
    args: dict[str, SpanArgValue] | None = None

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)


@dataclass(slots=True)
class UnclaimedAccess:
    """Guest accesses to a port or MMIO address no device claimed."""

    space: str  # "pio" | "mmio"
    address: int
    #: access width in bytes, 0 when not recorded
    size: int
    is_write: bool
    count: int = 0

    @property
    def label(self) -> str:
        direction = "write" if self.is_write else "read"
        kind = "port" if self.space == "pio" else "mmio"
        size = f" size {self.size}" if self.size else ""  # 0: size not recorded
        return f"{kind} {self.address:#x} {direction}{size}"


@dataclass(slots=True)
class ThreadCounters:
    """Host perf counter totals of one vmscope thread ("vcpu0", "io:virtio-blk0").

    ``values`` maps event names ("task-clock" in ns, "cycles:guest", "cycles:host", ...) to
    counts; ``wall_ns`` is how long the counters were open (thread start to the end of the run).
    """

    thread: str
    tid: int
    values: dict[str, int]
    wall_ns: int = 0


@dataclass(slots=True)
class CounterSeries:
    """One counter of one thread over time: cumulative ``values`` at ``times_ns`` (since run start)."""

    thread: str
    event: str
    times_ns: list[int] = field(default_factory=list)
    values: list[int] = field(default_factory=list)


@dataclass(slots=True)
class EmulatedInstruction:
    """Completions by vmscope's fallback emulator of one instruction (``mnemonic`` as capstone
    names it, "lock cmpxchg16b") at one guest ``rip`` on one vCPU, and the time they took."""

    vcpu: int
    mnemonic: str
    rip: int
    count: int
    total_ns: int


#: the event name of ``Profile.emulated_series``
EMULATED_EVENT = "emulated instructions"


@dataclass(eq=False)
class Profile:
    """Everything one run recorded; see the module docstring for how to fill it."""

    metadata: ProfileMetadata = field(default_factory=ProfileMetadata)
    exit_stats: list[ExitStat] = field(default_factory=list)
    #: per vCPU: guest time between exits (KVM_RUN entry to the next exit)
    guest_time: dict[int, LatencyHistogram] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    unclaimed: list[UnclaimedAccess] = field(default_factory=list)
    #: KVM binary stats: "vm" and "vcpuN" -> stat name -> value
    kvm_stats: dict[str, dict[str, KvmStatValue]] = field(default_factory=dict)
    symbol_tables: list[SymbolTable] = field(default_factory=list)
    #: host perf counters per vCPU / I/O thread, their time series, and why some could not be opened
    counters: list[ThreadCounters] = field(default_factory=list)
    counter_series: list[CounterSeries] = field(default_factory=list)
    counter_notes: list[str] = field(default_factory=list)
    #: instructions vmscope completed because KVM could not emulate them, and their count over time
    #: per vCPU (series named "vcpuN", event EMULATED_EVENT, cumulative values)
    emulated: list[EmulatedInstruction] = field(default_factory=list)
    emulated_series: list[CounterSeries] = field(default_factory=list)

    _exit_index: dict[tuple[int, str, str, str | None], ExitStat] = field(
        default_factory=dict, init=False, repr=False
    )
    _unclaimed_index: dict[tuple[str, int, int, bool], UnclaimedAccess] = field(
        default_factory=dict, init=False, repr=False
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    # --- recording -------------------------------------------------------------------------------

    def exit_stat(self, vcpu: int, reason: str, detail: str = "", device: str | None = None) -> ExitStat:
        """The :class:`ExitStat` for this key, created on first use (thread-safe)."""
        key = (vcpu, reason, detail, device)
        stat = self._exit_index.get(key)
        if stat is not None:
            return stat
        with self._lock:
            if len(self._exit_index) != len(self.exit_stats):
                self._exit_index = {s.key: s for s in self.exit_stats}
            stat = self._exit_index.get(key)
            if stat is None:
                stat = ExitStat(vcpu, reason, detail, device)
                self.exit_stats.append(stat)
                self._exit_index[key] = stat
            return stat

    def guest_time_histogram(self, vcpu: int) -> LatencyHistogram:
        histogram = self.guest_time.get(vcpu)
        if histogram is None:
            with self._lock:
                histogram = self.guest_time.setdefault(vcpu, LatencyHistogram())
        return histogram

    def record_unclaimed(
        self, space: str, address: int, size: int, is_write: bool, count: int = 1
    ) -> UnclaimedAccess:
        """Count ``count`` accesses no device claimed; ``space`` is "pio" or "mmio", ``size`` 0 if unknown."""
        if space not in UNCLAIMED_SPACES:
            raise VmscopeError(f"unclaimed access: space {space!r} is not one of {UNCLAIMED_SPACES}")
        key = (space, address, size, is_write)
        with self._lock:
            if len(self._unclaimed_index) != len(self.unclaimed):
                self._unclaimed_index = {(u.space, u.address, u.size, u.is_write): u for u in self.unclaimed}
            access = self._unclaimed_index.get(key)
            if access is None:
                access = UnclaimedAccess(space, address, size, is_write)
                self.unclaimed.append(access)
                self._unclaimed_index[key] = access
            access.count += count
        return access

    # --- reading ---------------------------------------------------------------------------------

    @property
    def vcpus(self) -> list[int]:
        """Every vCPU index that appears anywhere in the profile."""
        seen = {s.vcpu for s in self.exit_stats} | set(self.guest_time) | {s.vcpu for s in self.samples}
        return sorted(seen | set(range(self.metadata.cpus)))

    def symbolizer(self) -> Symbolizer:
        return Symbolizer(self.symbol_tables)

    def compact_symbols(self) -> None:
        """Keep only symbols that some sampled or emulated address falls in (sizes made explicit, so
        lookups of those addresses give the same answer as before)."""
        symbolizer = self.symbolizer()
        addresses = {address for sample in self.samples for address in sample.frames}
        addresses.update(entry.rip for entry in self.emulated)
        kept: dict[tuple[str, str, int], SymbolEntry] = {}
        for address in addresses:
            extent = symbolizer.symbol_extent(address)
            if extent is None:
                continue
            name, start, end, module = extent
            previous = kept.get((module, name, start))
            size = max(end - start, previous.size if previous else 0)
            kept[(module, name, start)] = SymbolEntry(name, start, size)
        for table in self.symbol_tables:
            table.symbols = sorted(
                (entry for (module, _, _), entry in kept.items() if module == table.module),
                key=lambda entry: entry.start,
            )
            # several tables may share a module name: give each symbol to the first one only
            kept = {k: v for k, v in kept.items() if k[0] != table.module}

    # --- serialization ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; samples and spans are stored column-wise with interned stacks/strings."""
        stacks: dict[tuple[int, ...], int] = {}
        exit_keys: dict[tuple[str, str], int] = {}
        tasks: dict[TaskInfo, int] = {}
        unwinders: dict[str, int] = {}
        columns: dict[str, list[Any]] = {
            "vcpu": [], "time_ns": [], "cpl": [], "cr3": [], "stack": [], "origin": [], "exit": [],
            "task": [], "unwinder": [],
        }  # fmt: skip
        for sample in self.samples:
            columns["vcpu"].append(sample.vcpu)
            columns["time_ns"].append(sample.time_ns)
            columns["cpl"].append(sample.cpl)
            columns["cr3"].append(sample.cr3)
            columns["stack"].append(stacks.setdefault(tuple(sample.frames), len(stacks)))
            columns["origin"].append(sample.origin)
            key = sample.exit_key
            columns["exit"].append(-1 if key is None else exit_keys.setdefault(key, len(exit_keys)))
            task = sample.task
            columns["task"].append(-1 if task is None else tasks.setdefault(task, len(tasks)))
            unwinder = sample.unwinder
            unwinder_index = -1 if unwinder is None else unwinders.setdefault(unwinder, len(unwinders))
            columns["unwinder"].append(unwinder_index)
        strings: dict[str, int] = {}
        span_columns: dict[str, list[Any]] = {"track": [], "name": [], "start_ns": [], "end_ns": []}
        span_args: dict[str, dict[str, SpanArgValue]] = {}
        for index, span in enumerate(self.spans):
            span_columns["track"].append(strings.setdefault(span.track, len(strings)))
            span_columns["name"].append(strings.setdefault(span.name, len(strings)))
            span_columns["start_ns"].append(span.start_ns)
            span_columns["end_ns"].append(span.end_ns)
            if span.args:
                span_args[str(index)] = dict(span.args)
        meta = self.metadata
        return {
            "metadata": {
                "vmscope_version": meta.vmscope_version,
                "guest_image": meta.guest_image,
                "guest_kind": meta.guest_kind,
                "command_line": list(meta.command_line),
                "kernel_command_line": meta.kernel_command_line,
                "cpus": meta.cpus,
                "kvm_backend": meta.kvm_backend,
                "start_time_ns": meta.start_time_ns,
                "duration_ns": meta.duration_ns,
                "sample_frequency_hz": meta.sample_frequency_hz,
                "extra": dict(meta.extra),
            },
            "exit_stats": [
                {
                    "vcpu": s.vcpu,
                    "reason": s.reason,
                    "detail": s.detail,
                    "device": s.device,
                    "histogram": s.histogram.to_dict(),
                }
                for s in self.exit_stats
            ],
            "guest_time": [[vcpu, h.to_dict()] for vcpu, h in sorted(self.guest_time.items())],
            "samples": {
                **columns,
                "stacks": [list(stack) for stack in stacks],
                "exit_keys": [list(key) for key in exit_keys],
                "tasks": [[task.comm, task.pid, task.tgid] for task in tasks],
                "unwinders": list(unwinders),
            },
            "spans": {**span_columns, "strings": list(strings), "args": span_args},
            "unclaimed": [
                {
                    "space": u.space,
                    "address": u.address,
                    "size": u.size,
                    "is_write": u.is_write,
                    "count": u.count,
                }
                for u in self.unclaimed
            ],
            "kvm_stats": {owner: dict(values) for owner, values in self.kvm_stats.items()},
            "symbol_tables": [table.to_dict() for table in self.symbol_tables],
            "counters": {
                "threads": [
                    {"thread": c.thread, "tid": c.tid, "values": dict(c.values), "wall_ns": c.wall_ns}
                    for c in self.counters
                ],
                "series": [_series_to_dict(s) for s in self.counter_series],
                "notes": list(self.counter_notes),
            },
            "emulated": {
                "instructions": [
                    {
                        "vcpu": e.vcpu,
                        "mnemonic": e.mnemonic,
                        "rip": e.rip,
                        "count": e.count,
                        "total_ns": e.total_ns,
                    }
                    for e in self.emulated
                ],
                "series": [_series_to_dict(s) for s in self.emulated_series],
            },
        }

    @classmethod
    def from_dict(cls, data: Any) -> Profile:
        """Inverse of :meth:`to_dict`; malformed data raises :class:`VmscopeError` naming the part."""
        if not isinstance(data, dict):
            raise VmscopeError("profile: top level is not an object")
        part = "metadata"
        try:
            profile = cls(metadata=_metadata_from_dict(data["metadata"]))
            part = "exit_stats"
            for item in data["exit_stats"]:
                device = item["device"]
                stat = ExitStat(
                    vcpu=_int(item["vcpu"], "vcpu"),
                    reason=_str(item["reason"], "reason"),
                    detail=_str(item["detail"], "detail"),
                    device=None if device is None else _str(device, "device"),
                    histogram=LatencyHistogram.from_dict(item["histogram"]),
                )
                profile.exit_stats.append(stat)
            part = "guest_time"
            for vcpu, histogram in data["guest_time"]:
                profile.guest_time[_int(vcpu, "vcpu")] = LatencyHistogram.from_dict(histogram)
            part = "samples"
            profile.samples = _samples_from_dict(data["samples"])
            part = "spans"
            profile.spans = _spans_from_dict(data["spans"])
            part = "unclaimed"
            for item in data["unclaimed"]:
                space = _str(item["space"], "space")
                if space not in UNCLAIMED_SPACES:
                    raise VmscopeError(f"space {space!r} is not one of {UNCLAIMED_SPACES}")
                profile.unclaimed.append(
                    UnclaimedAccess(
                        space,
                        _int(item["address"], "address"),
                        _int(item["size"], "size"),
                        bool(item["is_write"]),
                        _int(item["count"], "count"),
                    )
                )
            part = "kvm_stats"
            for owner, values in data["kvm_stats"].items():
                if not isinstance(values, dict):
                    raise VmscopeError(f"{owner!r} is not an object")
                profile.kvm_stats[str(owner)] = {
                    str(name): _kvm_stat(value) for name, value in values.items()
                }
            part = "symbol_tables"
            profile.symbol_tables = [SymbolTable.from_dict(item) for item in data["symbol_tables"]]
            part = "counters"
            # profiles written before counters existed have no "counters" part
            _counters_from_dict(profile, data.get("counters", {}))
            part = "emulated"
            # nor an "emulated" part before the fallback emulator's table
            _emulated_from_dict(profile, data.get("emulated", {}))
        except VmscopeError as error:
            raise VmscopeError(f"profile {part}: {error}") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            raise VmscopeError(f"profile {part}: malformed ({type(error).__name__}: {error})") from None
        return profile


# --- deserialization helpers ---------------------------------------------------------------------


def _int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise VmscopeError(f"{name} {value!r} is not an integer")
    return value


def _uint(value: Any, name: str) -> int:
    number = _int(value, name)
    if number < 0:
        raise VmscopeError(f"{name} {value!r} is negative")
    return number


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise VmscopeError(f"{name} {value!r} is not a string")
    return value


def _kvm_stat(value: Any) -> KvmStatValue:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise VmscopeError(f"stat value {value!r} is not a number or a list of integers")


def _metadata_from_dict(data: Any) -> ProfileMetadata:
    if not isinstance(data, dict):
        raise VmscopeError("not an object")
    command_line = data.get("command_line", [])
    if not isinstance(command_line, list) or not all(isinstance(a, str) for a in command_line):
        raise VmscopeError("command_line is not a list of strings")
    extra = data.get("extra", {})
    if not isinstance(extra, dict):
        raise VmscopeError("extra is not an object")
    frequency = data.get("sample_frequency_hz", 0.0)
    if not isinstance(frequency, int | float) or isinstance(frequency, bool) or frequency < 0:
        raise VmscopeError(f"sample_frequency_hz {frequency!r} is not a non-negative number")
    return ProfileMetadata(
        vmscope_version=_str(data.get("vmscope_version", ""), "vmscope_version"),
        guest_image=_str(data.get("guest_image", ""), "guest_image"),
        guest_kind=_str(data.get("guest_kind", ""), "guest_kind"),
        command_line=list(command_line),
        kernel_command_line=_str(data.get("kernel_command_line", ""), "kernel_command_line"),
        cpus=_uint(data.get("cpus", 1), "cpus"),
        kvm_backend=_str(data.get("kvm_backend", ""), "kvm_backend"),
        start_time_ns=_uint(data.get("start_time_ns", 0), "start_time_ns"),
        duration_ns=_uint(data.get("duration_ns", 0), "duration_ns"),
        sample_frequency_hz=float(frequency),
        extra={str(k): str(v) for k, v in extra.items()},
    )


def _samples_from_dict(data: Any) -> list[Sample]:
    stacks: list[tuple[int, ...]] = []
    for stack in data["stacks"]:
        frames = tuple(_uint(address, "stack address") for address in stack)
        if not frames:
            raise VmscopeError("empty stack")
        stacks.append(frames)
    exit_keys = [
        (_str(reason, "exit reason"), _str(detail, "exit detail")) for reason, detail in data["exit_keys"]
    ]
    # tasks and unwinders came later: files without them load with None in each sample
    tasks = [
        TaskInfo(_str(comm, "task comm"), _uint(pid, "task pid"), _uint(tgid, "task tgid"))
        for comm, pid, tgid in data.get("tasks", [])
    ]
    unwinders = [_str(name, "unwinder") for name in data.get("unwinders", [])]
    names = ("vcpu", "time_ns", "cpl", "cr3", "stack", "origin", "exit")
    columns = [data[name] for name in names]
    length = len(columns[0])
    columns.append(data.get("task", [-1] * length))
    columns.append(data.get("unwinder", [-1] * length))
    if any(len(column) != length for column in columns):
        raise VmscopeError("sample columns differ in length")
    samples = []
    for vcpu, time_ns, cpl, cr3, stack_index, origin, exit_index, task_index, unwinder_index in zip(
        *columns, strict=True
    ):
        if origin not in ORIGINS:
            raise VmscopeError(f"origin {origin!r} is not one of {ORIGINS}")
        stack = stacks[_uint(stack_index, "stack index")]
        exit_key = None if _int(exit_index, "exit index") < 0 else exit_keys[exit_index]
        samples.append(
            Sample(
                vcpu=_uint(vcpu, "vcpu"),
                time_ns=_int(time_ns, "time_ns"),
                ip=stack[0],
                cpl=_uint(cpl, "cpl"),
                cr3=_uint(cr3, "cr3"),
                stack=stack,
                origin=origin,
                exit_reason=None if exit_key is None else exit_key[0],
                exit_detail=None if exit_key is None else exit_key[1],
                task=None if _int(task_index, "task index") < 0 else tasks[task_index],
                unwinder=None if _int(unwinder_index, "unwinder index") < 0 else unwinders[unwinder_index],
            )
        )
    return samples


def _spans_from_dict(data: Any) -> list[Span]:
    strings = [_str(s, "span string") for s in data["strings"]]
    names = ("track", "name", "start_ns", "end_ns")
    columns = [data[name] for name in names]
    length = len(columns[0])
    if any(len(column) != length for column in columns):
        raise VmscopeError("span columns differ in length")
    args = data.get("args", {})
    if not isinstance(args, dict):
        raise VmscopeError("span args is not an object")
    spans = []
    for index, (track, name, start_ns, end_ns) in enumerate(zip(*columns, strict=True)):
        span_args = args.get(str(index))
        if span_args is not None and not isinstance(span_args, dict):
            raise VmscopeError(f"args of span {index} is not an object")
        spans.append(
            Span(
                track=strings[_uint(track, "track")],
                name=strings[_uint(name, "name")],
                start_ns=_int(start_ns, "start_ns"),
                end_ns=_int(end_ns, "end_ns"),
                args=span_args,
            )
        )
    return spans


def _counters_from_dict(profile: Profile, data: Any) -> None:
    if not isinstance(data, dict):
        raise VmscopeError("not an object")
    for item in data.get("threads", []):
        values = item["values"]
        if not isinstance(values, dict):
            raise VmscopeError("values is not an object")
        profile.counters.append(
            ThreadCounters(
                thread=_str(item["thread"], "thread"),
                tid=_uint(item["tid"], "tid"),
                values={_str(name, "event"): _uint(value, "count") for name, value in values.items()},
                wall_ns=_uint(item.get("wall_ns", 0), "wall_ns"),
            )
        )
    profile.counter_series = [_series_from_dict(item) for item in data.get("series", [])]
    profile.counter_notes = [_str(line, "note") for line in data.get("notes", [])]


def _series_to_dict(series: CounterSeries) -> dict[str, Any]:
    return {
        "thread": series.thread,
        "event": series.event,
        "times_ns": list(series.times_ns),
        "values": list(series.values),
    }


def _series_from_dict(item: Any) -> CounterSeries:
    times = [_int(t, "time_ns") for t in item["times_ns"]]
    values = [_uint(v, "count") for v in item["values"]]
    if len(times) != len(values):
        raise VmscopeError("series times and values differ in length")
    return CounterSeries(_str(item["thread"], "thread"), _str(item["event"], "event"), times, values)


def _emulated_from_dict(profile: Profile, data: Any) -> None:
    if not isinstance(data, dict):
        raise VmscopeError("not an object")
    for item in data.get("instructions", []):
        profile.emulated.append(
            EmulatedInstruction(
                vcpu=_uint(item["vcpu"], "vcpu"),
                mnemonic=_str(item["mnemonic"], "mnemonic"),
                rip=_uint(item["rip"], "rip"),
                count=_uint(item["count"], "count"),
                total_ns=_uint(item["total_ns"], "total_ns"),
            )
        )
    profile.emulated_series = [_series_from_dict(item) for item in data.get("series", [])]
