"""Reading a device's saved state back: typed, range-checked field access.

A device's :meth:`~vmscope.devices.base.Device.save_state` returns plain JSON-able data (ints,
strings, bools, lists, dicts; bytes as hex strings). Loading goes through a :class:`StateReader`,
so every device checks its fields the same way and a bad or missing one raises
:class:`~vmscope.errors.DeviceStateError` naming the device and the field. A state may come from
a file, so it is treated like guest input: nothing in it is trusted.
"""

from __future__ import annotations

from collections.abc import Mapping

from vmscope.errors import DeviceStateError


class StateReader:
    """Typed access to the fields of one device's saved state (``device`` names it in errors)."""

    def __init__(self, device: str, state: object, *, prefix: str = "") -> None:
        self.device = device
        self._prefix = prefix
        if not isinstance(state, Mapping):
            problem = f"expected a mapping, not {type(state).__name__}"
            raise DeviceStateError(device, prefix or "<state>", problem)
        self._state: Mapping[str, object] = state

    def _path(self, field: str) -> str:
        return f"{self._prefix}.{field}" if self._prefix else field

    def error(self, field: str, problem: str) -> DeviceStateError:
        return DeviceStateError(self.device, self._path(field), problem)

    def raw(self, field: str) -> object:
        if field not in self._state:
            raise self.error(field, "missing")
        return self._state[field]

    def integer(self, field: str, minimum: int = 0, maximum: int | None = None) -> int:
        """An int in [minimum, maximum] (bools are refused: they are a different field type)."""
        return self._checked_integer(self._path(field), self.raw(field), minimum, maximum)

    def _checked_integer(self, path: str, value: object, minimum: int, maximum: int | None) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise DeviceStateError(self.device, path, f"expected an integer, not {type(value).__name__}")
        if value < minimum or (maximum is not None and value > maximum):
            upper = "" if maximum is None else f" to {maximum:#x}"
            raise DeviceStateError(self.device, path, f"{value:#x} is out of range {minimum:#x}{upper}")
        return value

    def optional_integer(self, field: str, minimum: int = 0, maximum: int | None = None) -> int | None:
        if self.raw(field) is None:
            return None
        return self.integer(field, minimum, maximum)

    def flag(self, field: str) -> bool:
        value = self.raw(field)
        if not isinstance(value, bool):
            raise self.error(field, f"expected true or false, not {type(value).__name__}")
        return value

    def text(self, field: str) -> str:
        value = self.raw(field)
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, not {type(value).__name__}")
        return value

    def hex_bytes(self, field: str, length: int | None = None, max_length: int | None = None) -> bytes:
        """Bytes saved as a hex string, of exactly ``length`` or at most ``max_length`` bytes."""
        text = self.text(field)
        try:
            data = bytes.fromhex(text)
        except ValueError:
            raise self.error(field, "not a hex string") from None
        if length is not None and len(data) != length:
            raise self.error(field, f"{len(data)} bytes, expected {length}")
        if max_length is not None and len(data) > max_length:
            raise self.error(field, f"{len(data)} bytes, more than {max_length}")
        return data

    def integers(
        self,
        field: str,
        *,
        minimum: int = 0,
        maximum: int | None = None,
        count: int | None = None,
        max_count: int | None = None,
    ) -> list[int]:
        """A list of ints, each in range, of exactly ``count`` or at most ``max_count`` entries."""
        path = self._path(field)
        return [
            self._checked_integer(f"{path}[{index}]", value, minimum, maximum)
            for index, value in enumerate(self._list(field, count, max_count))
        ]

    def mapping(self) -> Mapping[str, object]:
        """The fields themselves, for handing a nested state to another object's ``load_state``."""
        return self._state

    def section(self, field: str) -> StateReader:
        """A nested mapping, read with the same checks."""
        return StateReader(self.device, self.raw(field), prefix=self._path(field))

    def sections(
        self, field: str, *, count: int | None = None, max_count: int | None = None
    ) -> list[StateReader]:
        return [
            StateReader(self.device, entry, prefix=f"{self._path(field)}[{index}]")
            for index, entry in enumerate(self._list(field, count, max_count))
        ]

    def _list(self, field: str, count: int | None, max_count: int | None) -> list[object]:
        value = self.raw(field)
        if not isinstance(value, list):
            raise self.error(field, f"expected a list, not {type(value).__name__}")
        if count is not None and len(value) != count:
            raise self.error(field, f"{len(value)} entries, expected {count}")
        if max_count is not None and len(value) > max_count:
            raise self.error(field, f"{len(value)} entries, more than {max_count}")
        return value

    def expect(self, field: str, expected: object) -> None:
        """A field that describes the device's configuration: it must match this device's."""
        value = self.raw(field)
        if value != expected:
            raise self.error(field, f"{value!r} does not match this device's {expected!r}")

    def expect_empty(self) -> None:
        """For a device without state: any field is one this device does not have."""
        for field in self._state:
            raise self.error(str(field), "this device has no state")
