"""What a machine is made of, as plain data: enough to build the same machine again.

The CLI turns its options into a :class:`MachineConfig` and builds the machine from it
(:func:`vmscope.vmm.assemble.assemble_machine`); a snapshot stores it, so a restore needs no
options. Backends (serial and console specs, disk paths, network links) are part of it and
may be overridden on restore.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from vmscope.errors import ConfigError


class MachineConfig(NamedTuple):
    """Machine size, CPU model, devices and their backends, and which guest was booted.

    A NamedTuple, not a dataclass (start-up time): change fields with ``_replace``; it compares
    equal to a plain tuple of the same values, and :meth:`to_json` (not ``json.dumps(config)``,
    which would write a list) is its JSON form.
    """

    mem: int
    cpus: int = 1
    cpu_features: str = ""
    serial: str = "stdio"
    debug_exit_port: int | None = 0xF4
    #: --disk / --net specs, in attachment order
    disks: tuple[str, ...] = ()
    nets: tuple[str, ...] = ()
    console: str | None = None
    rng: bool = False
    iothreads: bool = True
    #: virtio transport where a spec names none ("mmio" or "pci")
    default_transport: str = "mmio"
    #: complete in vmscope the instructions the host's KVM cannot emulate (vmm.fallback)
    emulate_fallback: bool = True
    #: let KVM queue unclaimed and side-effect-free writes in its coalesced ring (vmm.coalescing)
    coalesce_writes: bool = True
    #: the booted image (symbols for reports and profiles; not loaded again on restore)
    guest_image: str | None = None
    guest_kind: str = ""
    cmdline: str = ""
    #: extra symbol files given with --symbols
    symbols: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = self._asdict()
        for name in ("disks", "nets", "symbols"):
            data[name] = list(data[name])
        return data

    @classmethod
    def from_json(cls, data: object) -> MachineConfig:
        """The inverse of :meth:`to_json`; a wrong field is a ConfigError naming it."""
        if not isinstance(data, dict):
            raise ConfigError("machine configuration: expected a JSON object")
        unknown = sorted(set(data) - set(cls._fields))
        if unknown:
            raise ConfigError(f"machine configuration: unknown field(s) {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name in ("disks", "nets", "symbols"):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"machine configuration: {name} must be a list of strings")
                value = tuple(value)
            values[name] = value
        if not isinstance(values.get("mem"), int) or not isinstance(values.get("cpus", 1), int):
            raise ConfigError("machine configuration: mem and cpus must be integers")
        return cls(**values)
