"""Every frame that crosses a sandbox boundary: one vocabulary, checked at every edge.

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON (never
pickle: the kernel must be able to read everything a sandbox says without
running or unpickling what it produced). This module is stdlib-only on
purpose: the kernel, the subprocess worker, the Wasm host and the Wasm guest
(which receives a copy of this very file) all import it, so there is one
definition of each message, shared by both sides of every channel.

``FRAMES`` says, for each frame type, who may send it, its fields and their
JSON types, and its size cap. ``check(message, sender)`` is what every
receiver calls on what it decoded: a frame that is unknown, malformed,
oversized or not allowed from that sender raises ``ProtocolError``, and the
receiver then treats the channel as broken (the kernel replaces the sandbox).
Whether a frame comes in sequence (a ``done`` while no cell runs) is the
receiver's check, in its handler table.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

HEADER = struct.Struct(">I")
MiB = 1024 * 1024
# No frame is ever larger than this; most channels allow much less (Channel caps below).
MAX_FRAME_BYTES = 512 * MiB

# Who writes a frame. The kernel and the Wasm host are trusted; the rest run user code.
KERNEL = "kernel"  # the kernel, to a sandbox (worker or Wasm host)
WORKER = "worker"  # the subprocess sandbox's worker, on its frame pipe
SNAPSHOT = "snapshot"  # the subprocess sandbox's snapshot children, on the report pipe
HOST = "host"  # the Wasm host (trusted), to the kernel
GUEST = "guest"  # the Wasm guest (untrusted), to the host
SANDBOX_SENDERS = (WORKER, SNAPSHOT, GUEST)

_OUTPUT_CAP = 128 * MiB  # a display or comm message: a big image or widget state
_STREAM_CAP = 16 * MiB
_SMALL_CAP = 1 * MiB
_SNAPSHOT_CAP = 64 * MiB  # a manifest: one entry per name, never the data


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame of this vocabulary."""


@dataclass(frozen=True)
class Frame:
    """One frame type: who may send it, its fields (name -> JSON type) and its size cap."""

    senders: frozenset[str]
    fields: dict[str, Any]
    optional: frozenset[str] = field(default_factory=frozenset)
    cap: int = _SMALL_CAP


def _frame(senders: tuple[str, ...], cap: int = _SMALL_CAP, optional: tuple[str, ...] = (), **fields: Any) -> Frame:
    return Frame(frozenset(senders), fields, frozenset(optional), cap)


_OUT = (WORKER, HOST, GUEST)  # output a cell makes, in either sandbox
_STR_OR_NONE = (str, type(None))
_INT_OR_NONE = (int, type(None))

