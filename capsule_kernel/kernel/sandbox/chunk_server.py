"""Chunk descriptors for a restore, handed out by the kernel one at a time.

Runs in the KERNEL. The sandbox cannot see the checkpoint store, yet a
restore maps large buffers straight from chunk files (zero-copy). So while a
restore runs, the worker asks on a private socket (``SOCK_SEQPACKET``, one
JSON object per message) for the chunks it needs, and the kernel answers
each request with a read-only descriptor passed as SCM_RIGHTS:

    worker -> kernel   {"type": "open_chunk", "digest": "<sha256 hex>"}
    kernel -> worker   {"type": "chunk", "digest": ..., "ok": true}  + one descriptor
                       {"type": "chunk", "digest": ..., "ok": false, "error": "..."}

Only the chunks of the checkpoint being restored are served, and only while
that restore runs: a sandbox cannot read another session's data by guessing
names, nor probe which contents the store holds. A descriptor opened
read-only cannot be turned into a writable one by a process that does not
own the file (chunk files belong to the kernel's user and are mode 0444);
when the sandbox shares the kernel's uid (a kernel not run as root), it
could, so the kernel sends a sealed in-memory copy instead. A message that
is not a well-formed request ends the sandbox, as on every other channel.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path

from capsule_kernel.protocol.chunks import CHUNK_BYTES, chunk_path

# A request is one small JSON object; anything longer is cut and refused.
MAX_REQUEST_BYTES = 512
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """(kernel end, worker end); the worker end is inherited by the sandbox."""
    kernel_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kernel_end.setblocking(False)
    worker_end.set_inheritable(True)
    return kernel_end, worker_end


class ChunkServer:
    """The kernel's end of one sandbox's chunk socket."""

    def __init__(
        self,
        sock: socket.socket,
        root: Path | None,
        *,
        copy: bool,
        on_violation: Callable[[str], None],
    ) -> None:
        self.sock = sock
        self.root = root
        self.copy = copy  # send sealed copies (the sandbox shares the kernel's uid)
        self.on_violation = on_violation
        self.allowed: frozenset[str] = frozenset()
        self.served = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._on_readable)

    def close(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.sock.fileno())
            self._loop = None
        self.sock.close()

    @contextlib.contextmanager
    def serving(self, digests: Iterable[str]) -> object:
        """Serve these chunks (and no others) for the duration of a restore."""
        self.allowed = frozenset(digests)
        try:
            yield self
        finally:
            self.allowed = frozenset()

    def _on_readable(self) -> None:
        while True:
            try:
                data, _, flags, _ = self.sock.recvmsg(MAX_REQUEST_BYTES, 0)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, flags = b"", 0
            if not data:
                # The worker's end closed: the sandbox is gone.
                if self._loop is not None:
                    self._loop.remove_reader(self.sock.fileno())
                    self._loop = None
                return
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                self._violation("an oversized request (or descriptors) on the chunk socket")
                return
            try:
                request = json.loads(data)
                digest = request["digest"]
                if request.get("type") != "open_chunk" or not isinstance(digest, str):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                self._violation("a malformed request on the chunk socket")
                return
            self._answer(digest)

    def _violation(self, what: str) -> None:
        self.close()
        self.on_violation(f"broke the chunk protocol ({what}) and was stopped")

    def _answer(self, digest: str) -> None:
        if digest not in self.allowed or self.root is None:
            self._reply(digest, None, "not part of the checkpoint being restored")
            return
        try:
            fd = os.open(chunk_path(self.root, digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            self._reply(digest, None, f"missing from the store ({err.strerror})")
            return
        try:
            handed = _sealed_copy(fd) if self.copy else fd  # _sealed_copy closes fd
        except OSError as err:
            self._reply(digest, None, f"could not be copied ({err})")
            return
        try:
            self._reply(digest, handed, None)
            self.served += 1
        finally:
            os.close(handed)

    def _reply(self, digest: str, fd: int | None, error: str | None) -> None:
        message = {"type": "chunk", "digest": digest, "ok": fd is not None}
        if error:
            message["error"] = error
        ancillary = []
        if fd is not None:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        try:
            self.sock.sendmsg([json.dumps(message).encode()], ancillary)
        except OSError:
            pass  # the worker went away; its death is noticed on the frame pipe


def _sealed_copy(fd: int) -> int:
    """An in-memory copy of a chunk that nobody can change (memfd with write seals); closes fd."""
    try:
        size = os.fstat(fd).st_size
        if size > CHUNK_BYTES:
            raise OSError(f"a chunk of {size} bytes is larger than a chunk can be")
        copy = os.memfd_create("capsule-chunk", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        offset = 0
        while offset < size:
            sent = os.sendfile(copy, fd, offset, size - offset)
            if not sent:
                break
            offset += sent
        fcntl.fcntl(copy, fcntl.F_ADD_SEALS, _SEALS)
        return copy
    finally:
        os.close(fd)
