"""What the plain record classes of the start path share instead of dataclasses' generated code.

Defining a dataclass exec()s generated methods (0.5-0.9 ms each in a fresh process), so the
records a plain ``vmscope run`` creates are NamedTuples or plain classes with ``__slots__``; the
latter get their ``__repr__`` here, from their annotated fields in declaration order.
"""

from __future__ import annotations


def record_repr(record: object) -> str:
    """``Name(field=value, ...)`` over the class's annotated fields, as a dataclass prints."""
    cls = type(record)
    fields = ", ".join(f"{name}={getattr(record, name)!r}" for name in cls.__annotations__)
    return f"{cls.__name__}({fields})"
