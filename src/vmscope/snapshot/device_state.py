"""Device models' state (Device.save_state / load_state), keyed by where each is mapped.

A restored machine is assembled from the same configuration, so it has the same devices at
the same places; each saved entry names its bus, base and device name, and a difference is a
SnapshotError rather than a state loaded into the wrong model.
"""

from __future__ import annotations

from typing import Any

from vmscope.errors import SnapshotError, VmscopeError
from vmscope.vmm.machine import Machine


def _key(bus: str, base: int) -> str:
    return f"{bus}:{base:#x}"


def capture_devices(machine: Machine) -> list[dict[str, Any]]:
    return [
        {
            "at": _key(mapping.bus, mapping.base),
            "name": mapping.device.name,
            "state": mapping.device.save_state(),
        }
        for mapping in machine.devices()
    ]


def apply_devices(machine: Machine, saved: object) -> None:
    if not isinstance(saved, list):
        raise SnapshotError("the snapshot's device section is malformed")
    mappings = machine.devices()
    here = [(_key(m.bus, m.base), m.device.name) for m in mappings]
    there = [(str(entry.get("at")), str(entry.get("name"))) for entry in saved if isinstance(entry, dict)]
    if here != there:
        first = next((i for i, pair in enumerate(zip(here, there, strict=False)) if pair[0] != pair[1]), None)
        if first is None:
            detail = f"{len(there)} saved, {len(here)} here"
        else:
            detail = (
                f"saved {there[first][1]} at {there[first][0]}, here {here[first][1]} at {here[first][0]}"
            )
        raise SnapshotError(f"the snapshot's devices differ from this machine's: {detail}")
    for mapping, entry in zip(mappings, saved, strict=True):
        try:
            mapping.device.load_state(entry["state"])
        except (VmscopeError, KeyError, TypeError, ValueError) as error:
            raise SnapshotError(f"device {mapping.device.name}: saved state not accepted: {error}") from None
