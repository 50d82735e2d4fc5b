"""The stack-protector cost workload (``bench/stack_protector.c``) in its build variants.

One C source, built once per variant; each variant adds its flags after the runtime's defaults
(which say ``-fno-stack-protector -fcf-protection=none``), so the last flag wins for every file,
runtime included. Canaries use ``-mstack-protector-guard=global`` (the runtime's
``__stack_chk_guard``) because the runtime has no TLS for the default ``%fs:0x28`` guard.
``-fcf-protection=return`` only marks the code for shadow stacks: the CPU checks returns only when
the guest kernel enables CET (CR4.CET and the shadow-stack MSRs), which this runtime does not do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmscope.errors import GuestBuildError
from vmscope.guest.build import GUEST_DIR, build_runtime_guest

SOURCE = GUEST_DIR / "bench" / "stack_protector.c"
#: variant name -> extra compiler flags
VARIANTS: dict[str, tuple[str, ...]] = {
    "none": ("-fno-stack-protector",),
    "strong": ("-fstack-protector-strong", "-mstack-protector-guard=global"),
    "all": ("-fstack-protector-all", "-mstack-protector-guard=global"),
    "cf-return": ("-fno-stack-protector", "-fcf-protection=return"),
}
#: the functions with local arrays (protected from "strong" on) and the control (only by "all")
ARRAY_FUNCTIONS = ("byte_array", "word_array")
CONTROL_FUNCTION = "no_array"


def build_variant(variant: str) -> Path:
    """The workload ELF of ``variant`` (cached); GuestBuildError when the toolchain refuses its flags."""
    if variant not in VARIANTS:
        raise GuestBuildError(f"unknown stack-protector variant {variant!r} (known: {', '.join(VARIANTS)})")
    return build_runtime_guest(f"stack-protector-{variant}", [SOURCE], cflags=VARIANTS[variant])


def available_variants() -> dict[str, Path]:
    """Every variant the toolchain can build (``cf-return`` needs a CET-aware GCC)."""
    built: dict[str, Path] = {}
    for variant in VARIANTS:
        try:
            built[variant] = build_variant(variant)
        except GuestBuildError:
            if variant in ("none", "strong", "all"):
                raise  # any GCC since 4.9 builds these: a failure is a real error
    return built


@dataclass(frozen=True, slots=True)
class Phase:
    """The guest's own TSC measurement of one function's loop."""

    cycles: int
    calls: int
    #: cycles of the fastest round, and how many rounds there were
    best_round_cycles: int

    def best_cycles_per_call(self, rounds: int) -> float:
        return self.best_round_cycles * rounds / self.calls if self.calls else 0.0


def parse_phases(serial_output: str) -> dict[str, Phase]:
    """function -> :class:`Phase` from the guest's "phase <name>: C cycles N calls B best" lines."""
    phases: dict[str, Phase] = {}
    for line in serial_output.splitlines():
        parts = line.split()
        if len(parts) == 8 and parts[0] == "phase" and parts[3] == "cycles" and parts[7] == "best":
            phases[parts[1].rstrip(":")] = Phase(int(parts[2]), int(parts[4]), int(parts[6]))
    return phases
