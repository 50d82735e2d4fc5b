"""Real-KVM tests: they use /dev/kvm and skip, with the reason, only where it is unusable."""

from __future__ import annotations

import os

import pytest

from vmscope.errors import KvmUnavailableError


def _kvm_unusable_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist on this machine"
    try:
        from vmscope.kvm import Kvm

        Kvm().close()
    except KvmUnavailableError as error:
        return str(error)
    return None


_REASON = _kvm_unusable_reason()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/kvm/" in str(item.fspath):
            item.add_marker(pytest.mark.kvm)
            if _REASON is not None:
                item.add_marker(pytest.mark.skip(reason=f"needs KVM: {_REASON}"))
