"""vmscope: a KVM virtual machine monitor in Python that shows where every cycle of a VM goes."""

__version__ = "0.1.0"
