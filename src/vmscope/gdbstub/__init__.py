"""GDB remote serial protocol stub for x86-64 guests (``vmscope run --gdb tcp:HOST:PORT``)."""

from vmscope.gdbstub.stub import DEFAULT_ADDRESS, GdbStub, attach_gdb_stub, parse_gdb_spec

__all__ = ["DEFAULT_ADDRESS", "GdbStub", "attach_gdb_stub", "parse_gdb_spec"]
