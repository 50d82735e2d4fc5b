"""BTF: every kind parsed back from blobs built by a test, member offsets through typedefs, anonymous
unions, arrays and bit fields, malformed input giving KernelTableError, and the Debian kernel's own."""

from __future__ import annotations

import random
import struct

import pytest

from tests.unit.btf_blob import BtfBuilder, kernel_types
from vmscope.errors import KernelTableError
from vmscope.profiler.kernel.btf import Btf, Kind, parse_btf


def every_kind() -> tuple[bytes, dict[str, int]]:
    b = BtfBuilder()
    ids: dict[str, int] = {}
    ids["int"] = b.int_type("int", 4, signed=True)
    ids["uchar"] = b.int_type("unsigned char", 1)
    ids["ptr"] = b.ptr(ids["int"])
    ids["array"] = b.array(ids["uchar"], ids["int"], 10)
    ids["fwd"] = b.add(Kind.FWD, "opaque", 0)
    ids["typedef"] = b.add(Kind.TYPEDEF, "u8", ids["uchar"])
    ids["volatile"] = b.add(Kind.VOLATILE, "", ids["typedef"])
    ids["const"] = b.add(Kind.CONST, "", ids["volatile"])
    ids["restrict"] = b.add(Kind.RESTRICT, "", ids["ptr"])
    ids["type_tag"] = b.add(Kind.TYPE_TAG, "user", ids["const"])
    ids["enum"] = b.enum("colour", [("RED", 0), ("BLUE", -2)], signed=True)
    ids["enum64"] = b.enum64("big", [("HUGE", 1 << 40), ("NEG", -1)], signed=True)
    ids["proto"] = b.add(
        Kind.FUNC_PROTO, "", ids["int"], 1, extra=struct.pack("<II", b.string("x"), ids["int"])
    )
    ids["func"] = b.add(Kind.FUNC, "do_thing", ids["proto"])
    ids["var"] = b.add(Kind.VAR, "counter", ids["int"], extra=struct.pack("<I", 1))
    ids["datasec"] = b.add(Kind.DATASEC, ".data", 4, 1, extra=struct.pack("<III", ids["var"], 0, 4))
    ids["float"] = b.add(Kind.FLOAT, "double", 8)
    inner = b.struct("", 4, [("lo", ids["uchar"], 0, 0), ("hi", ids["uchar"], 8, 0)])
    ids["union"] = b.struct("", 8, [("", inner, 0, 0), ("word", ids["int"], 0, 0)], union=True)
    ids["bits"] = b.struct(
        "flags", 4, [("a", ids["int"], 0, 3), ("b", ids["int"], 3, 5), ("c", ids["int"], 9, 1)]
    )
    ids["outer"] = b.struct(
        "outer",
        48,
        [
            ("head", ids["int"], 0, 0),
            ("", ids["union"], 64, 0),
            ("bytes", ids["array"], 128, 0),
            ("tagged", ids["type_tag"], 208, 0),
            ("flags", ids["bits"], 256, 0),
        ],
    )
    ids["decl_tag"] = b.add(Kind.DECL_TAG, "tag", ids["outer"], extra=struct.pack("<i", 1))
    return b.build(), ids


