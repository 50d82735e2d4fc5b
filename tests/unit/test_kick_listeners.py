"""The kick-listener registry, and how it sits in a runner's on_kick slot until the runner owns one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from vmscope.vmm.kick_listeners import KickListeners, kick_listeners


class SlotRunner:
    """Has only the runner's single ``on_kick`` slot, as VcpuRunner does today."""

    def __init__(self) -> None:
        self.on_kick: Callable[[Any], None] | None = None

    def kick(self) -> None:  # what the runner does after a kicked KVM_RUN
        if self.on_kick is not None:
            self.on_kick(self)


class OwningRunner:
    """A runner that owns its registry (the planned VcpuRunner)."""

    def __init__(self) -> None:
        self.on_kick = None
        self.kick_listeners = KickListeners()


def test_listeners_are_called_in_order_and_removed_one_at_a_time() -> None:
    calls: list[str] = []
    registry = KickListeners()
    first, second = (lambda runner: calls.append("first")), (lambda runner: calls.append("second"))
    registry.add(first)
    registry.add(second)
    registry(cast(Any, None))
    assert calls == ["first", "second"] and len(registry) == 2
    registry.remove(first)
    registry.remove(first)  # not there any more: nothing happens
    registry(cast(Any, None))
    assert calls == ["first", "second", "second"]
    registry.remove(second)
    assert not registry


def test_registry_occupies_the_slot_only_while_it_has_listeners() -> None:
    runner = SlotRunner()
    seen: list[object] = []
    registry = kick_listeners(cast(Any, runner))
    assert not registry and runner.on_kick is None
    registry.add(seen.append)
    assert runner.on_kick is registry and kick_listeners(cast(Any, runner)) is registry
    runner.kick()
    assert seen == [runner]
    kick_listeners(cast(Any, runner)).remove(seen.append)
    assert runner.on_kick is None
    runner.kick()
    assert seen == [runner]


def test_a_listener_already_in_the_slot_keeps_being_called() -> None:
    runner = SlotRunner()
    calls: list[str] = []
    runner.on_kick = lambda r: calls.append("direct")
    kick_listeners(cast(Any, runner)).add(lambda r: calls.append("added"))
    runner.kick()
    assert calls == ["direct", "added"]


def test_a_runner_that_owns_a_registry_gets_its_own() -> None:
    runner = OwningRunner()
    assert kick_listeners(cast(Any, runner)) is runner.kick_listeners
