"""Take a snapshot of a running machine: quiesce, save, then resume or stop.

Quiescing: every vCPU is held outside KVM_RUN (a vCPU is only paused between exits, so no
port or MMIO access is half done), then each virtio I/O thread is stopped and the
notifications it had not served yet are served here, so every request the guest submitted
has completed, its used-ring entry and interrupt included, before any state is read.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmscope.errors import SnapshotError
from vmscope.snapshot import format as snapshot_format
from vmscope.snapshot.device_state import capture_devices
from vmscope.snapshot.disks import disk_identity
from vmscope.snapshot.kvm_state import capture_vcpu, capture_vm
from vmscope.snapshot.memory_file import write_memory_file
from vmscope.vmm.machine import Machine
from vmscope.vmm.virtio_setup import parse_disk_spec

log = logging.getLogger("vmscope.snapshot")


@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot wrote and how long the guest was held for it."""

    path: Path
    state_bytes: int
    memory_bytes: int
    memory_data_bytes: int
    paused_s: float


def _prepare_directory(path: Path) -> None:
    """An empty directory at ``path``; an older snapshot there is replaced, anything else refused."""
    if path.exists():
        if not path.is_dir() or not (snapshot_format.state_path(path).exists() or not any(path.iterdir())):
            raise SnapshotError(f"{path} exists and is not a snapshot directory: choose another path")
        shutil.rmtree(path)
    try:
        path.mkdir(parents=False)
    except OSError as error:
        raise SnapshotError(f"cannot create snapshot directory {path}: {error.strerror}") from None


def save_snapshot(machine: Machine, path: str | Path, *, stop: bool = False) -> SnapshotInfo:
    """Save ``machine`` (running or paused) to the directory ``path``; then resume it as it was,
    or with ``stop`` end the run with status 0."""
    target = Path(path).absolute()
    config = machine.config
    if config is None:
        raise SnapshotError(
            "this machine was not built from a MachineConfig (vmm.assemble); it cannot be saved"
        )
    if not machine.running:
        raise SnapshotError("the VM is not running: nothing to snapshot")
    _prepare_directory(target)
    was_paused = all(runner.pause_requested for runner in machine.runners)
    started = time.monotonic()
    machine.pause()
    io_threads = [attachment.io for attachment in machine.virtio_attachments]
    try:
        for io in io_threads:
            io.quiesce()
        disks = [disk_identity(parse_disk_spec(text).path) for text in config.disks]
        msr_indices = machine.kvm.msr_index_list()
        vcpus = [capture_vcpu(vcpu, msr_indices) for vcpu in machine.vcpus]
        vm_state = capture_vm(machine.vm)
        devices = capture_devices(machine)
        memory = write_memory_file(machine.memory, snapshot_format.memory_path(target))
        sections: dict[str, Any] = {
            "config": config.to_json(),
            "memory": memory,
            "vm": vm_state,
            "vcpus": vcpus,
            "devices": {"disks": disks, "devices": devices},
        }
        state_bytes = snapshot_format.write_state(target, sections)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)  # never leave half a snapshot behind
        for io in io_threads:  # a failed snapshot leaves the guest running, even with stop
            io.start()
        if not was_paused:
            machine.resume()
        raise
    paused_s = time.monotonic() - started
    if stop:
        machine.request_stop(f"stopped after a snapshot to {target}", 0)
    else:
        for io in io_threads:
            io.start()
        if not was_paused:
            machine.resume()
    log.info("snapshot %s: %d bytes of RAM data, guest held %.3f s", target, memory["data_bytes"], paused_s)
    return SnapshotInfo(target, state_bytes, int(memory["size"]), int(memory["data_bytes"]), paused_s)
