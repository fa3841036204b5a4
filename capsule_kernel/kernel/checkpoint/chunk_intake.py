"""Chunks into and out of the store: copied and hashed out of a sandbox's spool, checked, collected as garbage.

A part of CheckpointStore (a mixin over its chunk directory). A spool is the
sandbox's: every file is opened once without following links, its size never
trusted, and a chunk is kept only if its bytes hash to its name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capsule_kernel.protocol.chunks import (
    CHUNK_BYTES,
    chunk_path,
    entry_chunks,
    is_chunk_name,
    sync_directories,
    verify,
)


class ChunkIntake:
    """Chunks copied in from a spool, checked against their names, collected."""

    def adopt(self, spool: Path, entries: Mapping[str, Any]) -> list[str]:
        """Move the chunks a sandbox wrote into its spool into the store; return those that fail.

        The spool is writable by the sandbox, so nothing in it is believed:
        each file is opened without following links, must be a regular file
        of at most one chunk, and is copied (never renamed: the sandbox may
        still hold it open for writing, or have linked it elsewhere) while
        the very bytes written are hashed. A copy whose hash is not its name
        is discarded. Chunks already in the store are kept as they are.

        Before it returns, the directories the new chunks were renamed into
        are fsynced too: the checkpoint row that names them is committed
        next, and after a power loss a row must never outlive its chunks'
        names (SQLite's own commit is FULL-synchronous).
        """
        bad = []
        renamed: set[Path] = set()
        for digest in entry_chunks(entries):
            if not is_chunk_name(digest):
                bad.append(digest)
                continue
            with contextlib.suppress(OSError):
                os.utime(chunk_path(self.chunks, digest))  # recently used: garbage collection keeps it
            # Another adoption may have stored the same chunk meanwhile: look again after a failed copy.
            if self._sound(digest):
                pass
            elif self._copy_in(spool, digest):
                renamed.add(chunk_path(self.chunks, digest).parent)
            elif not self._sound(digest):
                bad.append(digest)
            with contextlib.suppress(OSError):
                chunk_path(spool, digest).unlink()
        sync_directories(renamed)
        return bad

    def _copy_in(self, spool: Path, digest: str) -> bool:
        try:
            handle = os.open(chunk_path(spool, digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return False
        target = chunk_path(self.chunks, digest)
        temporary = target.with_name(f".{digest}.{os.getpid()}.{threading.get_ident()}.adopt")
        try:
            info = os.fstat(handle)
            if not stat.S_ISREG(info.st_mode) or info.st_size > CHUNK_BYTES:
                return False
            if not target.parent.is_dir():
                target.parent.mkdir(parents=True, exist_ok=True)
                sync_directories({self.chunks})  # the new shard's own name
            hasher = hashlib.sha256()
            copied = 0
            with open(temporary, "wb") as out:
                while copied <= CHUNK_BYTES and (block := os.read(handle, 1 << 20)):
                    hasher.update(block)
                    out.write(block)
                    copied += len(block)
                if copied > CHUNK_BYTES or hasher.hexdigest() != digest:
                    return False
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temporary, 0o444)
            os.replace(temporary, target)
            written = target.stat()
            self._verified[digest] = (written.st_dev, written.st_ino, written.st_size)
            return True
        except OSError:
            return False
        finally:
            os.close(handle)
            with contextlib.suppress(OSError):
                temporary.unlink()

    def missing_chunks(self, entries: Mapping[str, Any]) -> list[str]:
        """Chunks named by these entries that are absent or corrupt.

        A chunk file checked once is not read again while it is the same
        file (chunks are written to a new file and renamed, never changed
        in place): a changed list of nine 100 MB arrays re-verifies only
        the array that changed. Restores check every chunk they read anyway.
        """
        return [digest for digest in entry_chunks(entries) if not self._sound(digest)]

    def _sound(self, digest: str) -> bool:
        """The store holds this chunk and its content matches its name (checked once per file)."""
        try:
            info = chunk_path(self.chunks, digest).stat()
        except OSError:
            return False
        identity = (info.st_dev, info.st_ino, info.st_size)
        if self._verified.get(digest) == identity:
            return True
        if not verify(self.chunks, digest):
            return False
        self._verified[digest] = identity
        return True

    def referenced_chunks(self) -> set[str]:
        digests: set[str] = set()
        for (entries,) in self._query("SELECT entries FROM checkpoints"):
            for entry in json.loads(entries).values():
                digests.update(entry.get("pickle", []))
                for buffer in entry.get("buffers", []):
                    digests.update(buffer)
        return digests

    def collect_garbage(self, grace_seconds: float) -> tuple[int, int]:
        """Delete chunks no checkpoint names; return (files, bytes) freed.

        Chunks younger than the grace period are kept: another kernel sharing
        this store may be writing a checkpoint that names them.
        """
        referenced = self.referenced_chunks()
        cutoff = self.clock() - grace_seconds
        files = freed = 0
        for path in self.chunks.glob("*/*"):
            if path.name in referenced or path.name.startswith("."):
                continue
            try:
                info = path.stat()
                if info.st_mtime > cutoff:
                    continue
                path.unlink()
            except OSError:
                continue
            files += 1
            freed += info.st_size
        return files, freed
