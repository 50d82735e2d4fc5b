"""CPUID policy: parsing, masking with dependencies, topology, hypervisor signature leaves."""

from __future__ import annotations

import pytest

import vmscope
from vmscope.arch.x86.cpuid import (
    FEATURES,
    VMSCOPE_CPUID_SIGNATURE,
    CpuidEntry,
    FeaturePolicy,
    apply_policy,
    parse_feature_policy,
)
from vmscope.errors import ConfigError

SIGNIFICANT_INDEX = 1


def vendor_regs(vendor: bytes) -> dict[str, int]:
    return {
        "ebx": int.from_bytes(vendor[0:4], "little"),
        "edx": int.from_bytes(vendor[4:8], "little"),
        "ecx": int.from_bytes(vendor[8:12], "little"),
    }


def bits(*positions: int) -> int:
    return sum(1 << p for p in positions)


# Leaf 1 ECX of the host: sse3 0, pclmulqdq 1, ssse3 9, fma 12, cx16 13, pcid 17, sse4_1 19,
# sse4_2 20, x2apic 21, movbe 22, popcnt 23, tsc_deadline 24, aes 25, xsave 26, avx 28,
# f16c 29, rdrand 30 (no osxsave: KVM leaves it to the guest's CR4; no hypervisor bit).
HOST_1_ECX = bits(0, 1, 9, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 28, 29, 30)
HOST_1_EDX = 0x178BFBFF & ~(1 << 28)  # a typical feature set, HTT clear
# Leaf 7 EBX: fsgsbase 0, bmi1 3, avx2 5, smep 7, bmi2 8, erms 9, invpcid 10, avx512f 16,
# avx512dq 17, rdseed 18, adx 19, smap 20, clflushopt 23, avx512cd 28, avx512bw 30, avx512vl 31.
HOST_7_EBX = bits(0, 3, 5, 7, 8, 9, 10, 16, 17, 18, 19, 20, 23, 28, 30, 31)
HOST_7_ECX = bits(1, 2, 3, 4, 22)  # avx512vbmi, umip, pku, ospke, rdpid; no la57
HOST_7_EDX = bits(10, 26, 27, 29, 31)
KVM_FEATURES = 0x0100_7AFB


def host_entries(vendor: bytes = b"GenuineIntel", max_leaf: int = 0x1F) -> list[CpuidEntry]:
    entries = [
        CpuidEntry(0, 0, 0, eax=max_leaf, **vendor_regs(vendor)),
        CpuidEntry(1, 0, 0, eax=0x000806F8, ebx=0x0A_10_0800, ecx=HOST_1_ECX, edx=HOST_1_EDX),
        # Deterministic cache parameters: L1d, L1i, L2, L3 (level in EAX[7:5], type in [4:0]).
        CpuidEntry(4, 0, SIGNIFICANT_INDEX, eax=0xFC00_4121),
        CpuidEntry(4, 1, SIGNIFICANT_INDEX, eax=0xFC00_4122),
        CpuidEntry(4, 2, SIGNIFICANT_INDEX, eax=0xFC00_4143),
        CpuidEntry(4, 3, SIGNIFICANT_INDEX, eax=0xFC1F_C163),
        CpuidEntry(7, 0, SIGNIFICANT_INDEX, eax=0, ebx=HOST_7_EBX, ecx=HOST_7_ECX, edx=HOST_7_EDX),
        CpuidEntry(0xB, 0, SIGNIFICANT_INDEX, eax=1, ebx=2, ecx=0x100, edx=0x37),
        CpuidEntry(0xB, 1, SIGNIFICANT_INDEX, eax=7, ebx=112, ecx=0x201, edx=0x37),
        # XCR0 components: x87, SSE, AVX, opmask/ZMM_Hi256/Hi16_ZMM, PKRU.
        CpuidEntry(0xD, 0, SIGNIFICANT_INDEX, eax=bits(0, 1, 2, 5, 6, 7, 9), ebx=0xA88, ecx=0xA88),
        CpuidEntry(0xD, 1, SIGNIFICANT_INDEX, eax=bits(0, 1, 2, 3)),
        CpuidEntry(0xD, 2, SIGNIFICANT_INDEX, eax=0x100, ebx=0x240),
        CpuidEntry(0xD, 5, SIGNIFICANT_INDEX, eax=0x40, ebx=0x440),
        CpuidEntry(0xD, 6, SIGNIFICANT_INDEX, eax=0x200, ebx=0x480),
        CpuidEntry(0xD, 7, SIGNIFICANT_INDEX, eax=0x400, ebx=0x680),
        CpuidEntry(0xD, 9, SIGNIFICANT_INDEX, eax=0x8, ebx=0xA80),
        CpuidEntry(0x1F, 0, SIGNIFICANT_INDEX, eax=1, ebx=2, ecx=0x100, edx=0x37),
        CpuidEntry(0x1F, 1, SIGNIFICANT_INDEX, eax=7, ebx=112, ecx=0x201, edx=0x37),
        CpuidEntry(0x4000_0000, 0, 0, eax=0x4000_0001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D),
        CpuidEntry(0x4000_0001, 0, 0, eax=KVM_FEATURES),
        CpuidEntry(0x8000_0000, 0, 0, eax=0x8000_0008),
        CpuidEntry(0x8000_0001, 0, 0, ecx=bits(0, 5, 8), edx=bits(11, 20, 26, 27, 29)),
        CpuidEntry(0x8000_0008, 0, 0, eax=0x3027, ecx=0),
    ]
    return entries