FRAMES: dict[str, Frame] = {
    # -- the kernel to a sandbox ------------------------------------------------------
    "execute": _frame(
        (KERNEL,),
        _OUTPUT_CAP,
        optional=("raw_code", "snapshot_candidates", "snapshot_peeks", "user_expressions", "parent_header"),
        code=str,
        silent=bool,
        store_history=bool,
        user_expressions=dict,
        allow_stdin=bool,
        execution_count=int,
        snapshot_candidates=list,
        # Names among the candidates the cell only peeked at (protocol/peeks.py).
        snapshot_peeks=list,
        raw_code=_STR_OR_NONE,
        limits=dict,
        parent_header=dict,
    ),
    # subshell: answered on that subshell's thread (completion while a cell runs), see "subshell" below.
    "request": _frame((KERNEL,), _OUTPUT_CAP, optional=("subshell",), id=int, kind=str, args=dict, subshell=int),
    # parent_header: the frontend's comm message the worker now serves (from the kernel only;
    # the relay rebuilds a sandbox's comm messages from the other fields and never reads it).
    "comm": _frame(
        (KERNEL, *_OUT),
        _OUTPUT_CAP,
        optional=("metadata", "buffers", "parent_header", "subshell"),
        msg_type=str,
        content=dict,
        metadata=dict,
        buffers=list,
        parent_header=dict,
        subshell=int,
    ),
    "limits": _frame((KERNEL,), limits=dict),
    "input_reply": _frame((KERNEL,), _STREAM_CAP, id=_INT_OR_NONE, value=str),
    "magic_reply": _frame((KERNEL,), optional=("error",), id=_INT_OR_NONE, ok=bool, error=str),
    # The answer to a "task" frame (capsule_kernel.tasks): a task's key, or its envelope and value.
    "task_reply": _frame((KERNEL,), _OUTPUT_CAP, id=int, content=dict),
    "shutdown": _frame((KERNEL,)),
    # -- kernel subshells (JEP 91): cells and comm messages on a thread of their own ---
    # A subshell is a small number the kernel chose (the frontend's id is only shown, by
    # %subshell). action: open, close, interrupt or timeout (worker_subshells.ACTIONS).
    "subshell": _frame((KERNEL,), optional=("name",), action=str, subshell=int, name=str),
    "subshell_execute": _frame(
        (KERNEL,),
        _OUTPUT_CAP,
        optional=("parent_header",),
        subshell=int,
        code=str,
        silent=bool,
        user_expressions=dict,
        parent_header=dict,
        limits=dict,
    ),
    # -- a sandbox to the kernel ------------------------------------------------------
    # problems: what of the user's IPython profile failed in the worker (shown as text, bounded).
    "ready": _frame(
        (WORKER, HOST, GUEST),
        optional=("enforcement", "problems"),
        pid=int,
        python=str,
        enforcement=dict,
        problems=list,
    ),
    # A cell has started: the receiver of "execute" took it (the budget of the cell starts).
    "started": _frame((WORKER, HOST), execution_count=int),
    "done": _frame(
        (WORKER, HOST, GUEST),
        _OUTPUT_CAP,
        optional=("snapshot", "snapshot_sent", "fuel_consumed", "deferred"),
        reply=dict,
        snapshot=_INT_OR_NONE,
        deferred=bool,
        snapshot_sent=_INT_OR_NONE,
        fuel_consumed=_INT_OR_NONE,
    ),
    # The cell of a subshell ended (the worker only; the kernel checks that one ran there).
    "subshell_done": _frame((WORKER,), _OUTPUT_CAP, subshell=int, reply=dict),
    # Outputs name the subshell whose cell or comm message made them, if any; the kernel
    # files them under that subshell's request, and believes a number only if it opened it.
    "stream": _frame(_OUT, _STREAM_CAP, optional=("subshell",), name=str, text=str, subshell=int),
    "display": _frame(
        _OUT,
        _OUTPUT_CAP,
        optional=("update", "subshell"),
        data=dict,
        metadata=dict,
        transient=dict,
        update=bool,
        subshell=int,
    ),
    "clear_output": _frame(_OUT, optional=("subshell",), wait=bool, subshell=int),
    "execute_result": _frame(
        _OUT,
        _OUTPUT_CAP,
        optional=("transient", "subshell"),
        data=dict,
        metadata=dict,
        execution_count=int,
        transient=dict,
        subshell=int,
    ),
    "error": _frame(_OUT, _OUTPUT_CAP, optional=("subshell",), ename=str, evalue=str, traceback=list, subshell=int),
    "input_request": _frame(_OUT, _STREAM_CAP, id=int, prompt=str, password=bool),
    "magic": _frame(_OUT, _STREAM_CAP, id=int, line=str, cell=_STR_OR_NONE),
    "reply": _frame(_OUT, _OUTPUT_CAP, id=_INT_OR_NONE, content=dict),
    # A @task call from a cell: submit / wait / cancel (the kernel checks every option against policy).
    "task": _frame(_OUT, _OUTPUT_CAP, id=int, action=str, args=dict),
    "snapshot_started": _frame((WORKER,), execution_count=int, pid=int),
    # The deferred cells up to this one changed nothing: no coalesced snapshot follows (worker_snapshots).
    "snapshot_unchanged": _frame((WORKER,), execution_count=int),
    "trap": _frame((HOST,), reason=str),
    # -- snapshot reports (the subprocess sandbox's report pipe; the Wasm host's) ------
    "snapshot": _frame(
        (SNAPSHOT, HOST),
        _SNAPSHOT_CAP,
        optional=("complete", "after"),
        execution_count=int,
        entries=dict,
        removed=list,
        written=int,
        complete=bool,
        # A change on top of that cell's snapshot, taken while it was in flight: believed only
        # once that one is (the worker's take_here; journal recovery and adoption check it).
        after=int,
    ),
    "snapshot_failed": _frame((SNAPSHOT, HOST, GUEST), execution_count=int, reason=str),
    # -- the Wasm guest to its host (never forwarded as such) --------------------------
    "cell_start": _frame((GUEST,)),
    "cell_end": _frame((GUEST,)),
    "sleep_ended": _frame((GUEST,)),
    "snapshot_data": _frame((GUEST,), MAX_FRAME_BYTES, execution_count=int, entries=dict, removed=list),
}


