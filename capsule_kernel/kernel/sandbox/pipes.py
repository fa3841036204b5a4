"""The sandbox's pipes as the kernel reads them, and the errors a sandbox's end becomes.

Shared by the sandbox client's parts (process.py, channel.py, reaping.py),
below all of them, so none imports another back.
"""

from __future__ import annotations

import asyncio
import codecs
import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from capsule_kernel.protocol import frames

EventHandler = Callable[[dict[str, Any]], None]

STARTUP_TIMEOUT_SECONDS = 60.0
# How long a subshell's cell has to stop after its CellTimeout is raised (it may be blocked in C).
SUBSHELL_GRACE_SECONDS = 5.0
# How long a dying sandbox may take to let its snapshot children finish.
SNAPSHOT_PATIENCE_SECONDS = 60.0


class SandboxDied(Exception):
    """The worker process ended while the kernel was waiting on it."""

    def __init__(self, reason: str, *, timed_out: bool = False, violation: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out
        self.violation = violation


class PreviousCellOverran(SandboxDied):
    """The sandbox never took the new cell: the cell before it kept it busy past its own limit.

    The time is charged to that earlier cell (``previous``), not to the cell
    that was waiting; the sandbox was stopped, and the waiting cell may run
    in a fresh one.
    """

    def __init__(self, reason: str, previous: int | None) -> None:
        super().__init__(reason)
        self.previous = previous


# What the user reads when a sandbox sent something outside the frame vocabulary.
VIOLATION = "broke the protocol (it sent {what}), so it was stopped"


@dataclass
class _ReportPipe:
    fd: int
    decoder: frames.FrameDecoder


@dataclass
class _Pipe:
    """A raw output pipe of the sandbox (fd-level writes: C code, faulthandler, shell commands)."""

    fd: int
    name: str
    decoder: codecs.IncrementalDecoder
    # Text after the last line end: held back until its line ends, or RAW_LINE_WAIT_SECONDS pass.
    pending: str = ""
    timer: asyncio.TimerHandle | None = None


# A writer that emits a line in pieces (faulthandler writes a frame's line in several
# writes) is read in pieces; holding a partial line this long keeps each line in one
# stream message, while a prompt or a progress bar without a line end still shows.
RAW_LINE_WAIT_SECONDS = 0.1


def read_available(fd: int) -> bytes | None:
    """What a readable non-blocking pipe holds: None if nothing yet, b"" at its end."""
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _nonblocking(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
