"""vmscope: a KVM virtual machine monitor in Python that shows where every cycle of a VM goes.

The public API::

    import vmscope

    vm = vmscope.Machine(mem="256M", cpus=2)
    vmscope.install_platform_devices(vm, serial="stdio")
    vm.load("guest.elf", cmdline="console=ttyS0")
    result = vm.run()

See ``examples/`` for custom devices, exit hooks and profiling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmscope.lazy_exports import lazy_exports
from vmscope.version import __version__

__all__ = [
    "Device",
    "ExitEvent",
    "InterruptLine",
    "Machine",
    "ProfileRecorder",
    "RunResult",
    "VmscopeError",
    "__version__",
    "install_platform_devices",
]

EXPORTS = {
    "Device": "vmscope.devices.base",
    "InterruptLine": "vmscope.devices.base",
    "ExitEvent": "vmscope.vmm.hooks",
    "Machine": "vmscope.vmm.machine",
    "RunResult": "vmscope.vmm.machine",
    "ProfileRecorder": "vmscope.profiler.recorder",
    "VmscopeError": "vmscope.errors",
    "install_platform_devices": "vmscope.vmm.platform",
}

if TYPE_CHECKING:
    from vmscope.devices.base import Device, InterruptLine
    from vmscope.errors import VmscopeError
    from vmscope.profiler.recorder import ProfileRecorder
    from vmscope.vmm.hooks import ExitEvent
    from vmscope.vmm.machine import Machine, RunResult
    from vmscope.vmm.platform import install_platform_devices


# imported on first use, so that `import vmscope` stays cheap for the CLI
__getattr__ = lazy_exports(__name__, EXPORTS)
