"""Thin typed KVM bindings: Kvm (system) -> Vm -> Vcpu. The only code that issues ioctls."""

from vmscope.kvm.constants import Cap, ExitReason
from vmscope.kvm.stats import BinaryStats
from vmscope.kvm.system import Kvm, describe_backend, detect_backend
from vmscope.kvm.vcpu import Vcpu
from vmscope.kvm.vm import Vm

__all__ = ["BinaryStats", "Cap", "ExitReason", "Kvm", "Vcpu", "Vm", "describe_backend", "detect_backend"]
