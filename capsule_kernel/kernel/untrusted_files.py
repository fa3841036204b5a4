"""Reading and writing files where a sandbox can write, from the TRUSTED side (kernel, runner, engine).

The notebook's working directory, writable mounts and a sandbox's spool are
the sandbox's to change at any instant: any name there may be a symbolic link
to a file of the user's, a FIFO that blocks whoever opens it, or a file far
larger than it looked. Trusted code reaches them only through this module:

- ``read_regular`` opens once without following a link and without blocking,
  checks on that descriptor that it is a regular file no larger than the
  caller's limit, and reads at most that much: what was checked is what is read.
- ``TrustedDirectory`` opens a directory once, while its path is still the
  user's (before a sandbox runs), and then writes into that directory's inode
  through the descriptor: a new temporary file (``O_EXCL | O_NOFOLLOW``),
  fsynced, renamed over the name. A link the sandbox put in the name's place
  is replaced, never followed; a directory swapped in the path's place is
  never written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

# The largest config file (capsule.toml, pyproject.toml) the kernel reads where a sandbox can write.
MAX_CONFIG_BYTES = 1 << 20

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UntrustedFile(OSError):
    """A name that is not a regular file within the limit (a link, a FIFO, a directory, too large)."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_regular(path: str | os.PathLike[str], limit: int, *, dir_fd: int | None = None) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; UntrustedFile (or OSError) otherwise."""
    try:
        fd = os.open(path, _READ, dir_fd=dir_fd)
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW: the last component is a symbolic link
            raise UntrustedFile(f"{path} is a symbolic link: not read") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UntrustedFile(f"{path} is {_kind(info.st_mode)}: not read")
        if info.st_size > limit:
            raise UntrustedFile(f"{path} holds {info.st_size} bytes, over the {limit} this reader takes")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:  # it grew after the fstat
            raise UntrustedFile(f"{path} grew past the {limit} bytes this reader takes")
        return data
    finally:
        os.close(fd)


def is_regular(path: str | os.PathLike[str]) -> bool:
    """The name itself (not what a link points to) is a regular file."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


class TrustedDirectory:
    """A directory opened once by its path (trusted then); later reads and writes go through the descriptor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def __enter__(self) -> TrustedDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return False
        return True

    def read(self, name: str, limit: int) -> bytes:
        return read_regular(name, limit, dir_fd=self.fd)

    def write(self, name: str, data: bytes) -> None:
        """Replace `name` by a new regular file holding data (never through what is at `name` now)."""
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"{name!r} is not a file name")
        temporary = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(temporary, _CREATE, 0o666, dir_fd=self.fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=self.fd)
            raise
        os.close(fd)
        try:
            os.replace(temporary, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=self.fd)
            raise
        with contextlib.suppress(OSError):
            os.fsync(self.fd)
