"""Mounts held open from the moment they are checked: what was checked is what bubblewrap binds.

Runs in the KERNEL. A mount is named by a path (the operator's fs_access, a
``%capsule mount``, a task's ``--mount``), and the path may lie where a
sandbox can write: between the check against the operator's policy and the
launch of a sandbox (a task waiting for a slot, a restart much later), a cell
can replace ``cwd/sub`` by a symbolic link to a directory it was never
allowed. So a mount is opened once, when it is checked: the path is resolved,
then walked again from ``/`` one component at a time with ``O_NOFOLLOW``
(a component that became a link since is refused), and the ``O_PATH``
descriptor that walk ends on is kept. The policy check runs on that
resolved path; every later launch binds a copy of that descriptor
(``--bind-fd``) and sets ACLs through it (``/proc/self/fd/N``), never the
path again.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

# Distinct mount directories one kernel holds open at most (each is one descriptor).
MAX_HELD = 256
_WALK = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC


class MountRefused(OSError):
    """The path is not a directory reachable without following a link (now)."""


def open_directory(path: Path) -> tuple[Path, int]:
    """(resolved path, O_PATH descriptor) of a directory, walked from / with no link followed."""
    try:
        resolved = Path(os.path.realpath(path, strict=True))
    except OSError as err:
        raise MountRefused(f"{path}: {err.strerror or err}") from None
    fd = os.open("/", _WALK)
    try:
        for part in resolved.parts[1:]:
            try:
                step = os.open(part, _WALK, dir_fd=fd)
            except OSError:
                raise MountRefused(
                    f"{path}: {part!r} changed while it was being opened (a link or not a directory now)"
                ) from None
            os.close(fd)
            fd = step
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise MountRefused(f"{path} is not a directory")
    except BaseException:
        os.close(fd)
        raise
    return resolved, fd


def names_held(path: Path, fd: int) -> bool:
    """The path (its last component not followed) still names the held directory."""
    try:
        now, held = os.lstat(path), os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISDIR(now.st_mode) and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def fd_path(fd: int) -> str:
    """A path that reaches the descriptor's own inode (for setxattr and the like), whatever its name is now."""
    return f"/proc/self/fd/{fd}"


class HeldMounts:
    """The kernel's open mount directories, by resolved path."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def hold(self, path: Path) -> Path:
        """Open the directory now (see the module's docstring); return the resolved path it is held under."""
        resolved, fd = open_directory(path)
        key = str(resolved)
        if key in self._fds:
            os.close(self._fds[key])  # the newer open is the one just checked
        elif len(self._fds) >= MAX_HELD:
            os.close(fd)
            raise MountRefused(f"{path}: this kernel already holds {MAX_HELD} mounts open")
        self._fds[key] = fd
        return resolved

    def fd(self, path: str | Path) -> int | None:
        return self._fds.get(str(path))

    def release(self, path: str | Path) -> None:
        fd = self._fds.pop(str(path), None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        for key in list(self._fds):
            self.release(key)