def channel_cap(sender: str) -> int:
    """The largest frame any type allows from this sender: the bound of a decoder's buffer."""
    return max(spec.cap for spec in FRAMES.values() if sender in spec.senders)


def _type_name(expected: Any) -> str:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def check(message: Any, sender: str, size: int | None = None) -> dict[str, Any]:
    """The message if it is a frame ``sender`` may send; ProtocolError naming what is wrong otherwise."""
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("a frame that is not a JSON object with a string 'type'")
    kind = message["type"]
    spec = FRAMES.get(kind)
    if spec is None:
        raise ProtocolError(f"an unknown frame type {kind[:40]!r}")
    if sender not in spec.senders:
        raise ProtocolError(f"a {kind!r} frame, which the {sender} may not send")
    if size is not None and size > spec.cap:
        raise ProtocolError(f"a {kind!r} frame of {size} bytes, over its cap of {spec.cap}")
    for name, value in message.items():
        if name == "type":
            continue
        expected = spec.fields.get(name)
        if expected is None:
            raise ProtocolError(f"a {kind!r} frame with an unknown field {name[:40]!r}")
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in _kinds(expected)):
            raise ProtocolError(f"a {kind!r} frame whose {name!r} is not {_type_name(expected)}")
    missing = [name for name in spec.fields if name not in message and name not in spec.optional]
    if missing:
        raise ProtocolError(f"a {kind!r} frame without {', '.join(missing)}")
    return message


