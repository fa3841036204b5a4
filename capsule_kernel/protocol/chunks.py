"""Content-addressed chunk files: the bytes of snapshots, stored once.

A chunk's name is the SHA-256 of its content, so a buffer that did not change
between cells is never written twice, and anyone can check a chunk against
its name. Files are written to a temporary name, fsynced and renamed, so a
crash at any instant leaves either no chunk or a whole one.

The subprocess sandbox writes new chunks into a private spool (not fsynced:
nothing is durable until the kernel has copied it); the kernel copies each
one into the store, hashing exactly the bytes it writes
(``store.CheckpointStore.adopt``), and deletes the spool file. Restores read
through a ChunkSource: a directory for trusted processes, or read-only
descriptors the kernel hands the sandbox one chunk at a time
(``sandbox/chunk_server.py``), so the sandbox never sees the store itself.
Nobody interprets the bytes but the sandbox that unpickles them.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from itertools import accumulate
from pathlib import Path
from typing import Any, Protocol

CHUNK_BYTES = 8 * 1024 * 1024


class ChunkError(Exception):
    """A chunk is missing or its content does not match its name."""


def chunk_path(root: Path, digest: str) -> Path:
    return root / digest[:2] / digest


def _missing(root: object, digest: str) -> ChunkError:
    return ChunkError(f"chunk {digest[:12]} is missing from {root}")


class ChunkSource(Protocol):
    """Where a restore reads chunks from: open one by name, read-only."""

    def open(self, digest: str) -> int:
        """A new read-only descriptor of the chunk (the caller closes it); ChunkError if missing."""
        ...


class DirectorySource:
    """Chunks in a directory the process may read (the store, for trusted processes)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self, digest: str) -> int:
        try:
            return os.open(chunk_path(self.root, digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _missing(self.root, digest) from None

    def __str__(self) -> str:
        return str(self.root)


def entry_chunks(entries: Mapping[str, Any]) -> list[str]:
    """Every chunk name a manifest's entries mention (pickles and buffers), once each, in order."""
    names: dict[str, None] = {}
    for entry in entries.values():
        for digest in [*entry.get("pickle", []), *(d for b in entry.get("buffers", []) for d in b)]:
            if isinstance(digest, str):
                names[digest] = None
    return list(names)


def is_chunk_name(digest: str) -> bool:
    """A SHA-256 in lowercase hex: the only names a chunk file may have."""
    return len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


def as_source(root: Path | ChunkSource) -> ChunkSource:
    return DirectorySource(root) if isinstance(root, Path) else root


# Maps a function over items; a thread pool's map hashes pieces in parallel
# (hashlib releases the GIL on large buffers), the builtin map one by one.
Mapper = Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]]


