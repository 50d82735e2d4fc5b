"""Start a machine from a snapshot: check everything first, then build, then load state.

Nothing runs and no device is created before the snapshot's header, checksums, version, RAM
file size and disk images have been checked; the host's CPUID is checked against the saved
table as soon as the vCPUs exist. Order of loading: device models (a device that re-asserts
its interrupt line does so before the saved interrupt controller state overwrites the
controller), then the VM's PIT, clock and interrupt controllers, then each vCPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmscope.errors import ConfigError, SnapshotError
from vmscope.snapshot import format as snapshot_format
from vmscope.snapshot.device_state import apply_devices
from vmscope.snapshot.disks import check_disk
from vmscope.snapshot.kvm_state import apply_vcpu, apply_vm, missing_cpu_features
from vmscope.snapshot.memory_file import map_memory_file
from vmscope.vmm.assemble import assemble_machine
from vmscope.vmm.config import MachineConfig
from vmscope.vmm.machine import Machine
from vmscope.vmm.virtio_setup import parse_disk_spec

log = logging.getLogger("vmscope.snapshot")


@dataclass(frozen=True)
class BackendOverrides:
    """Backends to use instead of the snapshot's (None / empty: keep the snapshot's)."""

    serial: str | None = None
    console: str | None = None
    #: full --disk specs, one per disk of the snapshot, in order
    disks: Sequence[str] = ()
    #: full --net specs, one per network device of the snapshot, in order
    nets: Sequence[str] = ()


def _with_overrides(config: MachineConfig, overrides: BackendOverrides) -> MachineConfig:
    changes: dict[str, Any] = {}
    if overrides.serial is not None:
        changes["serial"] = overrides.serial
    if overrides.console is not None:
        if config.console is None:
            raise SnapshotError("--console: the snapshot's machine has no virtio-console to redirect")
        changes["console"] = overrides.console
    for name, given, saved in (("disk", overrides.disks, config.disks), ("net", overrides.nets, config.nets)):
        if given and len(given) != len(saved):
            raise SnapshotError(
                f"--{name}: the snapshot's machine has {len(saved)} {name} device(s), {len(given)} given"
            )
    if overrides.disks:
        changes["disks"] = tuple(overrides.disks)
    if overrides.nets:
        changes["nets"] = tuple(overrides.nets)
    return config._replace(**changes)


def read_snapshot_config(path: Path) -> tuple[MachineConfig, dict[str, Any]]:
    """The checked sections and the machine configuration they hold."""
    sections = snapshot_format.read_state(path)
    try:
        config = MachineConfig.from_json(sections["config"])
    except (ConfigError, TypeError) as error:
        raise SnapshotError(f"{path}: {error}") from None
    return config, sections


def restore_machine(path: str | Path, overrides: BackendOverrides = BackendOverrides()) -> Machine:
    """A machine in the state the snapshot at ``path`` recorded, ready to start()."""
    snapshot = Path(path)
    config, sections = read_snapshot_config(snapshot)
    config = _with_overrides(config, overrides)
    try:
        recorded_disks = list(sections["devices"]["disks"])
        vcpu_states = list(sections["vcpus"])
    except (KeyError, TypeError):
        raise SnapshotError(f"{snapshot}: the snapshot's device or vCPU section is malformed") from None
    if len(recorded_disks) != len(config.disks) or len(vcpu_states) != config.cpus:
        raise SnapshotError(f"{snapshot}: the snapshot's sections disagree with its machine configuration")
    for spec, recorded in zip(config.disks, recorded_disks, strict=True):
        check_disk(parse_disk_spec(spec).path, recorded)
    memory = map_memory_file(snapshot_format.memory_path(snapshot), sections["memory"])
    try:
        machine = assemble_machine(config, memory=memory)
    except BaseException:
        memory.close()
        raise
    try:
        for vcpu, state in zip(machine.vcpus, vcpu_states, strict=True):
            missing = missing_cpu_features(state.get("cpuid", []), vcpu.get_cpuid())
            if missing:
                names = ", ".join(missing)
                raise SnapshotError(
                    f"{snapshot}: this host lacks CPU feature(s) the snapshot's guest may use: {names}"
                )
        apply_devices(machine, sections["devices"]["devices"])
        apply_vm(machine.vm, sections["vm"])
        for vcpu, state in zip(machine.vcpus, vcpu_states, strict=True):
            apply_vcpu(vcpu, state)
        image = Path(config.guest_image) if config.guest_image else None
        machine.adopt_restored_guest(
            kind=config.guest_kind, symbol_file=image if image is not None and image.is_file() else None
        )
    except BaseException:
        machine.close()
        raise
    log.info("restored %s: %d vCPU(s), %d MiB", snapshot, config.cpus, config.mem >> 20)
    return machine