def _kinds(expected: Any) -> tuple[Any, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


# -- encoding ---------------------------------------------------------------------------


def encode(message: dict[str, Any]) -> bytes:
    """Serialize one message into a length-prefixed frame."""
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return HEADER.pack(len(body)) + body


def _decode_body(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ProtocolError(f"a frame that is not UTF-8 JSON ({str(err)[:80]})") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("a frame that is not a JSON object with a string 'type'")
    return message


class FrameDecoder:
    """Incremental decoder for a byte stream read in arbitrary chunks, with a bounded buffer.

    The kernel reads a sandbox's pipe without blocking, so frames arrive split
    or glued together; this keeps the partial tail between reads. A header
    that announces more than ``limit`` bytes is an error at once (nothing is
    buffered for it), and after its first error the decoder refuses every
    further byte: a broken stream is never resynchronised.

    With ``sender`` set, every decoded frame is also checked against FRAMES.
    """

    def __init__(self, sender: str | None = None, limit: int | None = None) -> None:
        self._buffer = bytearray()
        self.sender = sender
        self.limit = limit if limit is not None else (channel_cap(sender) if sender else MAX_FRAME_BYTES)
        self.broken: str | None = None

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add bytes; return every message completed by them, in order (ProtocolError at the first bad one)."""
        if self.broken is not None:
            raise ProtocolError(self.broken)
        try:
            return self._feed(data)
        except ProtocolError as err:
            self.broken = str(err)
            self._buffer = bytearray()
            raise

    def _feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer.extend(data)
        messages = []
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > self.limit:
                raise ProtocolError(
                    f"a frame header announcing {length} bytes, over this channel's cap of {self.limit}"
                )
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[HEADER.size : end])
            del self._buffer[:end]
            message = _decode_body(body)
            if self.sender is not None:
                check(message, self.sender, length)
            messages.append(message)
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
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, sender: str | None = None, limit: int = MAX_FRAME_BYTES) -> dict[str, Any] | None:
    """Read one frame from a blocking descriptor; None at end of stream."""
    header = _read_exactly(fd, HEADER.size)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    if length > limit:
        raise ProtocolError(f"a frame header announcing {length} bytes, over this channel's cap of {limit}")
    body = _read_exactly(fd, length)
    if body is None:
        return None
    message = _decode_body(body)
    return check(message, sender, length) if sender is not None else message


# -- the snapshot journal: reports as files ------------------------------------------
# Every snapshot report is also written as one frame to JOURNAL_DIR/<count>.frame in the
# sandbox's spool, before it goes on the report pipe. A report the kernel had not recorded
# when it died is adopted from there by a later kernel (checkpoint/adoption.py), under the
# same checks as the pipe: the file is as untrusted as the pipe is.
JOURNAL_DIR = "journal"
JOURNAL_SUFFIX = ".frame"
# The worker's faulthandler dump, in its spool (sandbox/crash_dump.py reads it): text, never a frame.
CRASH_FILE = "crash.txt"


def journal(spool: str | os.PathLike[str], report: dict[str, Any]) -> None:
    """Write one report into the spool's journal: a temporary name, then a rename (never half a file)."""
    directory = os.path.join(spool, JOURNAL_DIR)
    os.makedirs(directory, exist_ok=True)
    count = int(report["execution_count"])
    temporary = os.path.join(directory, f".{count}.{os.getpid()}.tmp")
    with open(temporary, "wb") as out:
        out.write(encode(report))
    os.replace(temporary, os.path.join(directory, journal_name(count)))


@contextlib.contextmanager
def opened_journal(spool: str | os.PathLike[str]) -> Iterator[int]:
    """A descriptor of the spool's journal directory, reached without following a link (OSError if none).

    The spool is the kernel's; the journal directory in it is the sandbox's,
    which could make it a link to another sandbox's journal. Entries are
    then listed, read (read_journal_entry's `directory`) and removed through
    this descriptor.
    """
    fd = os.open(os.path.join(spool, JOURNAL_DIR), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def journal_name(count: int) -> str:
    """The journal file of a cell's snapshot report."""
    return f"{count}{JOURNAL_SUFFIX}"


def read_journaled_snapshot(name: str, sender: str, directory: int) -> dict[str, Any]:
    """The snapshot report in journal file `name` (<count>.frame) of `directory`; ProtocolError (or
    OSError) unless it is the snapshot of that cell."""
    count = int(name.removesuffix(JOURNAL_SUFFIX))
    report = read_journal_entry(name, sender, directory)
    if report["type"] != "snapshot" or report["execution_count"] != count:
        raise ProtocolError(f"it is not the snapshot of cell [{count}]")
    return report


def read_journal_entry(path: str | os.PathLike[str], sender: str, directory: int | None = None) -> dict[str, Any]:
    """One journaled report, checked as a frame from `sender`; ProtocolError (or OSError) if it is not one.

    With `directory` (opened_journal), `path` is a name in it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ProtocolError("a journal entry that is not a regular file")
        size, limit = info.st_size, channel_cap(sender)
        if size > HEADER.size + limit:
            raise ProtocolError(f"a journal file of {size} bytes, over the cap of {limit}")
        messages = FrameDecoder(sender, limit).feed(_read_exactly(fd, size) or b"")
    finally:
        os.close(fd)
    if len(messages) != 1:
        raise ProtocolError(f"a journal file holding {len(messages)} whole frames, not one")
    return messages[0]


def pack_buffers(buffers: list[bytes] | None) -> list[str]:
    """Binary buffers (comm messages) as base64 text for a JSON frame."""
    return [base64.b64encode(bytes(b)).decode("ascii") for b in buffers or []]


def unpack_buffers(encoded: list[str] | None) -> list[bytes]:
    try:
        return [base64.b64decode(b, validate=True) for b in encoded or []]
    except (ValueError, TypeError) as err:
        raise ProtocolError(f"comm buffers that are not base64 ({err})") from None