def test_every_kind_parses_back() -> None:
    blob, ids = every_kind()
    btf = parse_btf(blob)
    assert len(btf) == len(ids) + 1  # the anonymous inner struct has no entry in ids
    for name, kind in (
        ("int", Kind.INT), ("ptr", Kind.PTR), ("array", Kind.ARRAY), ("fwd", Kind.FWD),
        ("typedef", Kind.TYPEDEF), ("volatile", Kind.VOLATILE), ("const", Kind.CONST),
        ("restrict", Kind.RESTRICT), ("type_tag", Kind.TYPE_TAG), ("enum", Kind.ENUM),
        ("enum64", Kind.ENUM64), ("proto", Kind.FUNC_PROTO), ("func", Kind.FUNC), ("var", Kind.VAR),
        ("datasec", Kind.DATASEC), ("float", Kind.FLOAT), ("union", Kind.UNION), ("outer", Kind.STRUCT),
        ("decl_tag", Kind.DECL_TAG),
    ):  # fmt: skip
        assert btf.type(ids[name]).kind == kind, name
    assert btf.type(ids["func"]).name == "do_thing"
    assert btf.int_encoding(ids["int"]) == (True, 0, 32)
    assert btf.array(ids["array"]) == (ids["uchar"], 10)
    assert btf.enumerators(ids["enum"]) == {"RED": 0, "BLUE": -2}
    assert btf.enumerators(ids["enum64"]) == {"HUGE": 1 << 40, "NEG": -1}
    assert btf.enum_value("HUGE") == 1 << 40
    assert btf.enum_value("MISSING") is None
    assert btf.find("outer") == ids["outer"]
    assert btf.find("u8", Kind.TYPEDEF) == ids["typedef"]
    assert btf.find("u8") is None  # a typedef, not a struct


def test_modifiers_resolve_and_sizes() -> None:
    blob, ids = every_kind()
    btf = parse_btf(blob)
    assert btf.resolve(ids["type_tag"]) == ids["uchar"]
    assert btf.size_of(ids["type_tag"]) == 1
    assert btf.size_of(ids["array"]) == 10
    assert btf.size_of(ids["restrict"]) == 8
    assert btf.size_of(ids["outer"]) == 48
    with pytest.raises(KernelTableError, match="no size"):
        btf.size_of(ids["func"])


def test_member_paths_through_anonymous_unions_arrays_and_bitfields() -> None:
    btf = parse_btf(every_kind()[0])
    assert btf.field("outer", "head").offset == 0
    assert btf.field("outer", "hi").offset == 9  # inside the anonymous struct in the anonymous union
    assert btf.field("outer", "word").offset == 8
    assert btf.field("outer", "bytes[3]").offset == 16 + 3
    assert btf.field("outer", "tagged").offset == 26
    flags = btf.field("outer", "flags.b")
    assert (flags.offset, flags.bit_shift, flags.bitfield_size) == (32, 3, 5)
    assert btf.field("outer", "flags.c").offset == 33 and btf.field("outer", "flags.c").bit_shift == 1
    for path, problem in (
        ("nothing", "no member"),
        ("bytes[10]", "10 elements"),
        ("bytes[x]", "bad index"),
        ("head.deeper", "not a struct"),
    ):
        with pytest.raises(KernelTableError, match=problem):
            btf.field("outer", path)
    with pytest.raises(KernelTableError, match="no struct"):
        btf.field("inner", "x")


def test_kernel_like_layout() -> None:
    blob, expected = kernel_types(pcpu_hot=True)
    btf = parse_btf(blob)
    for name in ("comm", "pid", "tgid", "mm"):
        assert btf.field("task_struct", name).offset == expected[name]
    assert btf.size_of(btf.field("task_struct", "comm").type_id) == 16
    assert btf.field("module", "mem[0].size").offset == expected["module.text_size"]
    assert btf.field("module", "list.prev").offset == expected["module.list"] + 8
    assert btf.field("task_struct", "flags").offset == 8  # anonymous union member


def header(blob: bytes, **fields: int) -> bytes:
    names = ("magic", "version", "flags", "hdr_len", "type_off", "type_len", "str_off", "str_len")
    values = dict(zip(names, struct.unpack_from("<HBBIIIII", blob), strict=True))
    values.update(fields)
    return struct.pack("<HBBIIIII", *values.values()) + blob[24:]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda blob: blob[:10], "shorter than"),
        (lambda blob: header(blob, magic=0x9FEB), "bad magic"),
        (lambda blob: header(blob, version=2), "unsupported version"),
        (lambda blob: header(blob, hdr_len=10), "header length"),
        (lambda blob: header(blob, type_len=1 << 20), "type section"),
        (lambda blob: header(blob, str_len=1 << 20), "string section"),
        (
            lambda blob: header(blob, type_len=struct.unpack_from("<I", blob, 12)[0] - 2),
            "runs past|truncated",
        ),
        (lambda blob: blob[:28] + struct.pack("<I", 25 << 24) + blob[32:], "unknown kind 25"),
    ],
)
def test_malformed_headers_and_records(change: object, problem: str) -> None:
    blob = kernel_types()[0]
    assert callable(change)
    with pytest.raises(KernelTableError, match=problem):
        parse_btf(change(blob))


