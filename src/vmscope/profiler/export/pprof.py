"""pprof export: gzipped ``perftools.profiles.Profile`` protobuf (github.com/google/pprof, profile.proto).

The message classes are built at runtime from a descriptor defined here (same package, message and
field numbers as the official profile.proto), so no protoc step or generated code is needed.

Sample values: ``samples/count`` (timer samples), ``exits/count`` and ``exit_time/nanoseconds``
(each exit sample's estimated share of its exit kind's recorded count and handling time). Labels:
``vcpu`` (num), ``origin`` and, for exit samples, ``exit``.
"""

from __future__ import annotations

import gzip
from functools import cache
from typing import Any

# protobuf ships no type information; CI may or may not have types-protobuf installed
from google.protobuf import (  # type: ignore[import-untyped, unused-ignore]
    descriptor_pb2,
    descriptor_pool,
    message_factory,
)

from vmscope.profiler.analysis import FrameNamer, exit_sample_weights
from vmscope.profiler.model import ORIGIN_EXIT, Profile, exit_label

PROTO_PACKAGE = "perftools.profiles"
SAMPLE_TYPES = (("samples", "count"), ("exits", "count"), ("exit_time", "nanoseconds"))

_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
_TYPES = {
    "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
    "uint64": descriptor_pb2.FieldDescriptorProto.TYPE_UINT64,
    "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
    "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
}

# message -> (field name, number, type or message name, repeated); numbers as in profile.proto
_MESSAGES: dict[str, list[tuple[str, int, str, bool]]] = {
    "Profile": [
        ("sample_type", 1, "ValueType", True),
        ("sample", 2, "Sample", True),
        ("mapping", 3, "Mapping", True),
        ("location", 4, "Location", True),
        ("function", 5, "Function", True),
        ("string_table", 6, "string", True),
        ("drop_frames", 7, "int64", False),
        ("keep_frames", 8, "int64", False),
        ("time_nanos", 9, "int64", False),
        ("duration_nanos", 10, "int64", False),
        ("period_type", 11, "ValueType", False),
        ("period", 12, "int64", False),
        ("comment", 13, "int64", True),
        ("default_sample_type", 14, "int64", False),
    ],
    "ValueType": [("type", 1, "int64", False), ("unit", 2, "int64", False)],
    "Sample": [
        ("location_id", 1, "uint64", True),
        ("value", 2, "int64", True),
        ("label", 3, "Label", True),
    ],
    "Label": [
        ("key", 1, "int64", False),
        ("str", 2, "int64", False),
        ("num", 3, "int64", False),
        ("num_unit", 4, "int64", False),
    ],
    "Mapping": [
        ("id", 1, "uint64", False),
        ("memory_start", 2, "uint64", False),
        ("memory_limit", 3, "uint64", False),
        ("file_offset", 4, "uint64", False),
        ("filename", 5, "int64", False),
        ("build_id", 6, "int64", False),
        ("has_functions", 7, "bool", False),
        ("has_filenames", 8, "bool", False),
        ("has_line_numbers", 9, "bool", False),
        ("has_inline_frames", 10, "bool", False),
    ],
    "Location": [
        ("id", 1, "uint64", False),
        ("mapping_id", 2, "uint64", False),
        ("address", 3, "uint64", False),
        ("line", 4, "Line", True),
        ("is_folded", 5, "bool", False),
    ],
    "Line": [("function_id", 1, "uint64", False), ("line", 2, "int64", False), ("column", 3, "int64", False)],
    "Function": [
        ("id", 1, "uint64", False),
        ("name", 2, "int64", False),
        ("system_name", 3, "int64", False),
        ("filename", 4, "int64", False),
        ("start_line", 5, "int64", False),
    ],
}


def profile_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """profile.proto as a FileDescriptorProto (proto3, package perftools.profiles)."""
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="vmscope/perftools_profile.proto", package=PROTO_PACKAGE, syntax="proto3"
    )
    for message_name, fields in _MESSAGES.items():
        message = file_proto.message_type.add(name=message_name)
        for field_name, number, kind, repeated in fields:
            field = message.field.add(
                name=field_name, number=number, label=_REPEATED if repeated else _OPTIONAL
            )
            if kind in _TYPES:
                field.type = _TYPES[kind]
            else:
                field.type = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
                field.type_name = f".{PROTO_PACKAGE}.{kind}"
    return file_proto


