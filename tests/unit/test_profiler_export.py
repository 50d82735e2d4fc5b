"""Exporters: folded stacks, speedscope JSON, pprof protobuf, Chrome trace events."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from typing import Any

import pytest

from tests.unit.rigs.profiles import SPANS, TIMER_SAMPLES, build_profile
from vmscope.errors import ConfigError
from vmscope.profiler.export import EXPORT_FORMATS, export_profile
from vmscope.profiler.export.chrome_trace import chrome_trace_document
from vmscope.profiler.export.folded import folded_lines
from vmscope.profiler.export.pprof import SAMPLE_TYPES, export_pprof, parse_pprof, profile_file_descriptor
from vmscope.profiler.export.speedscope import SCHEMA_URL, speedscope_document
from vmscope.profiler.model import Sample
from vmscope.symbols import SymbolEntry

# root-first function names of the synthetic TIMER_SAMPLES, written out by hand
TIMER_FOLDED = {
    "main;compute": 6,
    "main;serial_putc": 2,
    "main;0x5000": 1,
    "guest.elf+0xf00": 1,
    "idle": 3,
    "do_syscall_64": 1,
}
TIMER_VCPU = {"main;compute": 0, "main;serial_putc": 0, "main;0x5000": 0, "guest.elf+0xf00": 0}


def test_folded_exact_lines() -> None:
    lines = folded_lines(build_profile())
    assert lines == sorted(f"{stack} {count}" for stack, count in TIMER_FOLDED.items())


def test_folded_prefixes() -> None:
    by_vcpu = folded_lines(build_profile(), prefix="vcpu")
    expected = sorted(
        f"vcpu{TIMER_VCPU.get(stack, 1)};{stack} {count}" for stack, count in TIMER_FOLDED.items()
    )
    assert by_vcpu == expected
    # every synthetic sample runs at CPL 0, so all stacks are kernel stacks
    assert folded_lines(build_profile(), prefix="cpl") == sorted(
        f"kernel;{stack} {count}" for stack, count in TIMER_FOLDED.items()
    )
    profile = build_profile()
    profile.samples.append(Sample(0, 1, 0x40_1000, 3, 0x2000, (0x40_1000,)))
    assert "user;0x401000 1" in folded_lines(profile, prefix="cpl")
    with pytest.raises(ConfigError, match="prefix"):
        folded_lines(profile, prefix="pid")


def test_folded_exit_samples_end_in_the_exit() -> None:
    assert folded_lines(build_profile(), origin="exit") == [
        "idle;[exit HLT] 2",
        "main;compute;[exit IO port 0x3f8 out] 1",
        "main;serial_putc;[exit IO port 0x3f8 out] 4",
    ]


def test_folded_frame_names_cannot_break_the_format() -> None:
    profile = build_profile()
    profile.symbol_tables[0].symbols.append(SymbolEntry("odd;name\nhere", 0x1800, 0x10))
    profile.samples.append(Sample(0, 1, 0x1804, 0, 0, (0x1804,)))
    assert "odd:name here 1" in folded_lines(profile)


# --- speedscope ----------------------------------------------------------------------------------

# Written from the types in speedscope's file-format spec (File, Frame, SampledProfile, EventedProfile).
SPEEDSCOPE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["$schema", "shared", "profiles"],
    "properties": {
        "$schema": {"const": SCHEMA_URL},
        "shared": {
            "type": "object",
            "required": ["frames"],
            "properties": {
                "frames": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string"},
                            "file": {"type": "string"},
                            "line": {"type": "number"},
                            "col": {"type": "number"},
                        },
                    },
                }
            },
        },
        "profiles": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "name", "unit", "startValue", "endValue", "samples", "weights"],
                "properties": {
                    "type": {"const": "sampled"},
                    "name": {"type": "string"},
                    "unit": {
                        "enum": ["none", "nanoseconds", "microseconds", "milliseconds", "seconds", "bytes"]
                    },
                    "startValue": {"type": "number"},
                    "endValue": {"type": "number"},
                    "samples": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
                    "weights": {"type": "array", "items": {"type": "number"}},
                },
            },
        },
        "name": {"type": "string"},
        "activeProfileIndex": {"type": "number"},
        "exporter": {"type": "string"},
    },
}


def check_speedscope_structure(document: dict[str, Any]) -> None:
    """The spec's invariants a JSON schema cannot express: indices in range, lengths, ordering."""
    frames = document["shared"]["frames"]
    assert len({frame["name"] for frame in frames}) == len(frames)
    for profile in document["profiles"]:
        assert len(profile["samples"]) == len(profile["weights"])
        assert profile["endValue"] >= profile["startValue"]
        for stack in profile["samples"]:
            assert stack and all(0 <= index < len(frames) for index in stack)
    assert 0 <= document["activeProfileIndex"] < len(document["profiles"])