def test_bad_references_are_reported_when_used() -> None:
    b = BtfBuilder()
    loop_a = b.add(Kind.TYPEDEF, "a", 2)
    b.add(Kind.TYPEDEF, "b", loop_a)  # a -> b -> a
    b.struct("broken", 8, [("dangling", 99, 0, 0)])
    blob = b.build()
    btf = parse_btf(blob)
    with pytest.raises(KernelTableError, match="longer than"):
        btf.resolve(loop_a)
    with pytest.raises(KernelTableError, match="out of range"):
        btf.size_of(btf.field("broken", "dangling").type_id)
    bad_name = bytearray(blob)
    struct.pack_into("<I", bad_name, 24, 0xFFFF)  # first type's name offset past the strings
    with pytest.raises(KernelTableError, match="outside the string section"):
        parse_btf(bytes(bad_name)).type(1)


def test_random_corruption_never_escapes_as_another_exception() -> None:
    blob, _ = kernel_types(pcpu_hot=True)
    generator = random.Random(11)
    for trial in range(400):
        data = bytearray(blob)
        if trial % 2:
            data = data[: generator.randrange(len(data))]
        for _ in range(generator.randrange(1, 6)):
            if data:
                data[generator.randrange(len(data))] = generator.randrange(256)
        try:
            btf = parse_btf(bytes(data))
            for struct_name, path in (
                ("task_struct", "comm"),
                ("module", "mem[0].base"),
                ("pcpu_hot", "current_task"),
            ):
                location = btf.field(struct_name, path)
                btf.size_of(location.type_id)
            btf.enum_value("MOD_TEXT")
        except KernelTableError:
            pass


def debian_btf() -> Btf:
    from tests.kernel_fixture import cached_kernel, kernel_cache_dir, pvh_vmlinux
    from vmscope.profiler.kernel.image import load_kernel_image

    kernel = cached_kernel(kernel_cache_dir())
    if kernel is None:
        pytest.skip("no cached Debian kernel (tests/kernel_fixture.py downloads one)")
    vmlinux = pvh_vmlinux(kernel)
    if vmlinux.path is None:
        pytest.skip(f"cannot extract the vmlinux: {vmlinux.reason}")
    raw = load_kernel_image(vmlinux.path).section_bytes(".BTF")
    assert raw is not None, "Debian's kernel is built with CONFIG_DEBUG_INFO_BTF"
    return parse_btf(raw)


def test_debian_kernel_task_struct_and_module() -> None:
    btf = debian_btf()
    assert len(btf) > 50_000
    comm, pid, tgid, mm = (btf.field("task_struct", name) for name in ("comm", "pid", "tgid", "mm"))
    assert btf.size_of(comm.type_id) == 16  # TASK_COMM_LEN
    assert btf.size_of(pid.type_id) == 4 and tgid.offset == pid.offset + 4
    assert btf.type(btf.resolve(mm.type_id)).kind == Kind.PTR
    assert 0 < mm.offset < pid.offset < comm.offset < btf.size_of(btf.find("task_struct") or 0)
    # struct module (6.1): enum state, then list_head list, then char name[MODULE_NAME_LEN]
    assert btf.field("module", "list").offset == 8
    name = btf.field("module", "name")
    assert name.offset == 24 and btf.size_of(name.type_id) == 56
    assert btf.type(btf.resolve(btf.field("module", "core_layout.base").type_id)).kind == Kind.PTR
    assert btf.field("mod_kallsyms", "num_symtab").offset == 8
    assert btf.enum_value("MODULE_STATE_LIVE") == 0
