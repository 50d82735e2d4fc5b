"""Package attributes imported on first use (PEP 562), so importing a package stays cheap.

A package lists its public names and the module each lives in; ``import vmscope.virtio`` then
loads nothing until a name is read. Start-up matters: `vmscope run` must not import the device
models a guest does not have (issue 15).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps each public name to the module
    (absolute, or relative to the package with a leading dot) that defines it."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module, package), name)

    return __getattr__
