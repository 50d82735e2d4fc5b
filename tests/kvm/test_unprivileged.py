"""vmscope as an ordinary user with access to /dev/kvm through group kvm: the demo guest, a
virtio-blk guest and `record` work, and the files vmscope creates with guest data are owner-only.

Root only (it creates the user, and gives group kvm /dev/kvm for the duration); skipped otherwise."""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = str(ROOT / "src")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creating a user and granting /dev/kvm needs root")


def _make_traversable(path: Path, restore: list[tuple[Path, int]]) -> None:
    """Let others traverse every directory above ``path`` (the interpreter may live under /root)."""
    for directory in [*reversed(path.parents)]:
        mode = stat.S_IMODE(directory.stat().st_mode)
        if not mode & stat.S_IXOTH:
            restore.append((directory, mode))
            directory.chmod(mode | stat.S_IXOTH)


@pytest.fixture(scope="module")
def kvm_user() -> Iterator[str]:
    name = f"vmscope-{uuid.uuid4().hex[:8]}"
    created_group = False
    try:
        grp.getgrnam("kvm")
    except KeyError:
        subprocess.run(["groupadd", "--system", "kvm"], check=True)
        created_group = True
    kvm_device = os.stat("/dev/kvm")
    restore: list[tuple[Path, int]] = []
    subprocess.run(["useradd", "--create-home", "--groups", "kvm", "--shell", "/bin/sh", name], check=True)
    try:
        os.chown("/dev/kvm", -1, grp.getgrnam("kvm").gr_gid)
        os.chmod("/dev/kvm", stat.S_IMODE(kvm_device.st_mode) | stat.S_IRGRP | stat.S_IWGRP)
        _make_traversable(Path(sys.executable).resolve(), restore)
        _make_traversable(ROOT / "src", restore)
        yield name
    finally:
        os.chown("/dev/kvm", -1, kvm_device.st_gid)
        os.chmod("/dev/kvm", stat.S_IMODE(kvm_device.st_mode))
        for directory, mode in reversed(restore):
            directory.chmod(mode)
        subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)
        if created_group:
            subprocess.run(["groupdel", "kvm"], check=False)


def as_user(user: str, *arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    home = pwd.getpwnam(user).pw_dir
    return subprocess.run(
        ["runuser", "-u", user, "--", "env", f"PYTHONPATH={SRC}", f"HOME={home}", "PATH=/usr/bin:/bin",
         sys.executable, "-m", "vmscope", *arguments],
        capture_output=True, text=True, timeout=300, cwd=cwd,
    )  # fmt: skip


@pytest.fixture
def user_dir(kvm_user: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("unprivileged")
    _make_traversable(directory, [])  # pytest's base directory is root-only
    user = pwd.getpwnam(kvm_user)
    os.chown(directory, user.pw_uid, user.pw_gid)
    return directory


def test_the_demo_guest_runs_as_a_kvm_group_member(kvm_user: str, user_dir: Path) -> None:
    result = as_user(kvm_user, "run", "--cmdline", "iterations=1", cwd=user_dir)
    assert result.returncode == 0, result.stderr
    assert "demo: OK" in result.stdout


def test_virtio_blk_and_record_as_a_kvm_group_member(kvm_user: str, user_dir: Path) -> None:
    disk = user_dir / "disk.img"
    result = as_user(kvm_user, "run", "--cmdline", "iterations=1", "--serial", "none", "--disk", str(disk),
                     "--console", f"file:{user_dir / 'hvc0.log'}", cwd=user_dir)  # fmt: skip
    assert result.returncode == 2 and "no such file" in result.stderr  # the user's own mistake, told plainly
    subprocess.run(["runuser", "-u", kvm_user, "--", "truncate", "-s", "1M", str(disk)], check=True)
    result = as_user(kvm_user, "run", "--cmdline", "iterations=1", "--serial", "none", "--disk", str(disk),
                     "--console", f"file:{user_dir / 'hvc0.log'}", cwd=user_dir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    profile = user_dir / "demo.vmprof"
    result = as_user(kvm_user, "record", "-o", str(profile), "--", "--cmdline", "iterations=1", "--serial",
                     "none", cwd=user_dir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    user = pwd.getpwnam(kvm_user)
    for created in (profile, user_dir / "hvc0.log"):
        info = created.stat()
        assert info.st_uid == user.pw_uid
        assert stat.S_IMODE(info.st_mode) == 0o600, (created, oct(info.st_mode))
