"""The CPUID a guest sees: KVM's supported list, masked by a user policy, with topology and
hypervisor leaves filled in. Pure data in, data out: the KVM layer fetches the host list
(KVM_GET_SUPPORTED_CPUID) and installs the result (KVM_SET_CPUID2) per vCPU.

Feature names are Linux's (``/proc/cpuinfo``), so ``--cpu-features -xsave,+x2apic`` means
what a Linux user expects. Hypervisor leaves: vmscope's own signature sits at 0x40000000 and
KVM's paravirt leaves move to 0x40000100, where Linux still finds them (it scans
0x40000000-0x4000ff00 in steps of 0x100 for the "KVMKVMKVM" signature).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from vmscope.errors import ConfigError
from vmscope.version import __version__

#: kvm_cpuid_entry2.flags: the entry applies to one sub-leaf (ECX) only
KVM_CPUID_FLAG_SIGNIFICANT_INDEX = 1

VMSCOPE_CPUID_SIGNATURE = b"vmscope\0\0\0\0\0"
KVM_CPUID_SIGNATURE = b"KVMKVMKVM\0\0\0"
HYPERVISOR_BASE = 0x4000_0000
HYPERVISOR_LEAF_STRIDE = 0x100
#: where KVM's own leaves move to, behind vmscope's
KVM_LEAVES_BASE = HYPERVISOR_BASE + HYPERVISOR_LEAF_STRIDE
VMSCOPE_MAX_LEAF = HYPERVISOR_BASE + 1

REGISTERS = ("eax", "ebx", "ecx", "edx")


class CpuidEntry(NamedTuple):
    """One CPUID leaf/sub-leaf, laid out as struct kvm_cpuid_entry2."""

    function: int
    #: the field shadows tuple.index(), which nothing calls on an entry
    index: int = 0  # type: ignore[assignment]
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    def register(self, name: str) -> int:
        value: int = getattr(self, name)
        return value


class FeatureBit(NamedTuple):
    """Where a named feature flag lives: CPUID.(function, index).register[bit]."""

    name: str
    function: int
    #: the field shadows tuple.index(), which nothing calls on a feature bit
    index: int  # type: ignore[assignment]
    register: str
    bit: int


def _bits(function: int, index: int, register: str, names: dict[int, str]) -> list[FeatureBit]:
    return [FeatureBit(name, function, index, register, bit) for bit, name in names.items()]


_FEATURE_LIST = [
    *_bits(1, 0, "edx", {
        0: "fpu", 1: "vme", 2: "de", 3: "pse", 4: "tsc", 5: "msr", 6: "pae", 7: "mce",
        8: "cx8", 9: "apic", 11: "sep", 12: "mtrr", 13: "pge", 14: "mca", 15: "cmov",
        16: "pat", 17: "pse36", 18: "pn", 19: "clflush", 21: "dts", 22: "acpi", 23: "mmx",
        24: "fxsr", 25: "sse", 26: "sse2", 27: "ss", 28: "ht", 29: "tm", 30: "ia64", 31: "pbe",
    }),
    *_bits(1, 0, "ecx", {
        0: "pni", 1: "pclmulqdq", 2: "dtes64", 3: "monitor", 4: "ds_cpl", 5: "vmx", 6: "smx",
        7: "est", 8: "tm2", 9: "ssse3", 10: "cid", 11: "sdbg", 12: "fma", 13: "cx16",
        14: "xtpr", 15: "pdcm", 17: "pcid", 18: "dca", 19: "sse4_1", 20: "sse4_2",
        21: "x2apic", 22: "movbe", 23: "popcnt", 24: "tsc_deadline_timer", 25: "aes",
        26: "xsave", 27: "osxsave", 28: "avx", 29: "f16c", 30: "rdrand", 31: "hypervisor",
    }),
    *_bits(7, 0, "ebx", {
        0: "fsgsbase", 1: "tsc_adjust", 2: "sgx", 3: "bmi1", 4: "hle", 5: "avx2",
        6: "fdp_excptn_only", 7: "smep", 8: "bmi2", 9: "erms", 10: "invpcid", 11: "rtm",
        12: "cqm", 13: "zero_fcs_fds", 14: "mpx", 15: "rdt_a", 16: "avx512f", 17: "avx512dq",
        18: "rdseed", 19: "adx", 20: "smap", 21: "avx512ifma", 23: "clflushopt", 24: "clwb",
        25: "intel_pt", 26: "avx512pf", 27: "avx512er", 28: "avx512cd", 29: "sha_ni",
        30: "avx512bw", 31: "avx512vl",
    }),
    *_bits(7, 0, "ecx", {
        0: "prefetchwt1", 1: "avx512vbmi", 2: "umip", 3: "pku", 4: "ospke", 5: "waitpkg",
        6: "avx512_vbmi2", 7: "shstk", 8: "gfni", 9: "vaes", 10: "vpclmulqdq",
        11: "avx512_vnni", 12: "avx512_bitalg", 13: "tme", 14: "avx512_vpopcntdq", 16: "la57",
        22: "rdpid", 24: "bus_lock_detect", 25: "cldemote", 27: "movdiri", 28: "movdir64b",
        29: "enqcmd", 30: "sgx_lc", 31: "pks",
    }),
    *_bits(7, 0, "edx", {
        2: "avx512_4vnniw", 3: "avx512_4fmaps", 4: "fsrm", 8: "avx512_vp2intersect",
        10: "md_clear", 14: "serialize", 16: "tsxldtrk", 18: "pconfig", 19: "arch_lbr",
        20: "ibt", 22: "amx_bf16", 23: "avx512_fp16", 24: "amx_tile", 25: "amx_int8",
        26: "spec_ctrl", 27: "intel_stibp", 28: "flush_l1d", 29: "arch_capabilities",
        30: "core_capabilities", 31: "spec_ctrl_ssbd",
    }),
    *_bits(0xD, 1, "eax", {0: "xsaveopt", 1: "xsavec", 2: "xgetbv1", 3: "xsaves"}),
    *_bits(0x8000_0001, 0, "ecx", {
        0: "lahf_lm", 1: "cmp_legacy", 2: "svm", 3: "extapic", 4: "cr8_legacy", 5: "abm",
        6: "sse4a", 7: "misalignsse", 8: "3dnowprefetch", 9: "osvw", 10: "ibs", 11: "xop",
        12: "skinit", 13: "wdt", 15: "lwp", 16: "fma4", 17: "tce", 19: "nodeid_msr", 21: "tbm",
        22: "topoext", 23: "perfctr_core", 24: "perfctr_nb", 26: "bpext", 27: "ptsc",
        28: "perfctr_llc", 29: "mwaitx",
    }),
    *_bits(0x8000_0001, 0, "edx", {
        11: "syscall", 19: "mp", 20: "nx", 22: "mmxext", 25: "fxsr_opt", 26: "pdpe1gb",
        27: "rdtscp", 29: "lm", 30: "3dnowext", 31: "3dnow",
    }),
]  # fmt: skip

#: every named feature flag, by its Linux name
FEATURES: dict[str, FeatureBit] = {feature.name: feature for feature in _FEATURE_LIST}

#: other spellings users type (QEMU's, Intel's), mapped to the Linux name
ALIASES = {
    "sse3": "pni",
    "sse4.1": "sse4_1",
    "sse4.2": "sse4_2",
    "tsc_deadline": "tsc_deadline_timer",
    "tsc-deadline": "tsc_deadline_timer",
    "pclmuldq": "pclmulqdq",
    "sha": "sha_ni",
    "1gb_pages": "pdpe1gb",
    "pdpe1gb_pages": "pdpe1gb",
    "htt": "ht",
}

_AVX512_EXTENSIONS = (
    "avx512dq", "avx512ifma", "avx512pf", "avx512er", "avx512cd", "avx512bw", "avx512vl",
    "avx512vbmi", "avx512_vbmi2", "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq",
    "avx512_4vnniw", "avx512_4fmaps", "avx512_vp2intersect", "avx512_fp16",
)  # fmt: skip

#: feature -> the features it needs; clearing one clears everything that needs it
#: (after Linux's arch/x86/kernel/cpu/cpuid-deps.c, trimmed to the flags named here)
DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "fxsr": ("fpu",),
    "cmov": ("fxsr",),
    "mmx": ("fxsr",),
    "mmxext": ("mmx",),
    "fxsr_opt": ("fxsr",),
    "sse": ("fxsr",),
    "sse2": ("sse",),
    "pni": ("sse2",),
    "ssse3": ("sse2",),
    "sse4_1": ("sse2",),
    "sse4_2": ("sse2",),
    "pclmulqdq": ("sse2",),
    "aes": ("sse2",),
    "sha_ni": ("sse2",),
    "gfni": ("sse2",),
    "xsave": ("fxsr",),
    "osxsave": ("xsave",),
    "xsaveopt": ("xsave",),
    "xsavec": ("xsave",),
    "xsaves": ("xsave",),
    "xgetbv1": ("xsave",),
    "avx": ("xsave",),
    "pku": ("xsave",),
    "ospke": ("pku",),
    "mpx": ("xsave",),
    "f16c": ("avx",),
    "fma": ("avx",),
    "avx2": ("avx",),
    "vaes": ("avx",),
    "vpclmulqdq": ("avx",),
    "avx512f": ("avx",),
    **{name: ("avx512f",) for name in _AVX512_EXTENSIONS},
    "amx_tile": ("xsave",),
    "amx_bf16": ("amx_tile",),
    "amx_int8": ("amx_tile",),
    "shstk": ("xsaves",),
    "ibt": ("xsaves",),
    "arch_lbr": ("xsaves",),
    "x2apic": ("apic",),
    "tsc_deadline_timer": ("apic",),
    "pdpe1gb": ("lm",),
    "la57": ("lm",),
    "tsc_adjust": ("tsc",),
    "rdtscp": ("tsc",),
}

#: XCR0 state components (leaf 0xD sub-leaves) that belong to a feature
XSAVE_COMPONENTS: dict[str, tuple[int, ...]] = {
    "avx": (2,),
    "mpx": (3, 4),
    "avx512f": (5, 6, 7),
    "pku": (9,),
    "amx_tile": (17, 18),
}

#: bits vmscope sets itself, whatever the host list says
_SYNTHESIZED = frozenset({"hypervisor"})

_LEAF_1_ECX_HYPERVISOR = 1 << 31
_LEAF_1_EDX_HTT = 1 << 28
_TOPOLOGY_LEAVES = (0xB, 0x1F)
_TOPOLOGY_LEVEL_SMT = 1
_TOPOLOGY_LEVEL_CORE = 2
_AMD_VENDORS = (b"AuthenticAMD", b"HygonGenuine")
_TOKEN = re.compile(r"^([+-])([a-z0-9][a-z0-9_.\-]*)$")


class FeaturePolicy(NamedTuple):
    """Features to hide from the guest (``disable``) or to require of the host (``enable``)."""

    enable: frozenset[str] = frozenset()
    disable: frozenset[str] = frozenset()


def canonical_feature_name(name: str) -> str | None:
    """The Linux name for ``name`` (case-insensitive, aliases resolved), or None if unknown."""
    lowered = name.strip().lower()
    for candidate in (lowered, lowered.replace("-", "_").replace(".", "_")):
        if candidate in FEATURES:
            return candidate
        if candidate in ALIASES:
            return ALIASES[candidate]
    return None


def _close_names(name: str) -> str:
    known = sorted([*FEATURES, *ALIASES])
    import difflib  # only for this error message

    close = difflib.get_close_matches(name.lower(), known, n=5, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(name.lower(), known, n=5, cutoff=0.3)
    return f"; close names: {', '.join(close)}" if close else ""


def parse_feature_policy(text: str) -> FeaturePolicy:
    """Parse "-cx16,-xsave,+x2apic": comma-separated feature names, each with + or -."""
    enable: set[str] = set()
    disable: set[str] = set()
    if not text.strip():
        return FeaturePolicy()
    for raw_token in text.split(","):
        token = raw_token.strip()
        match = _TOKEN.match(token.lower())
        if not match:
            raise ConfigError(
                f"bad CPU feature token {token!r} in {text!r}: expected +name or -name, separated by commas"
            )
        sign, name = match.groups()
        feature = canonical_feature_name(name)
        if feature is None:
            raise ConfigError(f"unknown CPU feature {token!r}{_close_names(name)}")
        wanted, other = (enable, disable) if sign == "+" else (disable, enable)
        if feature in other:
            raise ConfigError(f"CPU feature {feature!r} is both enabled and disabled in {text!r}")
        wanted.add(feature)
    return FeaturePolicy(frozenset(enable), frozenset(disable))


def dependents(features: Iterable[str]) -> set[str]:
    """``features`` plus every feature that needs one of them, transitively."""
    closed = set(features)
    changed = True
    while changed:
        changed = False
        for feature, needs in DEPENDENCIES.items():
            if feature not in closed and closed.intersection(needs):
                closed.add(feature)
                changed = True
    return closed


def _requirements(feature: str) -> set[str]:
    """Every feature ``feature`` needs, transitively."""
    needed: set[str] = set()
    pending = list(DEPENDENCIES.get(feature, ()))
    while pending:
        current = pending.pop()
        if current not in needed:
            needed.add(current)
            pending.extend(DEPENDENCIES.get(current, ()))
    return needed


# -- the table being edited -----------------------------------------------------------------


class _Table:
    """CPUID entries keyed by (function, index), keeping the host's order."""

    def __init__(self, entries: Iterable[CpuidEntry]) -> None:
        self.entries: dict[tuple[int, int], CpuidEntry] = {}
        for entry in entries:
            self.entries[(entry.function, entry.index)] = entry

    def get(self, function: int, index: int = 0) -> CpuidEntry | None:
        return self.entries.get((function, index))

    def put(self, entry: CpuidEntry) -> None:
        self.entries[(entry.function, entry.index)] = entry

    def drop(self, function: int, index: int | None = None) -> None:
        for key in [k for k in self.entries if k[0] == function and (index is None or k[1] == index)]:
            del self.entries[key]

    def functions(self, start: int, end: int) -> list[CpuidEntry]:
        return [e for (function, _), e in self.entries.items() if start <= function < end]

    def has_feature(self, feature: FeatureBit) -> bool:
        entry = self.get(feature.function, feature.index)
        return entry is not None and bool(entry.register(feature.register) >> feature.bit & 1)

    def set_feature(self, feature: FeatureBit, on: bool) -> None:
        entry = self.get(feature.function, feature.index)
        if entry is None:
            return
        value = entry.register(feature.register)
        value = value | 1 << feature.bit if on else value & ~(1 << feature.bit)
        self.put(entry._replace(**{feature.register: value}))

    def vendor(self) -> bytes:
        leaf0 = self.get(0)
        if leaf0 is None:
            return b""
        return b"".join(v.to_bytes(4, "little") for v in (leaf0.ebx, leaf0.edx, leaf0.ecx))

    def result(self) -> list[CpuidEntry]:
        return list(self.entries.values())