def find(entries: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry:
    matches = [e for e in entries if e.function == function and e.index == index]
    assert len(matches) == 1, f"{len(matches)} entries for {function:#x}.{index}"
    return matches[0]


def has(entries: list[CpuidEntry], function: int, index: int = 0) -> bool:
    return any(e.function == function and e.index == index for e in entries)


def signature(entry: CpuidEntry) -> bytes:
    return b"".join(r.to_bytes(4, "little") for r in (entry.ebx, entry.ecx, entry.edx))


# -- feature table ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "location"),
    [
        ("cx16", (1, "ecx", 13)),
        ("xsave", (1, "ecx", 26)),
        ("osxsave", (1, "ecx", 27)),
        ("avx", (1, "ecx", 28)),
        ("x2apic", (1, "ecx", 21)),
        ("tsc_deadline_timer", (1, "ecx", 24)),
        ("pcid", (1, "ecx", 17)),
        ("rdrand", (1, "ecx", 30)),
        ("sse4_2", (1, "ecx", 20)),
        ("popcnt", (1, "ecx", 23)),
        ("aes", (1, "ecx", 25)),
        ("hypervisor", (1, "ecx", 31)),
        ("ht", (1, "edx", 28)),
        ("avx2", (7, "ebx", 5)),
        ("rdseed", (7, "ebx", 18)),
        ("smep", (7, "ebx", 7)),
        ("smap", (7, "ebx", 20)),
        ("fsgsbase", (7, "ebx", 0)),
        ("erms", (7, "ebx", 9)),
        ("pku", (7, "ecx", 3)),
        ("la57", (7, "ecx", 16)),
        ("md_clear", (7, "edx", 10)),
        ("lm", (0x8000_0001, "edx", 29)),
        ("nx", (0x8000_0001, "edx", 20)),
        ("pdpe1gb", (0x8000_0001, "edx", 26)),
        ("rdtscp", (0x8000_0001, "edx", 27)),
        ("syscall", (0x8000_0001, "edx", 11)),
        ("lahf_lm", (0x8000_0001, "ecx", 0)),
    ],
)
def test_feature_bits_match_the_sdm(name: str, location: tuple[int, str, int]) -> None:
    feature = FEATURES[name]
    assert (feature.function, feature.register, feature.bit) == location


def test_no_two_features_share_a_bit() -> None:
    places = [(f.function, f.index, f.register, f.bit) for f in FEATURES.values()]
    assert len(places) == len(set(places))


# -- parsing ------------------------------------------------------------------------------


def test_parse_policy() -> None:
    policy = parse_feature_policy("-cx16,-xsave,+x2apic")
    assert policy == FeaturePolicy(enable=frozenset({"x2apic"}), disable=frozenset({"cx16", "xsave"}))


def test_parse_policy_tolerates_spaces_case_and_aliases() -> None:
    policy = parse_feature_policy(" -SSE4.2 , +tsc-deadline, -sse3 ")
    assert policy.disable == {"sse4_2", "pni"}
    assert policy.enable == {"tsc_deadline_timer"}


def test_parse_empty_policy() -> None:
    assert parse_feature_policy("") == FeaturePolicy()


def test_unknown_feature_names_the_token_and_close_names() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_feature_policy("-avx2,-cx61")
    message = str(caught.value)
    assert "'-cx61'" in message and "cx16" in message


@pytest.mark.parametrize("text", ["cx16", "-cx16,,+avx", "+-cx16", "-cx16;+avx", "-"])
def test_bad_syntax(text: str) -> None:
    with pytest.raises(ConfigError, match=r"expected \+name or -name"):
        parse_feature_policy(text)


def test_enabled_and_disabled_together() -> None:
    with pytest.raises(ConfigError, match="both enabled and disabled"):
        parse_feature_policy("+avx,-avx")


