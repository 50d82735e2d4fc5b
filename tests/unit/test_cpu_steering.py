"""clearcpuid= steering of Linux guests on kvm_pvm hosts (vmm.cpu_steering)."""

from __future__ import annotations

from vmscope.vmm.cpu_steering import features_to_hide, host_cpu_flags, with_clearcpuid

CPUINFO = """processor\t: 0
flags\t\t: fpu sse2 ssse3 cx16 popcnt aes avx avx2 avx512f xsave xsaves smap
bugs\t\t: spectre_v1
processor\t: 1
flags\t\t: fpu
"""


def test_flags_come_from_the_first_processor() -> None:
    flags = host_cpu_flags(CPUINFO)
    assert {"ssse3", "avx512f", "smap"} <= flags and "bugs" not in flags


def test_only_features_the_host_has_and_the_emulators_lack_are_hidden() -> None:
    hidden = features_to_hide(host_cpu_flags(CPUINFO))
    assert hidden == ["ssse3", "aes", "avx", "avx2", "avx512f", "xsaves"]
    # completed by vmscope's fallback or by KVM: left to the guest
    assert not {"popcnt", "cx16", "xsave", "smap", "sse2"} & set(hidden)
    assert features_to_hide(set()) == []


def test_clearcpuid_is_appended_or_merged_with_the_users() -> None:
    assert with_clearcpuid("console=ttyS0", ["avx", "aes"]) == "console=ttyS0 clearcpuid=avx,aes"
    assert with_clearcpuid("", ["avx"]) == "clearcpuid=avx"
    assert with_clearcpuid("quiet clearcpuid=pku,avx ro", ["avx", "aes"]) == "quiet clearcpuid=pku,avx,aes ro"
    assert with_clearcpuid("console=ttyS0", []) == "console=ttyS0"
