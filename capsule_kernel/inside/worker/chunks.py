"""Runs IN the worker: chunks for a restore, asked of the kernel one at a time.

The store is not visible in the sandbox; the kernel's ChunkServer
(``chunk_server.py``) hands over a read-only descriptor per chunk of the
checkpoint being restored. Several hashing threads ask at once, so requests
and answers are paired under one lock.
"""

from __future__ import annotations

import array
import json
import socket
import threading

from capsule_kernel.protocol.chunks import ChunkError


class KernelChunks:
    """A ChunkSource whose chunks come from the kernel over the chunk socket."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.set_inheritable(False)
        self._lock = threading.Lock()

    def open(self, digest: str) -> int:
        with self._lock:
            self.sock.sendmsg([json.dumps({"type": "open_chunk", "digest": digest}).encode()])
            fds = array.array("i")
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        answer = json.loads(data or b"{}")
        if not answer.get("ok") or not fds:
            for fd in fds:
                socket.close(fd)
            raise ChunkError(f"chunk {digest[:12]}: {answer.get('error', 'the kernel did not send it')}")
        return fds[0]

    def __str__(self) -> str:
        return "the kernel's checkpoint store"