# -- masking ------------------------------------------------------------------------------


def test_clearing_xsave_clears_dependents_and_leaf_d() -> None:
    result = apply_policy(host_entries(), parse_feature_policy("-xsave"), 0, 1)
    leaf1 = find(result, 1)
    for bit in (26, 27, 28, 12, 29):  # xsave, osxsave, avx, fma, f16c
        assert not leaf1.ecx & 1 << bit, bit
    assert leaf1.ecx & 1 << 20 and leaf1.ecx & 1 << 13  # sse4_2, cx16 untouched
    leaf7 = find(result, 7)
    for bit in (5, 16, 17, 28, 30, 31):  # avx2 and the avx512 family
        assert not leaf7.ebx & 1 << bit, bit
    assert not leaf7.ecx & (1 << 1 | 1 << 3 | 1 << 4)  # avx512vbmi, pku, ospke
    assert leaf7.ebx & 1 << 7 and leaf7.ebx & 1 << 20  # smep, smap untouched
    assert not any(e.function == 0xD for e in result)


def test_clearing_avx_keeps_xsave_but_drops_its_state_components() -> None:
    result = apply_policy(host_entries(), parse_feature_policy("-avx"), 0, 1)
    leaf1 = find(result, 1)
    assert leaf1.ecx & 1 << 26 and not leaf1.ecx & 1 << 28
    xcr0 = find(result, 0xD, 0).eax
    assert xcr0 & 0b11 == 0b11 and xcr0 & 1 << 9  # x87, SSE and PKRU stay
    assert not xcr0 & (1 << 2 | 1 << 5 | 1 << 6 | 1 << 7)  # AVX and the AVX-512 states go
    assert not has(result, 0xD, 2) and not has(result, 0xD, 5)
    assert has(result, 0xD, 1) and has(result, 0xD, 9)


def test_clearing_cx16_touches_only_cx16() -> None:
    host = host_entries()
    result = apply_policy(host, parse_feature_policy("-cx16"), 0, 1)
    assert find(result, 1).ecx == find(host, 1).ecx & ~(1 << 13) | 1 << 31  # plus the hypervisor bit
    assert find(result, 7) == find(host, 7)


def test_clearing_an_unsupported_feature_is_fine() -> None:
    result = apply_policy(host_entries(), parse_feature_policy("-la57"), 0, 1)
    assert not find(result, 7).ecx & 1 << 16


def test_enabling_a_supported_feature_keeps_it() -> None:
    result = apply_policy(host_entries(), parse_feature_policy("+x2apic,+rdrand"), 0, 1)
    assert find(result, 1).ecx & (1 << 21 | 1 << 30) == 1 << 21 | 1 << 30


def test_enabling_an_unsupported_feature_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"'la57'.*does not support"):
        apply_policy(host_entries(), parse_feature_policy("+la57"), 0, 1)


def test_enabling_a_feature_whose_requirement_is_cleared_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"'avx2'.*needs.*xsave"):
        apply_policy(host_entries(), parse_feature_policy("-xsave,+avx2"), 0, 1)


def test_hypervisor_bit_is_set() -> None:
    result = apply_policy(host_entries(), FeaturePolicy(), 0, 1)
    assert find(result, 1).ecx & 1 << 31


def test_input_is_not_modified() -> None:
    host = host_entries()
    snapshot = list(host)
    apply_policy(host, parse_feature_policy("-xsave,-avx2"), 1, 2)
    assert host == snapshot


# -- topology -----------------------------------------------------------------------------


@pytest.mark.parametrize(("vcpu_id", "cpu_count", "shift"), [(0, 1, 0), (2, 4, 2), (5, 6, 3), (8, 9, 4)])
def test_topology(vcpu_id: int, cpu_count: int, shift: int) -> None:
    result = apply_policy(host_entries(), FeaturePolicy(), vcpu_id, cpu_count)
    leaf1 = find(result, 1)
    assert leaf1.ebx >> 24 == vcpu_id
    assert (leaf1.ebx >> 16) & 0xFF == cpu_count
    assert leaf1.ebx & 0xFFFF == 0x0800  # brand index and CLFLUSH size kept
    assert bool(leaf1.edx & 1 << 28) == (cpu_count > 1)  # HTT: EBX[23:16] is meaningful
    for leaf in (0xB, 0x1F):
        levels = sorted((e for e in result if e.function == leaf), key=lambda e: e.index)
        assert [e.index for e in levels] == [0, 1, 2]
        smt, core, end = levels
        assert (smt.eax & 0x1F, smt.ebx & 0xFFFF, smt.ecx, smt.edx) == (0, 1, 0x100, vcpu_id)
        assert (core.eax & 0x1F, core.ebx & 0xFFFF, core.ecx, core.edx) == (shift, cpu_count, 0x201, vcpu_id)
        assert (end.eax, end.ebx, (end.ecx >> 8) & 0xFF, end.edx) == (0, 0, 0, vcpu_id)
        assert all(e.flags & SIGNIFICANT_INDEX for e in levels)
    # The x2APIC id and the initial APIC id agree, and every id fits the core field.
    assert vcpu_id >> shift == 0


