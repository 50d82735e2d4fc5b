"""Steering a Linux guest away from CPU features that a kvm_pvm host cannot run in its kernel.

On a kvm_pvm host the guest kernel's code is emulated by the host's KVM instruction emulator,
and what that emulator cannot do ends in an emulation failure that vmscope's fallback
emulator (vmm.fallback) completes. Neither handles the VEX/EVEX-encoded SIMD (AVX and later),
AES-NI, SHA-NI, CLMUL, GFNI, the SSE4.2 CRC32 instruction or SSSE3/SSE4.1 kernel crypto loops,
and masking CPUID does not reach a guest on such a host (it reads the host CPU's CPUID). So
vmscope asks the kernel itself: ``clearcpuid=`` on its command line makes Linux treat those
features as absent and pick its generic code (its crypto, RAID and checksum code all have
generic fallbacks). User space still sees the real CPU and runs natively at CPL3, where these
instructions need no emulation. Nothing is hidden on hosts that run guest kernels natively
(VT-x/AMD-V), nor from guests that are not Linux.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

#: /proc/cpuinfo flag names (which Linux's clearcpuid= accepts) of features whose kernel users
#: execute instructions that neither kvm_pvm's emulator nor vmscope's fallback completes
UNEMULATED_KERNEL_FEATURES = (
    "ssse3", "sse4_1", "sse4_2",  # crypto/checksum loops (pshufb/palignr/pblendw..., crc32)
    "aes", "pclmulqdq", "sha_ni", "gfni", "vaes", "vpclmulqdq",
    "avx", "avx2", "fma", "f16c", "avx_vnni",  # VEX-encoded: not decoded by either emulator
    "avx512f", "avx512dq", "avx512ifma", "avx512cd", "avx512bw", "avx512vl", "avx512vbmi",
    "avx512_vbmi2", "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8",  # its 8 KiB state also exceeds KVM's legacy XSAVE area
    "bmi1", "bmi2", "adx",  # VEX-encoded mulx/shlx... and adcx/adox in curve25519
    "xsaves",  # supervisor XSAVES/XRSTORS; the kernel then uses XSAVEOPT/XRSTOR, which vmscope completes
)  # fmt: skip


def host_cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The host CPU's feature flags from /proc/cpuinfo (the first processor's)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return set(value.split())
    return set()


def features_to_hide(host_flags: Iterable[str]) -> list[str]:
    """The features in UNEMULATED_KERNEL_FEATURES that the host CPU has, in that order."""
    present = set(host_flags)
    return [name for name in UNEMULATED_KERNEL_FEATURES if name in present]


def with_clearcpuid(cmdline: str, features: Iterable[str]) -> str:
    """``cmdline`` with ``features`` added to its clearcpuid= (merged with one the user gave)."""
    wanted = list(dict.fromkeys(features))
    if not wanted:
        return cmdline
    words = cmdline.split()
    for index, word in enumerate(words):
        if word.startswith("clearcpuid="):
            given = [name for name in word.removeprefix("clearcpuid=").split(",") if name]
            words[index] = "clearcpuid=" + ",".join(dict.fromkeys([*given, *wanted]))
            return " ".join(words)
    return " ".join([*words, "clearcpuid=" + ",".join(wanted)])
