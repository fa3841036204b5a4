"""The guest's end of the frame channel (fd 0 in, fd 1 out, the host's shadowed calls), and how a stop arrives.

A stop (an interrupt, a deadline) comes back as an errno from a channel call;
it is raised in the cell as KeyboardInterrupt or CellTimeout.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from capsule_kernel.inside.stops import timeout_stop
from capsule_kernel.protocol import frames

_CHANNEL_IN, _CHANNEL_OUT = 0, 1

# How the host delivers an interrupt or a deadline at its next call.
CANCEL_ERRNOS = {errno.ECANCELED: "interrupt", errno.ETIMEDOUT: "timeout"}


class Cancelled(Exception):
    """The host said stop (interrupt or deadline) while we talked to it."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def raise_cancel(why: str, limits: dict[str, Any]) -> None:
    if why == "timeout":
        raise timeout_stop(limits)
    raise KeyboardInterrupt


class Channel:
    """Frames to and from the host; a cancel arriving mid-call is remembered, never lost."""

    def __init__(self) -> None:
        self.cancelled: str | None = None
        self.queued: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        view = memoryview(frames.encode(message))
        while view:
            try:
                written = os.pwrite(_CHANNEL_OUT, view, 0)
            except OSError as err:
                if err.errno not in CANCEL_ERRNOS:
                    raise
                self.cancelled = CANCEL_ERRNOS[err.errno]
                continue  # the host refused this once to tell us; the frame still goes
            view = view[written:]

    def _read_exactly(self, size: int) -> bytes:
        parts, missing = [], size
        while missing:
            try:
                block = os.pread(_CHANNEL_IN, missing, 0)
            except OSError as err:
                if err.errno in CANCEL_ERRNOS:
                    raise Cancelled(CANCEL_ERRNOS[err.errno]) from None
                raise
            if not block:
                raise EOFError("the host closed the channel")
            parts.append(block)
            missing -= len(block)
        return b"".join(parts)

    def _read_frame(self) -> dict[str, Any]:
        (length,) = frames.HEADER.unpack(self._read_exactly(frames.HEADER.size))
        return frames.check(frames._decode_body(self._read_exactly(length)), frames.KERNEL, length)

    def receive(self) -> dict[str, Any]:
        return self.queued.pop(0) if self.queued else self._read_frame()

    def wait_for(self, kind: str, request_id: int) -> dict[str, Any]:
        """The reply to one request; other frames wait their turn."""
        while True:
            message = self._read_frame()
            if message.get("type") == kind and message.get("id") == request_id:
                return message
            if message.get("type") in ("shutdown", "eof"):
                raise EOFError("the host is shutting down")
            self.queued.append(message)
