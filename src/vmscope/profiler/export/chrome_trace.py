"""Chrome trace-event JSON (chrome://tracing, ui.perfetto.dev): the profile's timeline spans.

One process ("vmscope: <guest>") with one thread track per span track: vCPU threads first
("vcpu0", "vcpu1", ...), then I/O threads and others by name. Spans become "X" complete events;
timestamps are microseconds since the start of the run (fractions keep ns precision).
Host perf counters become counter tracks ("C" events) named "<thread> <event>": task-clock as the
thread's busy percentage per interval, other counters as the count per interval; so do the
instructions vmscope's fallback emulator completed ("vcpu0 emulated instructions").
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from vmscope.profiler.model import Profile
from vmscope.profiler.tasks_view import TASK_TRACK_PREFIX, task_spans

PROCESS_ID = 1
_VCPU_TRACK = re.compile(r"vcpu(\d+)$")


def _track_order(track: str) -> tuple[int, int, str]:
    # each vCPU's task track ("task:vcpu0") sits right below the vCPU's own
    task = track.startswith(TASK_TRACK_PREFIX)
    match = _VCPU_TRACK.match(track.removeprefix(TASK_TRACK_PREFIX))
    if match:
        return (0, 2 * int(match.group(1)) + task, track)
    return (1, 0, track)


def span_category(name: str) -> str:
    """The part before ':' ("exit:IO port 0x3f8" -> "exit"), or the whole name."""
    return name.split(":", 1)[0]


def chrome_trace_document(profile: Profile) -> dict[str, Any]:
    all_spans = [*profile.spans, *task_spans(profile)]  # which guest task ran when, from the samples
    tracks = sorted({span.track for span in all_spans}, key=_track_order)
    for vcpu in profile.vcpus:
        if f"vcpu{vcpu}" not in tracks:
            tracks.append(f"vcpu{vcpu}")
    tracks.sort(key=_track_order)
    thread_ids = {track: index + 1 for index, track in enumerate(tracks)}
    image = os.path.basename(profile.metadata.guest_image) or "guest"
    events: list[dict[str, Any]] = [
        {
            "ph": "M",
            "name": "process_name",
            "pid": PROCESS_ID,
            "tid": 0,
            "args": {"name": f"vmscope: {image}"},
        }
    ]
    for track, thread_id in thread_ids.items():
        events.append(
            {"ph": "M", "name": "thread_name", "pid": PROCESS_ID, "tid": thread_id, "args": {"name": track}}
        )
        events.append(
            {
                "ph": "M",
                "name": "thread_sort_index",
                "pid": PROCESS_ID,
                "tid": thread_id,
                "args": {"sort_index": thread_id},
            }
        )
    spans = sorted(all_spans, key=lambda s: (thread_ids[s.track], s.start_ns, -s.end_ns))
    for span in spans:
        event: dict[str, Any] = {
            "ph": "X",
            "name": span.name,
            "cat": span_category(span.name),
            "pid": PROCESS_ID,
            "tid": thread_ids[span.track],
            "ts": span.start_ns / 1000,
            "dur": span.duration_ns / 1000,
        }
        if span.args:
            event["args"] = dict(span.args)
        events.append(event)
    events.extend(counter_events(profile))
    meta = profile.metadata
    return {
        "traceEvents": events,
        "displayTimeUnit": "ns",
        "otherData": {
            "vmscope_version": meta.vmscope_version,
            "guest_image": meta.guest_image,
            "kvm_backend": meta.kvm_backend,
            "start_time_ns": str(meta.start_time_ns),
        },
    }


def counter_events(profile: Profile) -> list[dict[str, Any]]:
    """One "C" event per counter series point: the change since the previous point."""
    events: list[dict[str, Any]] = []
    for series in [*profile.counter_series, *profile.emulated_series]:
        name = f"{series.thread} {series.event}"
        previous_time, previous_value = 0, 0
        for time_ns, value in zip(series.times_ns, series.values, strict=True):
            delta = value - previous_value
            if series.event == "task-clock":
                interval = time_ns - previous_time
                busy = round(100.0 * delta / interval, 2) if interval > 0 else 0.0
                shown: dict[str, float] = {"busy%": busy}
            else:
                shown = {"per interval": float(delta)}
            events.append({"ph": "C", "name": name, "pid": PROCESS_ID, "ts": time_ns / 1000, "args": shown})
            previous_time, previous_value = time_ns, value
    return events


def export_chrome_trace(profile: Profile) -> str:
    return json.dumps(chrome_trace_document(profile), separators=(",", ":")) + "\n"
