"""Build a machine with its platform and virtio devices from a :class:`MachineConfig`."""

from __future__ import annotations

from vmscope.memory.guest_memory import GuestMemory
from vmscope.vmm.config import MachineConfig
from vmscope.vmm.machine import Machine
from vmscope.vmm.platform import install_platform_devices
from vmscope.vmm.virtio_setup import install_virtio_devices


def assemble_machine(config: MachineConfig, *, memory: GuestMemory | None = None) -> Machine:
    """The machine and its devices, no guest loaded; ``machine.config`` is ``config``.

    Devices are attached in a fixed order (platform, then disks, nets, console, rng), so a
    machine assembled again from the same configuration has the same device layout: what a
    snapshot's device states are matched against.
    """
    machine = Machine(
        mem=config.mem, cpus=config.cpus, cpu_features=config.cpu_features,
        emulate_fallback=config.emulate_fallback, memory=memory,
        coalesce_writes=config.coalesce_writes,
    )  # fmt: skip
    try:
        machine.config = config
        install_platform_devices(machine, serial=config.serial, debug_exit_port=config.debug_exit_port)
        install_virtio_devices(
            machine, disks=config.disks, nets=config.nets, console=config.console, rng=config.rng,
            iothreads=config.iothreads, default_transport=config.default_transport,
        )  # fmt: skip
    except BaseException:
        machine.close()
        raise
    return machine
