"""Snapshots: save a paused machine's complete state and start a new process from it.

A snapshot is a directory: ``state`` (a header and checksummed JSON sections: machine
configuration, KVM VM and vCPU state, device state) and ``memory`` (guest RAM, sparse: zero
pages are holes). See :mod:`vmscope.snapshot.format`, :mod:`.save` and :mod:`.restore`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmscope.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from vmscope.snapshot.restore import restore_machine
    from vmscope.snapshot.save import save_snapshot

__all__ = ["restore_machine", "save_snapshot"]

# imported on first use: a restoring process does not load the saving side
EXPORTS = {"restore_machine": ".restore", "save_snapshot": ".save"}

__getattr__ = lazy_exports(__name__, EXPORTS)
