"""Content-addressed chunk files: the bytes of snapshots, stored once.

A chunk's name is the SHA-256 of its content, so a buffer that did not change
between cells is never written twice, and anyone can check a chunk against
its name. Files are written to a temporary name, fsynced and renamed, so a
crash at any instant leaves either no chunk or a whole one.

Used by the sandbox (which writes) and the kernel (which verifies and
deletes); neither interprets the bytes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK_BYTES = 8 * 1024 * 1024


class ChunkError(Exception):
    """A chunk is missing or its content does not match its name."""


def chunk_path(root: Path, digest: str) -> Path:
    return root / digest[:2] / digest


def write_chunk(root: Path, data: memoryview | bytes) -> tuple[str, bool]:
    """Store one chunk; return its digest and whether it was new."""
    digest = hashlib.sha256(data).hexdigest()
    path = chunk_path(root, digest)
    if path.exists():
        # Touch it: garbage collection keeps recently used chunks.
        try:
            os.utime(path)
            return digest, False
        except FileNotFoundError:
            pass  # collected just now: write it again
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{digest}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return digest, True


def write_bytes(root: Path, data: memoryview | bytes) -> tuple[list[str], int]:
    """Split into chunks and store them; return the digests and bytes newly written."""
    view = memoryview(data).cast("B")
    digests, written = [], 0
    for start in range(0, max(len(view), 1), CHUNK_BYTES):
        piece = view[start : start + CHUNK_BYTES]
        digest, new = write_chunk(root, piece)
        digests.append(digest)
        written += len(piece) if new else 0
    return digests, written


def read_bytes(root: Path, digests: list[str]) -> bytearray:
    """Reassemble stored bytes, checking every chunk against its name."""
    out = bytearray()
    for digest in digests:
        path = chunk_path(root, digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ChunkError(f"chunk {digest[:12]} is missing from {root}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise ChunkError(f"chunk {digest[:12]} is corrupt (its content does not match its name)")
        out += data
    return out


def verify(root: Path, digest: str) -> bool:
    path = chunk_path(root, digest)
    try:
        with open(path, "rb") as handle:
            hasher = hashlib.sha256()
            while block := handle.read(1 << 20):
                hasher.update(block)
    except OSError:
        return False
    return hasher.hexdigest() == digest