class HashingThreads:
    """A Mapper that hashes and reads chunks on several threads at once.

    SHA-256 releases the GIL on large buffers, so two cores hash twice as
    fast. Made where it is used: a pool's threads do not survive a fork.
    When no thread can start (a tight process limit), it maps on the
    calling thread instead of failing the snapshot.
    """

    def __init__(self, workers: int | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor  # not in the Wasm guest's stdlib

        self._pool = ThreadPoolExecutor(
            max_workers=workers or min(4, os.cpu_count() or 1), thread_name_prefix="capsule-hash"
        )

    def __enter__(self) -> HashingThreads:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._pool.shutdown(wait=True)

    def map(self, function: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        items = list(items)
        if len(items) < 2:
            return [function(item) for item in items]
        try:
            return list(self._pool.map(function, items))
        except RuntimeError as err:
            if "thread" not in str(err):
                raise
            return [function(item) for item in items]


def pieces(data: memoryview | bytes) -> list[memoryview]:
    """The chunk-sized slices of some bytes (one empty slice for no bytes)."""
    view = memoryview(data).cast("B")
    return [view[start : start + CHUNK_BYTES] for start in range(0, max(len(view), 1), CHUNK_BYTES)]


def chunk_digest(piece: memoryview) -> str:
    return hashlib.sha256(piece).hexdigest()


FINGERPRINT_AT_LEAST = 1 << 20  # below this SHA-256 is quick anyway


@functools.cache
def _blake3() -> Callable[..., Any] | None:
    try:
        from blake3 import blake3
    except ImportError:  # the Wasm guest, or an environment without it
        return None
    return blake3


def preload() -> None:
    """Import the fingerprint hash now, in a process that forks snapshot children.

    A child inherits the module; otherwise each child would import the
    extension module anew (a millisecond or more of a snapshot's time).
    """
    _blake3()


def fingerprint(piece: memoryview) -> str | None:
    """A BLAKE3 digest of a large chunk: its SHA-256 name looked up, not computed.

    Telling whether a large value changed means hashing all of it every
    cell; BLAKE3 does that about five times faster than SHA-256 here and
    releases the GIL too. It is as collision resistant, so a fingerprint seen
    before stands for the same bytes and their SHA-256 name. Chunks keep
    SHA-256 names, which the Wasm guest and the kernel compute with hashlib
    alone. None: a small chunk, or blake3 is not installed.
    """
    blake3 = _blake3()
    if blake3 is None or len(piece) < FINGERPRINT_AT_LEAST:
        return None
    return blake3(piece).hexdigest()


class ChunkWriter:
    """Names a chunk and stores it right away if the store lacks it.

    Used as the hash function of a snapshot, so on several threads a chunk
    is written (and fsynced) while the next ones are still being hashed:
    the disk and the CPUs work at the same time instead of one after the
    other. `written` adds up the bytes that were new. Two equal pieces
    (say, two arrays of zeros) are written once: the first thread to name a
    chunk claims it; the others return its name, and the chunk is on disk by
    the time the mapper has returned. With `known` fingerprints, a large
    chunk seen in an earlier snapshot is named without SHA-256 (fingerprint).
    """

    def __init__(self, root: Path, known: dict[str, str] | None = None, *, durable: bool = True) -> None:
        self.root = root
        self.durable = durable  # False for a sandbox's spool: the kernel makes chunks durable
        self.known = known or {}  # fingerprint -> SHA-256 name, from earlier snapshots
        # Fingerprints of the large chunks this snapshot saw, to be known next time.
        self.seen: dict[str, str] = {}
        # dict.setdefault and list.append are atomic: no lock across the hashing threads.
        self._claims: dict[str, object] = {}
        self._new: list[int] = []

    def __call__(self, piece: memoryview) -> str:
        key = fingerprint(piece)
        remembered = key and self.known.get(key)
        digest = remembered or chunk_digest(piece)
        if key:
            self.seen[key] = digest
        if remembered and not self.durable:
            # Seen in an earlier snapshot of this sandbox, so the kernel has it
            # already; the spool cannot tell (it is emptied as chunks are adopted).
            return digest
        claim = object()
        if self._claims.setdefault(digest, claim) is not claim:
            return digest
        if write_chunk(self.root, piece, digest, durable=self.durable)[1]:
            self._new.append(len(piece))
        return digest

    @property
    def written(self) -> int:
        return sum(self._new)


def write_chunk(
    root: Path, data: memoryview | bytes, digest: str | None = None, *, durable: bool = True
) -> tuple[str, bool]:
    """Store one chunk; return its digest and whether it was new.

    `digest`, when the caller hashed the chunk already, saves hashing it again.
    `durable=False` skips the fsync (a spool, which the kernel copies from).
    """
    digest = digest or hashlib.sha256(data).hexdigest()
    path = chunk_path(root, digest)
    if path.exists():
        # Touch it: garbage collection keeps recently used chunks.
        try:
            os.utime(path)
            return digest, False
        except FileNotFoundError:
            pass  # collected just now: write it again
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        if durable:
            sync_directories({root})
    temporary = path.with_name(f".{digest}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        if durable:
            os.fsync(handle.fileno())
    os.replace(temporary, path)
    if durable:
        sync_directories({path.parent})  # the rename itself survives a power loss
    return digest, True


def sync_directories(directories: set[Path]) -> None:
    """fsync each directory, so that the names just renamed into it are on disk, not only their bytes."""
    for directory in directories:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(root: Path, data: memoryview | bytes, digests: list[str] | None = None) -> tuple[list[str], int]:
    """Split into chunks and store them; return the digests and bytes newly written.

    `digests` are the chunks' names when the caller computed them already
    (snapshot.chunk_layout); otherwise each chunk is hashed here.
    """
    parts = pieces(data)
    names = digests if digests is not None else [None] * len(parts)
    stored, written = [], 0
    for piece, name in zip(parts, names, strict=True):
        digest, new = write_chunk(root, piece, name)
        stored.append(digest)
        written += len(piece) if new else 0
    return stored, written


def _read_into(source: ChunkSource, digest: str, target: memoryview) -> None:
    handle = source.open(digest)
    try:
        size = os.fstat(handle).st_size
        if size != len(target):
            raise ChunkError(f"chunk {digest[:12]} is corrupt (it holds {size} bytes, {len(target)} expected)")
        got = 0
        while got < size:
            # pread: a descriptor may be shared, so never rely on its offset.
            count = os.preadv(handle, [target[got:]], got)
            if not count:
                raise ChunkError(f"chunk {digest[:12]} is corrupt (it ended early)")
            got += count
    finally:
        os.close(handle)
    if hashlib.sha256(target).hexdigest() != digest:
        raise ChunkError(f"chunk {digest[:12]} is corrupt (its content does not match its name)")


def read_bytes(root: Path | ChunkSource, digests: list[str], mapper: Mapper = map) -> bytearray:
    """Reassemble stored bytes, checking every chunk against its name.

    Every chunk but the last is CHUNK_BYTES long, so each one is read
    straight into its place in one buffer (no copies), and `mapper` may read
    and verify them in parallel.
    """
    source = as_source(root)
    sizes = [CHUNK_BYTES] * (len(digests) - 1) + [_chunk_size(source, digests[-1])]
    out = bytearray(sum(sizes))
    view = memoryview(out)
    ends = list(accumulate(sizes))
    jobs = [(digest, view[end - size : end]) for digest, end, size in zip(digests, ends, sizes, strict=True)]
    for _ in mapper(lambda job: _read_into(source, *job), jobs):
        pass
    return out


# Buffers at least this large are mapped from their chunk files on restore
# rather than read: fewer would mean one memory mapping per tiny buffer.
MAP_AT_LEAST = 1024 * 1024
_MAP_FIXED = 0x10  # Linux and the BSDs; Python's mmap module does not export it
_PROT_NONE = 0


class _PrivateMapping:
    """An address range of copy-on-write file mappings; unmapped with its last view.

    Owned by the ctypes array that exposes it (numpy keeps that array alive
    through a memoryview as its base), so the range lives exactly as long as
    the restored value does.
    """

    def __init__(self, libc: Any, base: int, length: int) -> None:
        self._libc, self.base, self.length = libc, base, length

    def __del__(self) -> None:
        self._libc.munmap(self.base, self.length)


@functools.cache
def _mapping_libc() -> Any:
    """The C library with mmap/munmap typed, or None where mapping is not possible."""
    try:
        import ctypes
        import mmap

        if not hasattr(mmap, "MAP_PRIVATE") or not hasattr(mmap, "MAP_ANONYMOUS"):
            return None
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        return libc
    except (ImportError, OSError, AttributeError):
        return None


def _map_chunk(libc: Any, address: int, fd: int, size: int) -> None:
    """Map one chunk file copy-on-write (readable, writable) over its place in the reserved range."""
    import ctypes
    import mmap

    got = libc.mmap(address, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
    if got != address:
        raise MemoryError(f"cannot map {size} bytes of a chunk: {os.strerror(ctypes.get_errno())}")


def map_bytes(root: Path | ChunkSource, digests: list[str], mapper: Mapper = map) -> memoryview | bytearray:
    """Stored bytes as one writable buffer mapped copy-on-write from the chunk files.

    Restoring a 1 GB namespace this way costs no fresh memory and no copy:
    pages come from the page cache and are copied only when the restored
    value is written to. Every chunk is still checked against its name
    (through the mapping, so what was checked is what the value holds).
    Chunk files are immutable (written to a new name and renamed), which is
    what makes sharing them safe; a chunk deleted by garbage collection
    stays readable while mapped. Small buffers, and systems without POSIX
    mmap, are read instead.
    """
    import ctypes
    import mmap

    libc = _mapping_libc()
    source = as_source(root)
    if libc is None:
        return read_bytes(source, digests, mapper)
    # Every chunk but the last is CHUNK_BYTES long; the last one's size gives the total.
    last = _chunk_size(source, digests[-1])
    total = CHUNK_BYTES * (len(digests) - 1) + last
    if total < MAP_AT_LEAST:  # an empty buffer is one empty chunk
        return read_bytes(source, digests, mapper)
    if not 0 < last <= CHUNK_BYTES:
        raise ChunkError(f"chunk {digests[-1][:12]} is corrupt (it holds {last} bytes, 1 to {CHUNK_BYTES} expected)")
    sizes = [CHUNK_BYTES] * (len(digests) - 1) + [last]
    length = -(-total // mmap.PAGESIZE) * mmap.PAGESIZE
    # Reserve the whole range first, then lay each chunk over its place in it.
    base = libc.mmap(None, length, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if base in (None, ctypes.c_void_p(-1).value):
        raise MemoryError(f"cannot reserve {total} bytes to restore into: {os.strerror(ctypes.get_errno())}")
    owner = _PrivateMapping(libc, base, length)
    for position, (digest, size) in enumerate(zip(digests, sizes, strict=True)):
        # One file open at a time: a 10 GB array must not need 1,280 descriptors at once.
        handle = source.open(digest)
        try:
            held = os.fstat(handle).st_size
            if held != size:
                raise ChunkError(f"chunk {digest[:12]} is corrupt (it holds {held} bytes, {size} expected)")
            _map_chunk(libc, base + position * CHUNK_BYTES, handle, size)
        finally:
            os.close(handle)
    exposed = (ctypes.c_char * total).from_address(base)
    exposed.mapping = owner  # the array keeps the range mapped
    view = memoryview(exposed).cast("B")
    checks = [
        (digest, view[start : start + size])
        for digest, start, size in zip(digests, range(0, total, CHUNK_BYTES), sizes, strict=True)
    ]
    for digest, matches in zip(digests, mapper(lambda check: chunk_digest(check[1]) == check[0], checks), strict=True):
        if not matches:
            raise ChunkError(f"chunk {digest[:12]} is corrupt (its content does not match its name)")
    return view


def _chunk_size(source: ChunkSource, digest: str) -> int:
    handle = source.open(digest)
    try:
        return os.fstat(handle).st_size
    finally:
        os.close(handle)


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


def write_entry(
    chunk_root: Path, entry: dict[str, Any], data: bytes, buffers: list[bytes]
) -> tuple[dict[str, Any], int]:
    """Store one pickled value's bytes as chunks; return its entry and the bytes newly written.

    Bytes only, never unpickled: the Wasm host stores a guest's snapshot with it.

    Chunk names already in the entry (from pickled) are used as given; the
    kernel checks every chunk against its name before it commits.
    """
    known = entry.get("buffers") or [None] * len(buffers)
    pickle_chunks, written = write_bytes(chunk_root, data, entry.get("pickle"))
    buffer_chunks = []
    for buffer, digests in zip(buffers, known, strict=True):
        stored, new_bytes = write_bytes(chunk_root, buffer, digests)
        written += new_bytes
        buffer_chunks.append(stored)
    return {**entry, "pickle": pickle_chunks, "buffers": buffer_chunks}, written