def test_cache_leaf_topology() -> None:
    result = apply_policy(host_entries(), FeaturePolicy(), 0, 4)
    for index in range(4):
        eax = find(result, 4, index).eax
        assert eax >> 26 == 3  # four cores per package
        sharing = ((eax >> 14) & 0xFFF) + 1
        assert sharing == (4 if index == 3 else 1)  # L3 shared, L1/L2 private
        assert eax & 0x3FFF == find(host_entries(), 4, index).eax & 0x3FFF


def test_leaf_b_is_added_when_the_host_list_lacks_it() -> None:
    host = [e for e in host_entries(max_leaf=0x7) if e.function not in (0xB, 0xD, 0x1F)]
    result = apply_policy(host, FeaturePolicy(), 1, 2)
    assert find(result, 0).eax == 0xB
    assert find(result, 0xB, 1).ebx == 2
    assert not has(result, 0x1F)


def test_amd_core_count() -> None:
    result = apply_policy(host_entries(vendor=b"AuthenticAMD"), FeaturePolicy(), 0, 6)
    ecx = find(result, 0x8000_0008).ecx
    assert ecx & 0xFF == 5 and (ecx >> 12) & 0xF == 3


def test_intel_leaves_0x80000008_ecx_alone() -> None:
    result = apply_policy(host_entries(), FeaturePolicy(), 0, 6)
    assert find(result, 0x8000_0008).ecx == 0


@pytest.mark.parametrize(("vcpu_id", "cpu_count"), [(2, 2), (-1, 2), (0, 0)])
def test_bad_vcpu_numbers(vcpu_id: int, cpu_count: int) -> None:
    with pytest.raises(ConfigError):
        apply_policy(host_entries(), FeaturePolicy(), vcpu_id, cpu_count)


# -- hypervisor leaves --------------------------------------------------------------------


def version_code(version: str) -> int:
    major, minor, patch = (int(part) for part in version.split(".")[:3])
    return major << 16 | minor << 8 | patch


def test_vmscope_signature_leaves() -> None:
    result = apply_policy(host_entries(), FeaturePolicy(), 0, 1)
    base = find(result, 0x4000_0000)
    assert signature(base) == VMSCOPE_CPUID_SIGNATURE == b"vmscope\0\0\0\0\0"
    assert base.eax == 0x4000_0001
    assert find(result, 0x4000_0001).eax == version_code(vmscope.__version__)


def test_kvm_leaves_move_to_0x40000100() -> None:
    result = apply_policy(host_entries(), FeaturePolicy(), 0, 1)
    kvm = find(result, 0x4000_0100)
    assert signature(kvm) == b"KVMKVMKVM\0\0\0"
    assert kvm.eax == 0x4000_0101
    assert find(result, 0x4000_0101).eax == KVM_FEATURES


def test_linux_style_scan_finds_both_hypervisors() -> None:
    """Linux's hypervisor_cpuid_base(): every 0x100 from 0x40000000, compare the signature."""
    result = apply_policy(host_entries(), FeaturePolicy(), 0, 1)
    by_function = {e.function: e for e in result if e.index == 0}
    found = {}
    for base in range(0x4000_0000, 0x4001_0000, 0x100):
        if base in by_function:
            found[signature(by_function[base])] = base
    assert found == {VMSCOPE_CPUID_SIGNATURE: 0x4000_0000, b"KVMKVMKVM\0\0\0": 0x4000_0100}
    kvm_base = found[b"KVMKVMKVM\0\0\0"]
    assert by_function[kvm_base | 1].eax == KVM_FEATURES  # kvm_arch_para_features()


def test_without_kvm_leaves_only_vmscope_is_present() -> None:
    host = [e for e in host_entries() if not 0x4000_0000 <= e.function < 0x5000_0000]
    result = apply_policy(host, FeaturePolicy(), 0, 1)
    hypervisor_functions = sorted(e.function for e in result if 0x4000_0000 <= e.function < 0x5000_0000)
    assert hypervisor_functions == [0x4000_0000, 0x4000_0001]
