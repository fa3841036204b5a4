"""Framed, data-only messages between the kernel and a sandbox worker.

Each frame is a 4-byte big-endian length followed by that many bytes of UTF-8
JSON. JSON (never pickle) is the point: the kernel process must be able to read
everything a sandbox says without ever running or unpickling what it produced.
Binary payloads (comm buffers) travel base64-encoded inside the JSON.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from typing import Any

HEADER = struct.Struct(">I")
# A frame larger than this is a protocol violation, not a big output: it
# protects the kernel from a worker that writes garbage into the pipe.
MAX_FRAME_BYTES = 512 * 1024 * 1024


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame."""


def encode(message: dict[str, Any]) -> bytes:
    """Serialize one message into a length-prefixed frame."""
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return HEADER.pack(len(body)) + body


def _decode_body(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"frame is not UTF-8 JSON: {err}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("frame is not a JSON object with a string 'type'")
    return message


class FrameDecoder:
    """Incremental decoder for a byte stream read in arbitrary chunks.

    The kernel reads the worker's pipe without blocking, so frames arrive split
    or glued together; this keeps the partial tail between reads.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add bytes; return every message completed by them, in order."""
        self._buffer.extend(data)
        messages = []
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME_BYTES:
                raise ProtocolError(f"frame length {length} exceeds {MAX_FRAME_BYTES}")
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[HEADER.size : end])
            del self._buffer[:end]
            messages.append(_decode_body(body))
        return messages

    @property
    def pending_bytes(self) -> int:
        return len(self._buffer)


def write_frame(fd: int, message: dict[str, Any]) -> None:
    """Write one whole frame to a blocking file descriptor."""
    view = memoryview(encode(message))
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks = []
    remaining = size
    while remaining:
        chunk = os.read(fd, remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> dict[str, Any] | None:
    """Read one frame from a blocking descriptor; None at end of stream."""
    header = _read_exactly(fd, HEADER.size)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame length {length} exceeds {MAX_FRAME_BYTES}")
    body = _read_exactly(fd, length)
    if body is None:
        return None
    return _decode_body(body)


def pack_buffers(buffers: list[bytes] | None) -> list[str]:
    """Binary buffers (comm messages) as base64 text for a JSON frame."""
    return [base64.b64encode(bytes(b)).decode("ascii") for b in buffers or []]


def unpack_buffers(encoded: list[str] | None) -> list[bytes]:
    return [base64.b64decode(b) for b in encoded or []]
