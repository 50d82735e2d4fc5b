"""Packages whose public names are imported on first use: every listed name resolves, and
importing the package alone loads none of the modules behind it."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

LAZY_PACKAGES = [
    "vmscope", "vmscope.profiler", "vmscope.control", "vmscope.virtio", "vmscope.pci", "vmscope.loader",
    "vmscope.memory", "vmscope.snapshot",
]  # fmt: skip


@pytest.mark.parametrize("package_name", LAZY_PACKAGES)
def test_every_public_name_resolves_to_the_module_listed_for_it(package_name: str) -> None:
    package = importlib.import_module(package_name)
    exported = set(package.EXPORTS)
    assert exported == set(package.__all__) - {"__version__"}
    for name, module in package.EXPORTS.items():
        value = getattr(package, name)
        defining = importlib.import_module(module, package_name)
        assert value is getattr(defining, name)


@pytest.mark.parametrize("package_name", LAZY_PACKAGES)
def test_an_unknown_name_is_an_attribute_error_naming_the_package(package_name: str) -> None:
    package = importlib.import_module(package_name)
    with pytest.raises(AttributeError, match=f"{package_name}.*no_such_name"):
        package.no_such_name  # noqa: B018


def test_importing_the_packages_loads_none_of_the_modules_behind_them() -> None:
    code = (
        f"import sys, {', '.join(LAZY_PACKAGES)}\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('vmscope.'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = set(loaded.stdout.split())
    assert modules <= {"vmscope.version", "vmscope.lazy_exports", *LAZY_PACKAGES}


def test_a_submodule_is_still_importable_through_the_package() -> None:
    from vmscope.virtio import iothread

    assert iothread.__name__ == "vmscope.virtio.iothread"