# -- the policy -----------------------------------------------------------------------------


def vmscope_version_code(version: str = __version__) -> int:
    """Version "1.2.3" as 0x00010203, the EAX of leaf 0x40000001."""
    parts = [int(match) for match in re.findall(r"\d+", version)[:3]]
    parts += [0] * (3 - len(parts))
    major, minor, patch = (min(part, 0xFF) for part in parts)
    return major << 16 | minor << 8 | patch


def signature_registers(signature: bytes) -> tuple[int, int, int]:
    """A 12-byte hypervisor signature as (ebx, ecx, edx)."""
    if len(signature) != 12:
        raise ValueError(f"a CPUID signature is 12 bytes, got {len(signature)}")
    ebx, ecx, edx = (int.from_bytes(signature[i : i + 4], "little") for i in (0, 4, 8))
    return ebx, ecx, edx


def topology_shift(cpu_count: int) -> int:
    """APIC-id bits for ``cpu_count`` cores of one thread each: ceil(log2(cpu_count))."""
    return (cpu_count - 1).bit_length()


def apply_policy(
    entries: Sequence[CpuidEntry], policy: FeaturePolicy, vcpu_id: int, cpu_count: int
) -> list[CpuidEntry]:
    """The CPUID for vCPU ``vcpu_id`` of ``cpu_count``, from the host-supported ``entries``.

    Hides the features ``policy.disable`` names and all that depend on them (dropping leaf 0xD
    when xsave goes); checks that every ``policy.enable`` feature is supported; sets the
    hypervisor bit, the APIC id and a topology of ``cpu_count`` cores with one thread each;
    installs vmscope's hypervisor leaves and moves KVM's to 0x40000100. ``entries`` is not
    modified.
    """
    if cpu_count < 1:
        raise ConfigError(f"CPU count {cpu_count} must be at least 1")
    if not 0 <= vcpu_id < cpu_count:
        raise ConfigError(f"vCPU id {vcpu_id} is outside 0..{cpu_count - 1}")
    table = _Table(entries)
    hidden = dependents(policy.disable)

    for name in sorted(policy.enable):
        if name not in _SYNTHESIZED and not table.has_feature(FEATURES[name]):
            raise ConfigError(f"cannot enable CPU feature {name!r}: the host (KVM) does not support it")
        conflicts = sorted(_requirements(name) & hidden)
        if conflicts:
            raise ConfigError(
                f"cannot enable CPU feature {name!r}: it needs {', '.join(conflicts)}, "
                "which the policy disables"
            )

    _set_topology(table, vcpu_id, cpu_count)
    table.set_feature(FEATURES["hypervisor"], True)
    _install_hypervisor_leaves(table)

    for name in sorted(hidden):
        table.set_feature(FEATURES[name], False)
    if "xsave" in hidden:
        table.drop(0xD)
    else:
        for name, components in XSAVE_COMPONENTS.items():
            if name in hidden:
                _drop_xsave_components(table, components)
    return table.result()


