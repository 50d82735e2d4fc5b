"""GDB remote protocol pieces without KVM: framing, escaping, parsing, registers, debug registers."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from vmscope.errors import ConfigError
from vmscope.gdbstub import protocol as p
from vmscope.gdbstub import registers as r
from vmscope.gdbstub.stub import DebugRegisters, is_loopback, parse_gdb_spec
from vmscope.kvm import structs as s

# -- framing -------------------------------------------------------------------------------------


def test_checksum_is_the_byte_sum_modulo_256() -> None:
    assert p.checksum(b"OK") == 0x9A
    assert p.checksum(b"") == 0
    assert p.checksum(b"\xff\x02") == 0x01


def test_frame_packet_matches_what_gdb_sends() -> None:
    # the exact bytes gdb 13 sends for these packets
    assert p.frame_packet(b"g") == b"$g#67"
    assert p.frame_packet(b"vCont;c") == b"$vCont;c#a8"
    assert p.frame_packet(b"qfThreadInfo") == b"$qfThreadInfo#bb"


def test_escape_binary_escapes_the_four_special_bytes_and_round_trips_every_byte() -> None:
    assert p.escape_binary(b"a#b$c}d*e") == b"a}\x03b}\x04c}]d}\x0ae"
    every = bytes(range(256)) * 2
    escaped = p.escape_binary(every)
    assert not any(byte in escaped for byte in b"#$*")
    assert p.unescape_binary(escaped) == every


def test_unescape_rejects_a_trailing_escape() -> None:
    with pytest.raises(p.ProtocolError):
        p.unescape_binary(b"abc}")


def test_hex_helpers_validate_their_input() -> None:
    assert p.parse_hex_int(b"10002a") == 0x10002A
    assert p.parse_address_length(b"ffffffff80000000,40") == (0xFFFFFFFF80000000, 0x40)
    assert p.decode_hex(b"0aff") == b"\x0a\xff"
    assert p.parse_thread_id(b"-1") == -1
    assert p.parse_thread_id(b"p1.2") == 2
    for bad in (b"", b"0x10", b"-5", b"zz", b"1" * 40):
        with pytest.raises(p.ProtocolError):
            p.parse_hex_int(bad)
    with pytest.raises(p.ProtocolError):
        p.parse_hex_int(b"1" + b"0" * 16)  # 2**64 does not fit an address
    with pytest.raises(p.ProtocolError):
        p.decode_hex(b"abc")
    with pytest.raises(p.ProtocolError):
        p.parse_address_length(b"1000")


def test_replies_are_formatted_as_gdb_expects() -> None:
    assert p.stop_reply(5, 1, "hwbreak:;") == b"T05thread:01;hwbreak:;"
    assert p.stop_reply(2) == b"T02"
    assert p.exit_reply(59) == b"W3b"
    assert p.exit_reply(0x1FF) == b"Wff"
    assert p.killed_reply(11) == b"X0b"


def test_qxfer_reply_chunks_and_escapes() -> None:
    document = b"abc*def"
    assert p.qxfer_reply(document, 0, 4) == b"mabc}\x0a"
    assert p.qxfer_reply(document, 4, 100) == b"ldef"
    assert p.qxfer_reply(document, 50, 10) == b"l"


# -- the parser ------------------------------------------------------------------------------------


def _kinds(events: list[p.ParserEvent]) -> list[tuple[p.EventKind, bytes]]:
    return [(event.kind, event.payload) for event in events]


def test_parser_handles_packets_split_across_reads_and_acks_between_them() -> None:
    parser = p.PacketParser()
    stream = b"+$qSupported:multiprocess+#c6+$g#67-\x03"
    events = []
    for index in range(len(stream)):
        events += parser.feed(stream[index : index + 1])
    assert _kinds(events) == [
        (p.EventKind.ACK, b""),
        (p.EventKind.PACKET, b"qSupported:multiprocess+"),
        (p.EventKind.ACK, b""),
        (p.EventKind.PACKET, b"g"),
        (p.EventKind.NACK, b""),
        (p.EventKind.INTERRUPT, b""),
    ]


def test_parser_flags_a_bad_checksum_and_skips_noise() -> None:
    parser = p.PacketParser()
    events = parser.feed(b"\n junk $m0,4#00$m0,4#fd")
    assert _kinds(events) == [(p.EventKind.BAD_PACKET, b"m0,4"), (p.EventKind.PACKET, b"m0,4")]


def test_parser_keeps_escaped_binary_payloads_intact() -> None:
    payload = b"X100,4:" + p.escape_binary(b"#$}*")
    events = p.PacketParser().feed(p.frame_packet(payload))
    assert _kinds(events) == [(p.EventKind.PACKET, payload)]
    assert p.unescape_binary(events[0].payload.split(b":", 1)[1]) == b"#$}*"


def test_parser_drops_an_oversized_packet_and_recovers() -> None:
    parser = p.PacketParser(limit=64)
    events = parser.feed(b"$" + b"a" * 500)
    events += parser.feed(b"#00$OK#9a")
    assert _kinds(events) == [(p.EventKind.BAD_PACKET, b""), (p.EventKind.PACKET, b"OK")]


# -- registers -------------------------------------------------------------------------------------


def _sample_state() -> tuple[s.kvm_regs, s.kvm_sregs, s.kvm_fpu]:
    regs = s.kvm_regs()
    for number, name in enumerate(r.GPR_NAMES):
        setattr(regs, name, 0x1111_0000_0000_0000 * (number % 15 + 1) + number)
    regs.rip = 0xFFFF_FFFF_8100_0010
    regs.rflags = 0x246
    sregs = s.kvm_sregs()
    for number, name in enumerate(r.SEGMENT_NAMES):
        getattr(sregs, name).selector = 0x08 * (number + 1)
    sregs.fs.base = 0x7F00_1234_5000
    sregs.gs.base = 0xFFFF_8880_0000_0000
    sregs.cr0, sregs.cr2, sregs.cr3 = 0x8005_0033, 0xDEAD_B000, 0x1000
    sregs.cr4, sregs.cr8, sregs.efer = 0x20, 3, 0x500
    fpu = s.kvm_fpu()
    fpu.fcw, fpu.mxcsr = 0x37F, 0x1F80
    fpu.fsw = 6 << 11  # TOP = 6: ST0 is physical register 6, ST1 is 7
    fpu.ftwx = (1 << 6) | (1 << 7)
    one = (0x3FFF << 64) | (1 << 63)  # 1.0 in extended precision
    for index, byte in enumerate(one.to_bytes(10, "little")):
        fpu.fpr[0][index] = byte  # ST0 = 1.0 (valid); ST1 stays 0.0 (zero)
    fpu.last_ip, fpu.last_dp, fpu.last_opcode = 0x1234_5678_9ABC, 0xFEDC_BA98_7654, 0x5D9
    for index in range(16):
        for offset in range(16):
            fpu.xmm[index][offset] = (index * 16 + offset) & 0xFF
    return regs, sregs, fpu


def test_register_table_follows_gdbs_amd64_numbering() -> None:
    names = [info.name for info in r.REGISTERS]
    assert names[:18] == [*r.GPR_NAMES, "rip", "eflags"]
    assert names[18:24] == ["cs", "ss", "ds", "es", "fs", "gs"]
    assert names[24:32] == [f"st{i}" for i in range(8)]
    assert names[32:40] == ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"]
    assert names[40:57] == [*(f"xmm{i}" for i in range(16)), "mxcsr"]
    assert names[57:59] == ["fs_base", "gs_base"]
    # gdb's 64bit-core + 64bit-sse sizes: 16 gprs, rip, eflags/4, 6 selectors/4, 8 st/10, 8 x87
    # control/4, 16 xmm/16, mxcsr/4
    core_and_sse = sum(info.size for info in r.REGISTERS[:57])
    assert core_and_sse == 16 * 8 + 8 + 4 + 6 * 4 + 8 * 10 + 8 * 4 + 16 * 16 + 4


def test_registers_from_kvm_maps_every_field() -> None:
    regs, sregs, fpu = _sample_state()
    values = r.registers_from_kvm(regs, sregs, fpu)
    assert values["rsp"] == regs.rsp and values["rbp"] == regs.rbp and values["r15"] == regs.r15
    assert values["rip"] == 0xFFFF_FFFF_8100_0010 and values["eflags"] == 0x246
    assert values["ss"] == 0x10 and values["gs"] == 0x30
    assert values["st0"] == (0x3FFF << 64) | (1 << 63)
    # physical 6 (ST0) valid, physical 7 (ST1) zero, all others empty
    assert values["ftag"] == 0x0FFF | (0b00 << 12) | (0b01 << 14)
    assert values["fiseg"] == 0x1234 and values["fioff"] == 0x5678_9ABC
    assert values["foseg"] == 0xFEDC and values["fooff"] == 0xBA98_7654 and values["fop"] == 0x5D9
    assert values["xmm1"] == int.from_bytes(bytes(range(16, 32)), "little")
    assert values["fs_base"] == 0x7F00_1234_5000 and values["cr3"] == 0x1000 and values["efer"] == 0x500


def test_tag_word_conversion_round_trips() -> None:
    stack = [0] * 8
    stack[0] = (0x7FFF << 64) | (1 << 63)  # infinity: special
    for abridged in (0, 0xFF, 0x81, 0x3C):
        for top in range(8):
            full = r.full_tag_word(abridged, top << 11, stack)
            assert r.abridged_tag(full) == abridged
    assert r.full_tag_word(0, 0, stack) == 0xFFFF
    assert r.full_tag_word(1, 0, stack) == 0xFFFC | 2  # physical 0 is ST0: special


def test_g_packet_round_trip_through_kvm_structures() -> None:
    regs, sregs, fpu = _sample_state()
    values = r.registers_from_kvm(regs, sregs, fpu)
    packet = r.encode_registers(values)
    assert len(packet) == 2 * r.G_PACKET_SIZE
    assert packet[:16] == regs.rax.to_bytes(8, "little").hex().encode()
    decoded = r.decode_registers(packet)
    assert decoded == values

    changed = dict(decoded)
    # TOP is 6, so ST3 is physical register 1: give it a valid number and tag it valid (00)
    ftag = decoded["ftag"] & ~(3 << 2)
    changed.update(rax=0x42, rip=0x100000, eflags=0x202, st3=0x4000_8000_0000_0000_0000, ftag=ftag)
    changed.update(xmm15=(1 << 127) | 5, mxcsr=0x1F80 | 1, fioff=0x1000, cr3=0x2000, gs_base=0x5000)
    regs2, sregs2, fpu2 = _sample_state()
    result = r.apply_registers(changed, regs2, sregs2, fpu2)
    assert (result.regs, result.sregs, result.fpu) == (True, True, True)
    assert r.registers_from_kvm(regs2, sregs2, fpu2) == changed
    assert fpu2.last_ip == 0x1234_0000_1000


def test_apply_registers_reports_only_what_changed() -> None:
    regs, sregs, fpu = _sample_state()
    unchanged = r.registers_from_kvm(regs, sregs, fpu)
    result = r.apply_registers(unchanged, regs, sregs, fpu)
    assert (result.regs, result.sregs, result.fpu) == (False, False, False)
    result = r.apply_registers({"r9": 7}, regs, sregs, fpu)
    assert (result.regs, result.sregs, result.fpu) == (True, False, False) and regs.r9 == 7


def test_segment_selectors_cannot_be_rewritten() -> None:
    regs, sregs, fpu = _sample_state()
    with pytest.raises(r.RegisterWriteError):
        r.apply_registers({"rax": 1, "cs": 0x33}, regs, sregs, fpu)
    assert regs.rax != 1  # nothing was applied


def test_single_register_encoding_and_size_checks() -> None:
    rip = r.REGISTER_NUMBERS["rip"]
    assert r.encode_register(rip, 0x10002A) == b"2a00100000000000"
    assert r.decode_register(rip, b"2a00100000000000") == 0x10002A
    with pytest.raises(p.ProtocolError):
        r.decode_register(rip, b"2a00")
    with pytest.raises(p.ProtocolError):
        r.decode_registers(b"00" * (r.G_PACKET_SIZE + 1))
    with pytest.raises(p.ProtocolError):
        r.decode_registers(b"00" * 12)  # ends inside rbx
    assert r.decode_registers(b"01" + b"00" * 15) == {"rax": 1, "rbx": 0}


def test_target_xml_describes_every_register_in_order() -> None:
    root = ET.fromstring(r.target_xml())
    assert root.findtext("architecture") == "i386:x86-64"
    features = [feature.get("name") for feature in root.findall("feature")]
    assert features[:3] == ["org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse", "org.gnu.gdb.i386.segments"]
    regs = [reg for feature in root.findall("feature") for reg in feature.findall("reg")]
    assert [reg.get("name") for reg in regs] == [info.name for info in r.REGISTERS]
    assert [int(reg.get("regnum", "-1")) for reg in regs] == list(range(len(r.REGISTERS)))
    assert {reg.get("type") for reg in regs} >= {"i386_eflags", "i387_ext", "vec128", "i386_mxcsr"}
    declared = {element.get("id") for element in root.iter() if element.tag in ("flags", "union", "vector")}
    assert {"i386_eflags", "vec128", "i386_mxcsr"} <= declared


# -- debug registers and address specs -------------------------------------------------------------


def test_debug_registers_encode_dr7_and_share_slots() -> None:
    debug = DebugRegisters()
    assert debug.insert("exec", 0x10002A, 1)
    assert debug.insert("exec", 0x10002A, 1)  # the same breakpoint twice uses one slot
    assert debug.insert("write", 0x100084, 4)
    assert debug.insert("access", 0x2000, 8)
    values = debug.debugregs()
    assert values[:3] == [0x10002A, 0x100084, 0x2000]
    # G0 exec/1; G1 write (RW=01) len 4 (LEN=11); G2 access (RW=11) len 8 (LEN=10); bit 10 always one
    assert values[7] == (1 << 10) | (1 << 1) | (1 << 3) | (1 << 5) | (0b1101 << 20) | (0b1011 << 24)
    assert debug.debugregs(disarm_exec_at=0x10002A)[7] & 0b11 == 0
    assert debug.insert("read", 0x3000, 2)
    assert not debug.insert("exec", 0x5000, 1)  # all four slots taken
    assert [hit.address for hit in debug.hits(0b0110 | (1 << 14))] == [0x100084, 0x2000]
    assert debug.remove("exec", 0x10002A, 1) and debug.exec_at(0x10002A)
    assert debug.remove("exec", 0x10002A, 1) and not debug.exec_at(0x10002A)
    assert not debug.remove("exec", 0x10002A, 1)
    assert debug.insert("exec", 0x5000, 1) and debug.debugregs()[0] == 0x5000


def test_debug_registers_reject_watchpoints_hardware_cannot_cover() -> None:
    debug = DebugRegisters()
    for length, address in ((3, 0x1000), (16, 0x1000), (4, 0x1002), (8, 0x1004)):
        with pytest.raises(p.ProtocolError):
            debug.insert("write", address, length)
    assert not debug.active


def test_parse_gdb_spec() -> None:
    assert parse_gdb_spec("tcp:127.0.0.1:1234") == ("127.0.0.1", 1234)
    assert parse_gdb_spec("tcp::4321") == ("127.0.0.1", 4321)
    assert parse_gdb_spec("tcp:[::1]:1234") == ("::1", 1234)
    assert parse_gdb_spec("tcp:localhost:0") == ("localhost", 0)
    for bad in ("1234", "tcp:1234", "udp:127.0.0.1:1", "tcp:127.0.0.1:70000", "tcp:127.0.0.1:x", "tcp:::1:5"):
        with pytest.raises(ConfigError, match="--gdb"):
            parse_gdb_spec(bad)


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.3.4.5") and is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")
