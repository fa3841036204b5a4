"""A crashed worker's native dump (faulthandler), read and summarised for the notebook.

Runs in the KERNEL. The worker points faulthandler at ``CRASH_FILE`` in its
spool (frames.CRASH_FILE). When the sandbox has died, the kernel reads that
file like anything else the sandbox wrote: without following links, only a
regular file, at most ``MAX_DUMP_BYTES``, as text that is shown and never
interpreted. The notebook gets the first line and the frames that are the
user's (and the innermost frame, the call that crashed); the whole dump
stays available behind ``%capsule status --last-crash``.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from capsule_kernel.protocol.frames import CRASH_FILE

MAX_DUMP_BYTES = 256 * 1024
# Frames of the machinery around a cell: the worker, IPython, ipykernel, runpy.
_MACHINERY = re.compile(
    r'File "(?:<frozen [^>]*>|[^"]*/(?:capsule_kernel|IPython|ipykernel|site-packages/traitlets)/[^"]*)"'
)
_FRAME = re.compile(r'^\s*File "')


def read_dump(spool: Path | None) -> str | None:
    """The dump the worker left in its spool, or None (no crash, no spool, or not a plain file)."""
    if spool is None:
        return None
    try:
        fd = os.open(spool / CRASH_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, MAX_DUMP_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    text = data.decode("utf-8", "replace").strip()
    return text or None


def summarise(dump: str) -> str:
    """The dump's first line and the frames worth reading: the innermost, and the user's own."""
    lines = dump.splitlines()
    frames = [line for line in lines if _FRAME.match(line)]
    kept = [line for index, line in enumerate(frames) if index == 0 or not _MACHINERY.search(line)]
    hidden = len(frames) - len(kept)
    shown = [lines[0]] if lines else []
    if kept:
        shown.append("Stack (most recent call first):")
        shown += [line.rstrip() for line in kept]
    if hidden:
        shown.append(f"  ({hidden} frames of IPython and Capsule not shown: %capsule status --last-crash)")
    return "\n".join(shown)