def _drop_xsave_components(table: _Table, components: Sequence[int]) -> None:
    mask = sum(1 << component for component in components)
    main_leaf = table.get(0xD, 0)
    if main_leaf is not None:
        table.put(main_leaf._replace(eax=main_leaf.eax & ~mask))
    for component in components:
        table.drop(0xD, component)


def _set_topology(table: _Table, vcpu_id: int, cpu_count: int) -> None:
    shift = topology_shift(cpu_count)
    leaf1 = table.get(1)
    if leaf1 is not None:
        ebx = (leaf1.ebx & 0xFFFF) | min(cpu_count, 0xFF) << 16 | (vcpu_id & 0xFF) << 24
        edx = leaf1.edx | _LEAF_1_EDX_HTT if cpu_count > 1 else leaf1.edx & ~_LEAF_1_EDX_HTT
        table.put(leaf1._replace(ebx=ebx, edx=edx))

    # Deterministic cache parameters: one core per thread; L3 shared by all cores.
    for entry in table.functions(4, 5):
        level = (entry.eax >> 5) & 0x7
        sharing = cpu_count if level >= 3 else 1
        eax = entry.eax & 0x3FFF | (min(sharing, 0x1000) - 1) << 14 | (min(cpu_count, 64) - 1) << 26
        table.put(entry._replace(eax=eax))

    leaf0 = table.get(0)
    present = [leaf for leaf in _TOPOLOGY_LEAVES if table.get(leaf) is not None or leaf == 0xB]
    for leaf in present:
        table.drop(leaf)
        levels = [
            (0, 1, _TOPOLOGY_LEVEL_SMT),  # one thread per core
            (shift, cpu_count, _TOPOLOGY_LEVEL_CORE),
        ]
        for index, (next_shift, count, level_type) in enumerate(levels):
            table.put(
                CpuidEntry(
                    leaf, index, KVM_CPUID_FLAG_SIGNIFICANT_INDEX,
                    eax=next_shift, ebx=count, ecx=level_type << 8 | index, edx=vcpu_id,
                )
            )  # fmt: skip
        # The terminating invalid level: type 0.
        table.put(
            CpuidEntry(leaf, len(levels), KVM_CPUID_FLAG_SIGNIFICANT_INDEX, ecx=len(levels), edx=vcpu_id)
        )
    if leaf0 is not None and leaf0.eax < 0xB:
        table.put(leaf0._replace(eax=0xB))

    if table.vendor() in _AMD_VENDORS:
        extended = table.get(0x8000_0008)
        if extended is not None:
            ecx = extended.ecx & ~0xF0FF | shift << 12 | (cpu_count - 1) & 0xFF
            table.put(extended._replace(ecx=ecx))


def _install_hypervisor_leaves(table: _Table) -> None:
    host_leaves = table.functions(HYPERVISOR_BASE, HYPERVISOR_BASE + HYPERVISOR_LEAF_STRIDE)
    for entry in table.functions(HYPERVISOR_BASE, HYPERVISOR_BASE + 2 * HYPERVISOR_LEAF_STRIDE):
        table.drop(entry.function, entry.index)
    for entry in host_leaves:
        moved = entry._replace(function=entry.function + HYPERVISOR_LEAF_STRIDE)
        if entry.function == HYPERVISOR_BASE and HYPERVISOR_BASE <= entry.eax < KVM_LEAVES_BASE:
            moved = moved._replace(eax=entry.eax + HYPERVISOR_LEAF_STRIDE)
        table.put(moved)
    ebx, ecx, edx = signature_registers(VMSCOPE_CPUID_SIGNATURE)
    table.put(CpuidEntry(HYPERVISOR_BASE, 0, 0, eax=VMSCOPE_MAX_LEAF, ebx=ebx, ecx=ecx, edx=edx))
    table.put(CpuidEntry(HYPERVISOR_BASE + 1, 0, 0, eax=vmscope_version_code()))