def test_speedscope_validates_against_the_spec_types() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    document = json.loads(export_profile(build_profile(), "speedscope"))
    jsonschema.validate(document, SPEEDSCOPE_SCHEMA)
    broken = json.loads(json.dumps(document))
    broken["profiles"][0]["unit"] = "furlongs"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SPEEDSCOPE_SCHEMA)


def test_speedscope_one_sampled_profile_per_vcpu_with_shared_frames() -> None:
    document = speedscope_document(build_profile())
    check_speedscope_structure(document)
    assert [p["name"] for p in document["profiles"]] == ["vcpu0", "vcpu1"]
    frames = [frame["name"] for frame in document["shared"]["frames"]]
    stacks: Counter[tuple[str, int]] = Counter()
    for vcpu, profile in enumerate(document["profiles"]):
        assert profile["type"] == "sampled" and profile["unit"] == "nanoseconds"
        assert set(profile["weights"]) == {1e9 / 1000.0}  # one 1000 Hz period per sample
        for stack in profile["samples"]:
            stacks[(";".join(frames[index] for index in stack), vcpu)] += 1
    expected = {(stack, TIMER_VCPU.get(stack, 1)): count for stack, count in TIMER_FOLDED.items()}
    assert dict(stacks) == expected
    main = document["shared"]["frames"][frames.index("main")]
    assert main["file"] == "guest.elf"


def test_speedscope_samples_stay_in_time_order() -> None:
    profile = build_profile()
    profile.samples.reverse()
    document = speedscope_document(profile)
    frames = [frame["name"] for frame in document["shared"]["frames"]]
    leaves = [frames[stack[-1]] for stack in document["profiles"][1]["samples"]]
    assert leaves == ["idle", "idle", "idle", "do_syscall_64"]  # the order TIMER_SAMPLES lists them


# --- pprof ---------------------------------------------------------------------------------------


def test_pprof_descriptor_uses_official_field_numbers() -> None:
    messages = {m.name: {f.name: f.number for f in m.field} for m in profile_file_descriptor().message_type}
    assert messages["Profile"]["string_table"] == 6 and messages["Profile"]["default_sample_type"] == 14
    assert messages["Sample"] == {"location_id": 1, "value": 2, "label": 3}
    assert messages["Location"]["line"] == 4 and messages["Function"]["system_name"] == 3


