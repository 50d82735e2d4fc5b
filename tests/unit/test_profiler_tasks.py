"""Guest tasks in profiles: Sample.task/unwinder through the profile file (old files still load), the
comm,sym table, the process as flame-graph root, and task spans on the timeline."""

from __future__ import annotations

import json

from vmscope.profiler import profile_file
from vmscope.profiler.export import export_profile
from vmscope.profiler.model import Profile, Sample, TaskInfo
from vmscope.profiler.report import ReportOptions, report_text
from vmscope.profiler.tasks_view import UNKNOWN_TASK, comm_symbol_rows, task_spans
from vmscope.symbols import SymbolEntry, SymbolTable

KERNEL = 0xFFFF_FFFF_8100_0000
IDLE = TaskInfo("swapper/0", 0, 0)
WORKER = TaskInfo("kworker/0:1", 17, 17)
SHELL = TaskInfo("sh", 120, 118)


def sample(
    time_ns: int, ip: int, task: TaskInfo | None, vcpu: int = 0, unwinder: str | None = "orc"
) -> Sample:
    return Sample(vcpu, time_ns, ip, 0, 0x1000, (ip, KERNEL + 0x500), task=task, unwinder=unwinder)


def tasks_profile() -> Profile:
    profile = Profile()
    names = ("default_idle", "worker", "do_sys", "", "", "start_kernel")
    entries = [SymbolEntry(name, KERNEL + 0x100 * i, 0x100) for i, name in enumerate(names) if name]
    profile.symbol_tables.append(SymbolTable("kernel", entries))
    profile.samples = [
        sample(10, KERNEL + 0x10, IDLE),
        sample(20, KERNEL + 0x10, IDLE),
        sample(30, KERNEL + 0x110, WORKER),
        sample(40, KERNEL + 0x210, SHELL, unwinder="orc+fp"),
        sample(50, KERNEL + 0x10, IDLE),
        sample(60, KERNEL + 0x10, None, unwinder=None),
        sample(15, KERNEL + 0x210, SHELL, vcpu=1),
    ]
    return profile


def test_tasks_and_unwinders_survive_the_profile_file() -> None:
    profile = tasks_profile()
    loaded = profile_file.decode(profile_file.encode(profile))
    assert [(s.task, s.unwinder) for s in loaded.samples] == [(s.task, s.unwinder) for s in profile.samples]
    document = profile.to_dict()
    assert len(document["samples"]["tasks"]) == 3  # interned


def test_profiles_without_task_columns_still_load() -> None:
    document = tasks_profile().to_dict()
    for key in ("task", "unwinder", "tasks", "unwinders"):
        del document["samples"][key]
    loaded = Profile.from_dict(document)
    assert len(loaded.samples) == 7
    assert all(s.task is None and s.unwinder is None for s in loaded.samples)


def test_comm_sym_groups_by_process_then_function() -> None:
    profile = tasks_profile()
    rows = comm_symbol_rows(profile.samples, profile.symbolizer().function_name)
    assert [(r.comm, r.symbol, r.samples) for r in rows] == [
        ("swapper/0", "default_idle", 3),
        ("sh", "do_sys", 2),
        (UNKNOWN_TASK, "default_idle", 1),
        ("kworker/0:1", "worker", 1),
    ]
    assert abs(sum(r.pct for r in rows) - 100.0) < 1e-9
    text = report_text(profile, ReportOptions(sort="comm,sym"))
    assert "Functions by process" in text and "kworker/0:1" in text
    assert "Functions by process" not in report_text(profile)


def test_flame_graphs_start_at_the_process() -> None:
    profile = tasks_profile()
    folded = export_profile(profile, "folded").decode()
    lines = dict(line.rsplit(" ", 1) for line in folded.splitlines())
    assert lines["swapper/0 (0);start_kernel;default_idle"] == "3"
    assert lines["start_kernel;default_idle"] == "1"  # task unknown: no process frame
    assert lines["sh (120);start_kernel;do_sys"] == "2"
    speedscope = json.loads(export_profile(profile, "speedscope"))
    names = [frame["name"] for frame in speedscope["shared"]["frames"]]
    first_stack = speedscope["profiles"][0]["samples"][0]
    assert names[first_stack[0]] == "swapper/0 (0)"


def test_timeline_shows_which_task_ran_on_each_vcpu() -> None:
    profile = tasks_profile()
    spans = task_spans(profile)
    assert [(s.track, s.name, s.start_ns, s.end_ns) for s in spans] == [
        ("task:vcpu0", "task:swapper/0 (0)", 10, 30),
        ("task:vcpu0", "task:kworker/0:1 (17)", 30, 40),
        ("task:vcpu0", "task:sh (120)", 40, 50),
        ("task:vcpu0", "task:swapper/0 (0)", 50, 50),
        ("task:vcpu1", "task:sh (120)", 15, 15),
    ]
    trace = json.loads(export_profile(profile, "chrome-trace"))
    threads = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert [threads[tid] for tid in sorted(threads)] == ["vcpu0", "task:vcpu0", "vcpu1", "task:vcpu1"]
    task_events = [e for e in trace["traceEvents"] if e.get("cat") == "task"]
    assert len(task_events) == 5 and task_events[1]["args"]["pid"] == 17
