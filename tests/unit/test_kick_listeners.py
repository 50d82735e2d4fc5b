"""The kick-listener registry each vCPU runner owns."""

from __future__ import annotations

from typing import Any, cast

from vmscope.vmm.kick_listeners import KickListeners, kick_listeners


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


def test_active_change_is_told_on_first_add_and_last_remove() -> None:
    changes: list[bool] = []
    registry = KickListeners(on_active_change=changes.append)
    listener = lambda runner: None  # noqa: E731
    registry.add(listener)
    registry.add(listener)
    registry.remove(listener)
    assert changes == [True]
    registry.remove(listener)
    assert changes == [True, False]


class OwningRunner:
    """Owns its registry, as VcpuRunner does."""

    def __init__(self) -> None:
        self.kick_listeners = KickListeners()


def test_a_runner_that_owns_a_registry_gets_its_own() -> None:
    runner = OwningRunner()
    assert kick_listeners(cast(Any, runner)) is runner.kick_listeners
