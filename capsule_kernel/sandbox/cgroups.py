"""A pids cgroup per sandbox, where the OS lets us make one.

RLIMIT_NPROC counts every process of the user and does not bind root at all,
so when the kernel can write to the pids controller (typical in containers
that run Jupyter as root) the process limit is enforced by a cgroup instead.
"""

from __future__ import annotations

import os
from pathlib import Path

_V1_ROOT = Path("/sys/fs/cgroup/pids")
_V2_ROOT = Path("/sys/fs/cgroup")


def _writable_parent() -> Path | None:
    if (_V1_ROOT / "cgroup.procs").exists():
        parent = _V1_ROOT
    elif "pids" in _read(_V2_ROOT / "cgroup.subtree_control").split():
        parent = _V2_ROOT
    else:
        return None
    return parent if os.access(parent, os.W_OK) else None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


class PidsCgroup:
    """One cgroup holding one sandbox and everything it forks."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, name: str) -> PidsCgroup | None:
        parent = _writable_parent()
        if parent is None:
            return None
        path = parent / name
        try:
            path.mkdir(exist_ok=True)
        except OSError:
            return None
        return cls(path)

    def set_max(self, procs: int | None) -> None:
        (self.path / "pids.max").write_text("max" if procs is None else str(procs))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass
