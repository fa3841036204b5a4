"""sys.stdout and sys.stderr inside a sandbox: text leaves as ``stream`` frames.

One buffer and one flush for both sandboxes. What differs is when to flush:
the worker has a flusher thread that coalesces bursts (``worker_io``); the
Wasm guest has no threads and flushes at newlines, a few milliseconds apart.
Each says so through the ``written`` and ``flushed`` hooks.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from typing import Any

Send = Callable[[dict[str, Any]], None]


class FrameStream(io.TextIOBase):
    """A text stream whose writes become ``stream`` frames, in order, never cut."""

    # Beyond this much buffered text a write flushes at once: memory stays bounded.
    MAX_BUFFERED_CHARS = 64 * 1024

    def __init__(self, name: str, send: Send, lock: Any = None) -> None:
        super().__init__()
        self.name = name
        self._send = send
        # Taking the text and sending it under one lock keeps the order of
        # output when a flusher thread and the main thread race (none in Wasm).
        self._lock = lock if lock is not None else contextlib.nullcontext()
        self._buffer: list[str] = []
        self._buffered = 0

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "replace"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if not text:
            return 0
        with self._lock:
            self._buffer.append(text)
            self._buffered += len(text)
            large = self._buffered >= self.MAX_BUFFERED_CHARS
        if large:
            self.flush()
        else:
            self.written(text)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if not self._buffer:
                return
            text = "".join(self._buffer)
            self._buffer.clear()
            self._buffered = 0
            self._send({"type": "stream", "name": self.name, "text": text})
        self.flushed()

    def written(self, text: str) -> None:
        """Text was buffered (and not flushed yet): schedule a flush."""

    def flushed(self) -> None:
        """A frame went out."""