def test_pprof_parses_back_with_expected_counts() -> None:
    profile = build_profile()
    data = export_pprof(profile)
    assert data[:2] == b"\x1f\x8b"
    message = parse_pprof(data)
    strings = list(message.string_table)
    assert strings[0] == ""
    assert len(set(strings)) == len(strings)
    assert [(strings[t.type], strings[t.unit]) for t in message.sample_type] == list(SAMPLE_TYPES)
    assert strings[message.default_sample_type] == "samples"
    assert message.period == 1_000_000 and message.duration_nanos == 60_000

    addresses = {address for sample in profile.samples for address in sample.frames}
    assert len(message.location) == len(addresses)
    assert {location.address for location in message.location} == addresses
    names = {strings[function.name] for function in message.function}
    assert names == {"main", "compute", "serial_putc", "idle", "do_syscall_64", "0x5000", "guest.elf+0xf00"}
    assert len(message.function) == len(names)
    unique = {(s.frames, s.vcpu, s.origin, s.exit_key) for s in profile.samples}
    assert len(message.sample) == len(unique)

    totals = [sum(sample.value[index] for sample in message.sample) for index in range(3)]
    timer_count = sum(repeat for *_, repeat in TIMER_SAMPLES)
    # exit samples carry all recorded exits/time of the exit kinds they sampled (IO 0x3f8 and HLT)
    assert totals == [timer_count, 100 + 10, 100 * 2_000 + 10 * 50_000]

    functions = {function.id: strings[function.name] for function in message.function}
    locations = {location.id: location for location in message.location}
    mappings = {mapping.id: strings[mapping.filename] for mapping in message.mapping}
    assert mappings == {1: "/images/guest.elf"}
    exit_stacks: Counter[tuple[str, str]] = Counter()
    for sample in message.sample:
        labels = {
            strings[label.key]: (strings[label.str] if label.str else label.num) for label in sample.label
        }
        leaf = locations[sample.location_id[0]]
        if labels["origin"] == "exit":
            exit_stacks[(labels["exit"], functions[leaf.line[0].function_id])] += sample.value[1]
        if functions[leaf.line[0].function_id] == "compute" and labels["origin"] == "timer":
            assert labels["vcpu"] == 0 and sample.value[0] == 6
            assert leaf.mapping_id == 1
    # IO 0x3f8: 100 exits over 5 samples (4 serial_putc, 1 compute); HLT: 10 exits over 2 idle samples
    assert exit_stacks == {
        ("IO port 0x3f8 out", "serial_putc"): 80,
        ("IO port 0x3f8 out", "compute"): 20,
        ("HLT", "idle"): 10,
    }


def test_pprof_raw_bytes_parse_too() -> None:
    message = parse_pprof(gzip.decompress(export_pprof(build_profile())))
    assert len(message.sample) > 0


# --- chrome trace --------------------------------------------------------------------------------


def test_chrome_trace_tracks_and_spans() -> None:
    document = json.loads(export_profile(build_profile(), "chrome-trace"))
    events = document["traceEvents"]
    thread_names = {
        e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"
    }
    assert sorted(thread_names.values()) == ["io:virtio-blk0", "vcpu0", "vcpu1"]
    # vCPU threads first
    assert [thread_names[tid] for tid in sorted(thread_names)] == ["vcpu0", "vcpu1", "io:virtio-blk0"]
    assert len({e["pid"] for e in events}) == 1
    complete = [e for e in events if e["ph"] == "X"]
    per_track = Counter(thread_names[e["tid"]] for e in complete)
    assert per_track == Counter(track for track, *_ in SPANS)
    exit_span = next(e for e in complete if e["name"] == "exit:HLT")
    assert (exit_span["ts"], exit_span["dur"], exit_span["cat"]) == (5.0, 50.0, "exit")  # microseconds
    request = next(e for e in complete if e["name"] == "io:request")
    assert request["args"] == {"note": "x"}


def test_chrome_trace_has_a_track_for_every_vcpu_even_without_spans() -> None:
    profile = build_profile()
    profile.spans = []
    profile.metadata.cpus = 3
    names = [
        e["args"]["name"] for e in chrome_trace_document(profile)["traceEvents"] if e["name"] == "thread_name"
    ]
    assert names == ["vcpu0", "vcpu1", "vcpu2"]


def test_export_profile_rejects_unknown_formats() -> None:
    assert set(EXPORT_FORMATS) == {"folded", "speedscope", "pprof", "chrome-trace", "html"}
    with pytest.raises(ConfigError, match="export format"):
        export_profile(build_profile(), "svg")
