"""Test-suite plugins: ``--guest-support-results FILE`` records how each test marked
``guest_support`` ended and on which KVM backend, for tools/guest_support_table.py."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

_RESULTS_KEY = pytest.StashKey[dict[str, str]]()
_RANK = {"failed": 3, "skipped": 2, "passed": 1}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--guest-support-results", metavar="FILE", default=None,
        help="merge the outcomes of tests marked guest_support into this JSON file",
    )  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULTS_KEY] = {}


def kvm_backend() -> str:
    """kvm_intel, kvm_amd or kvm_pvm: which module provides /dev/kvm here."""
    for module in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if Path(f"/sys/module/{module}").exists():
            return module
    return "no KVM"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()
    if item.get_closest_marker("guest_support") is None:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        test = f"{item.nodeid.split('::')[0]}::{getattr(item, 'originalname', item.name)}"
        results = item.config.stash[_RESULTS_KEY]
        # a parametrized test counts as its worst case
        if _RANK[report.outcome] > _RANK.get(results.get(test, ""), 0):
            results[test] = report.outcome


def pytest_sessionfinish(session: pytest.Session) -> None:
    target = session.config.getoption("--guest-support-results")
    results = session.config.stash.get(_RESULTS_KEY, {})
    if not target or not results:
        return
    path = Path(target)
    data = json.loads(path.read_text()) if path.is_file() else {"tests": {}}
    backend = kvm_backend()
    for test, outcome in results.items():
        data["tests"][test] = {"outcome": outcome, "backend": backend}
    data["tests"] = dict(sorted(data["tests"].items()))
    path.write_text(json.dumps(data, indent=1) + "\n")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs mounted under tmp_path (needs root): a filesystem a test can fill up."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
