"""Who hears that a sampling kick brought a vCPU out of KVM_RUN: a registry, not one slot.

The profiler's recorder listens for kicks to take time samples; the control socket asks whether
anyone listens before it starts a second profile; a kernel-aware unwinder or a live ``top`` may
want to listen as well. :class:`KickListeners` keeps any number of listeners, copy-on-write, so
the vCPU thread iterates a tuple without a lock while another thread adds or removes one.

Until :class:`vmscope.vmm.runner.VcpuRunner` owns a registry itself, :func:`kick_listeners` puts
the registry in the runner's ``on_kick`` slot while it has listeners (``KickListeners`` is callable
with the runner, exactly what that slot calls) and empties the slot when the last one leaves, so
the runner behaves as before: no listener, no per-kick work. Once the runner has
``self.kick_listeners = KickListeners()`` and calls ``if self.kick_listeners: ...
self.kick_listeners(self)``, :func:`kick_listeners` returns that registry and nothing else changes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmscope.vmm.runner import VcpuRunner

KickListener = Callable[["VcpuRunner"], None]


class KickListeners:
    """Listeners called, in the order added, with the runner a sampling kick interrupted."""

    def __init__(self, on_active_change: Callable[[bool], None] | None = None) -> None:
        self._listeners: tuple[KickListener, ...] = ()
        self._lock = threading.Lock()
        #: told True when the first listener arrives and False when the last one leaves
        self._on_active_change = on_active_change

    def add(self, listener: KickListener) -> None:
        with self._lock:
            self._listeners = (*self._listeners, listener)
            became_active = len(self._listeners) == 1
        if became_active and self._on_active_change is not None:
            self._on_active_change(True)

    def remove(self, listener: KickListener) -> None:
        """Remove one registration of ``listener`` (a bound method compares equal to itself)."""
        with self._lock:
            listeners = list(self._listeners)
            if listener not in listeners:
                return
            listeners.remove(listener)
            self._listeners = tuple(listeners)
            became_idle = not listeners
        if became_idle and self._on_active_change is not None:
            self._on_active_change(False)

    def __bool__(self) -> bool:
        return bool(self._listeners)

    def __len__(self) -> int:
        return len(self._listeners)

    def __call__(self, runner: VcpuRunner) -> None:
        for listener in self._listeners:  # a snapshot: changes apply from the next kick
            listener(runner)


def kick_listeners(runner: VcpuRunner) -> KickListeners:
    """The kick-listener registry of ``runner`` (see the module docstring)."""
    owned = getattr(runner, "kick_listeners", None)
    if isinstance(owned, KickListeners):
        return owned
    current = runner.on_kick
    if isinstance(current, KickListeners):
        return current

    def occupy_slot(active: bool) -> None:
        runner.on_kick = registry if active else None

    registry = KickListeners(on_active_change=occupy_slot)
    if current is not None:  # a listener set directly on the slot keeps being called
        registry.add(current)
    return registry
