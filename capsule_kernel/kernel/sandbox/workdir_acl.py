"""Let the sandbox's unprivileged uid reach what it is shown (POSIX ACL entries).

Runs in the KERNEL, only when the kernel is root: its sandbox runs as an
unprivileged uid, which cannot write a working directory that belongs to
root. Rather than running the sandbox as root (which owns every file it can
see), the kernel adds one ACL entry for that uid to the directory (and the
same default entry, so that subdirectories made later inherit it). Files
that existed before stay as they were: the sandbox may create, rename and
delete files there, and rewrite the ones it created.

bubblewrap also sets up its mounts as that uid, so it must be able to walk
to every directory it binds (a root kernel's Python often lives under
/root, mode 0700). The kernel gives the uid search permission (``--x``: pass
through, neither list nor read) on each such ancestor. Inside the sandbox
those ancestors are bubblewrap's own empty directories; no host process
runs as the sandbox's uid, so the entries reveal nothing.

An ACL is stored in the ``system.posix_acl_access`` / ``system.posix_acl_default``
extended attributes as a little-endian header and entries (Linux's
``posix_acl_xattr`` layout), which is all this module reads and writes.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

_HEADER = struct.Struct("<I")  # a_version
_ENTRY = struct.Struct("<HHI")  # e_tag, e_perm, e_id
_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_UNDEFINED = 0xFFFFFFFF
_RWX = 7


def _parse(raw: bytes) -> dict[tuple[int, int], int]:
    if len(raw) < _HEADER.size or _HEADER.unpack_from(raw)[0] != _VERSION:
        return {}
    entries = {}
    for offset in range(_HEADER.size, len(raw) - _ENTRY.size + 1, _ENTRY.size):
        tag, perm, ident = _ENTRY.unpack_from(raw, offset)
        entries[(tag, ident)] = perm
    return entries


def _encode(entries: dict[tuple[int, int], int]) -> bytes:
    return _HEADER.pack(_VERSION) + b"".join(
        _ENTRY.pack(tag, perm, ident) for (tag, ident), perm in sorted(entries.items())
    )


def _with_user(
    entries: dict[tuple[int, int], int], mode: int, uid: int, perm: int = _RWX
) -> dict[tuple[int, int], int]:
    entries = dict(entries)
    entries.setdefault((_USER_OBJ, _UNDEFINED), (mode >> 6) & 7)
    entries.setdefault((_GROUP_OBJ, _UNDEFINED), (mode >> 3) & 7)
    entries.setdefault((_OTHER, _UNDEFINED), mode & 7)
    entries[(_USER, uid)] = perm
    # The mask caps every named entry and the owning group: the union of them.
    group_class = [perm for (tag, _), perm in entries.items() if tag in (_USER, _GROUP, _GROUP_OBJ)]
    entries[(_MASK, _UNDEFINED)] = 0
    for perm in group_class:
        entries[(_MASK, _UNDEFINED)] |= perm
    return entries


def _add(directory: Path, uid: int, perm: int, *, inherit: bool) -> None:
    info = directory.stat()
    names = ["system.posix_acl_access"] + (["system.posix_acl_default"] if inherit else [])
    for name in names:
        try:
            current = _parse(os.getxattr(directory, name))
        except OSError:
            current = {}
        wanted = _with_user(current, info.st_mode, uid, perm | current.get((_USER, uid), 0))
        if current != wanted:
            os.setxattr(directory, name, _encode(wanted))


def _may_search(info: os.stat_result, uid: int, directory: Path) -> bool:
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_mode & stat.S_IXOTH:
        return True
    try:
        entries = _parse(os.getxattr(directory, "system.posix_acl_access"))
    except OSError:
        return False
    return bool(entries.get((_USER, uid), 0) & entries.get((_MASK, _UNDEFINED), _RWX) & 1)


def ensure_passage(path: Path, uid: int) -> list[Path]:
    """Search permission for uid on every ancestor of path it cannot pass; returns those changed."""
    changed = []
    for ancestor in reversed(path.parents):
        try:
            info = ancestor.stat()
            if not _may_search(info, uid, ancestor):
                _add(ancestor, uid, 1, inherit=False)
                changed.append(ancestor)
        except OSError:
            break
    return changed


def grant(directory: Path, uid: int, *, writable: bool = True) -> str:
    """Give uid rwx (or r-x) on directory, and by default on what is made in it; say what happened."""
    try:
        info = directory.stat()
    except OSError as err:
        return f"not accessible: {err.strerror}"
    if not stat.S_ISDIR(info.st_mode):
        return "not a directory"
    if info.st_uid == uid:
        return "owned by the sandbox's uid"
    perm = _RWX if writable else 5
    try:
        _add(directory, uid, perm, inherit=True)
    except OSError as err:
        return f"not usable by the sandbox: cannot add an ACL entry for uid {uid} ({err.strerror})"
    return f"{'read-write' if writable else 'readable'} through an ACL entry for uid {uid}"
