"""How the recorded stacks were unwound: stacks per unwinder and why walks stopped, from the
``stacks.*`` counters the recorder keeps in the profile metadata."""

from __future__ import annotations

from vmscope.profiler.model import Profile

#: stop reasons that are a complete stack rather than a walk cut short
COMPLETE_STOPS = frozenset({"end of stack", "user mode"})
#: timer samples taken at an interrupt handler's first instruction, charged to the interrupted code
INTERRUPT_ENTRY_KEY = "samples.interrupt_entry"


def stack_quality(profile: Profile) -> dict[str, tuple[int, dict[str, int]]]:
    """unwinder -> (stacks, {stop reason: stacks})."""
    result: dict[str, tuple[int, dict[str, int]]] = {}
    stops: dict[str, dict[str, int]] = {}
    totals: dict[str, int] = {}
    for key, value in profile.metadata.extra.items():
        if not key.startswith("stacks.") or not value.isdigit():
            continue
        name = key.removeprefix("stacks.")
        unwinder, colon, reason = name.partition(": ")
        if colon:
            stops.setdefault(unwinder, {})[reason] = int(value)
        else:
            totals[unwinder] = int(value)
    for unwinder, total in sorted(totals.items(), key=lambda item: -item[1]):
        result[unwinder] = (total, stops.get(unwinder, {}))
    return result


def stack_quality_line(profile: Profile) -> str | None:
    """``stacks: orc 11102 (38 cut short: 38 undefined frame), fp 191`` or None without counters."""
    parts = []
    for unwinder, (total, stops) in stack_quality(profile).items():
        cut = {reason: count for reason, count in stops.items() if reason not in COMPLETE_STOPS}
        text = f"{unwinder} {total}"
        if cut:
            ordered = sorted(cut.items(), key=lambda item: -item[1])
            reasons = ", ".join(f"{count} {reason}" for reason, count in ordered)
            text += f" ({sum(cut.values())} cut short: {reasons})"
        parts.append(text)
    moved = profile.metadata.extra.get(INTERRUPT_ENTRY_KEY, "0")
    if moved.isdigit() and int(moved):
        parts.append(f"{moved} timer samples at an interrupt entry charged to the interrupted code")
    return f"stacks: {', '.join(parts)}" if parts else None