@cache
def message_classes() -> dict[str, Any]:
    """Message name -> generated class, in a private descriptor pool (no clash with other users)."""
    pool = descriptor_pool.DescriptorPool()
    pool.Add(profile_file_descriptor())
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PROTO_PACKAGE}.{name}"))
        for name in _MESSAGES
    }


class _Strings:
    def __init__(self) -> None:
        self.table: list[str] = [""]
        self._index: dict[str, int] = {"": 0}

    def __call__(self, text: str) -> int:
        index = self._index.get(text)
        if index is None:
            index = self._index[text] = len(self.table)
            self.table.append(text)
        return index


def pprof_message(profile: Profile) -> Any:
    """The Profile message (all samples of all vCPUs and origins)."""
    classes = message_classes()
    message = classes["Profile"]()
    strings = _Strings()
    for kind, unit in SAMPLE_TYPES:
        message.sample_type.add(type=strings(kind), unit=strings(unit))
    meta = profile.metadata
    message.time_nanos = meta.start_time_ns
    message.duration_nanos = meta.duration_ns
    if meta.sample_frequency_hz > 0:
        message.period_type.type = strings("wall")
        message.period_type.unit = strings("nanoseconds")
        message.period = round(1e9 / meta.sample_frequency_hz)
    message.default_sample_type = strings("samples")
    message.comment.append(strings(f"vmscope {meta.vmscope_version}: {meta.guest_image or 'guest'}"))

    symbolizer = profile.symbolizer()
    namer = FrameNamer(symbolizer)
    mapping_ids: dict[str, int] = {}
    for table in profile.symbol_tables:
        if table.end > table.start and table.module not in mapping_ids:
            mapping_ids[table.module] = len(mapping_ids) + 1
            message.mapping.add(
                id=mapping_ids[table.module],
                memory_start=table.start,
                memory_limit=table.end,
                filename=strings(table.path or table.module),
                has_functions=True,
            )

    function_ids: dict[str, int] = {}
    location_ids: dict[int, int] = {}

    def location_of(address: int) -> int:
        location_id = location_ids.get(address)
        if location_id is not None:
            return location_id
        name = namer.name(address)
        function_id = function_ids.get(name)
        if function_id is None:
            function_id = function_ids[name] = len(function_ids) + 1
            module = namer.module(address)
            message.function.add(
                id=function_id, name=strings(name), system_name=strings(name), filename=strings(module)
            )
        location_id = location_ids[address] = len(location_ids) + 1
        located = symbolizer.module_of(address)
        mapping_id = mapping_ids.get(located[0], 0) if located else 0
        location = message.location.add(id=location_id, mapping_id=mapping_id, address=address)
        location.line.add(function_id=function_id)
        return location_id

    exit_weights = exit_sample_weights(profile, profile.samples)
    aggregated: dict[tuple[Any, ...], list[float]] = {}
    for sample in profile.samples:
        exit_name = exit_label(*sample.exit_key) if sample.exit_key is not None else ""
        key = (sample.frames, sample.vcpu, sample.origin, exit_name)
        values = aggregated.setdefault(key, [0.0, 0.0, 0.0])
        if sample.origin == ORIGIN_EXIT:
            exits, handling = exit_weights.get(id(sample), (1.0, 0.0))
            values[1] += exits
            values[2] += handling
        else:
            values[0] += 1
    vcpu_key, origin_key, exit_key = strings("vcpu"), strings("origin"), strings("exit")
    for (frames, vcpu, origin, exit_name), values in aggregated.items():
        sample_message = message.sample.add()
        sample_message.location_id.extend(location_of(address) for address in frames)
        sample_message.value.extend(round(value) for value in values)
        sample_message.label.add(key=vcpu_key, num=vcpu)
        sample_message.label.add(key=origin_key, str=strings(origin))
        if exit_name:
            sample_message.label.add(key=exit_key, str=strings(exit_name))
    message.string_table.extend(strings.table)
    return message


def export_pprof(profile: Profile) -> bytes:
    """Gzipped serialized profile, as ``go tool pprof`` reads it."""
    return gzip.compress(pprof_message(profile).SerializeToString(), mtime=0)


def parse_pprof(data: bytes) -> Any:
    """Parse (gzipped or raw) pprof bytes back into a Profile message."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    message = message_classes()["Profile"]()
    message.ParseFromString(data)
    return message
