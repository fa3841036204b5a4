"""The worker's side of the frame pipe: sending, receiving, and stdout/stderr.

Runs INSIDE the sandbox. Frames are written whole with the interrupting
signals blocked, so a KeyboardInterrupt or a timeout can never cut a frame in
half and desynchronize the kernel's reader.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from typing import Any

from capsule_kernel.inside.streams import FrameStream
from capsule_kernel.protocol import frames

# Signals the kernel uses to interrupt a cell: user interrupt, wall-clock
# timeout, CPU limit. Blocked while a frame is being written.
INTERRUPT_SIGNALS = {signal.SIGINT, signal.SIGUSR2, signal.SIGXCPU}

# Messages the main thread waits for while a cell runs (input() and %capsule
# replies) go to their own queue; what is for a subshell goes to its thread at
# once (worker_subshells); everything else waits for the idle loop.
_REPLY_TYPES = {"input_reply", "magic_reply", "task_reply"}
_SUBSHELL_TYPES = {"subshell", "subshell_execute"}
# What a subshell's thread sends is filed under its subshell (streams are tagged by their buffers).
_TAGGED_OUTPUTS = {"display", "clear_output", "execute_result", "error", "comm"}
_THREAD = threading.local()


def current_subshell() -> int | None:
    """The subshell whose thread this is (worker_subshells), None on the main shell and other threads."""
    return getattr(_THREAD, "subshell", None)


def serve_subshell(tag: int) -> None:
    """This thread is subshell `tag`'s from now on: what it sends is filed under it."""
    _THREAD.subshell = tag


class FrameChannel:
    """Both directions of the kernel pipe, safe to use from any thread."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._read_fd = read_fd
        self._write_fd = write_fd
        self._write_lock = threading.Lock()
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        # Set (before the interrupt) once the kernel's end of the pipe closed: no cell starts after it.
        self.kernel_gone = threading.Event()
        # Frames for a subshell's thread (worker_subshells.Subshells.take), handed over by the reader.
        self.to_subshells: Any = None
        self._reader = threading.Thread(target=self._read_loop, name="capsule-frame-reader", daemon=True)

    def start(self) -> None:
        self._reader.start()

    def close_after_fork(self) -> None:
        """In a forked child: let go of both ends, and never use the channel again.

        The kernel learns that the worker died from end-of-file on this pipe;
        a snapshot child still holding the write end would keep it from
        noticing for as long as the child runs.
        """
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    def send(self, message: dict[str, Any]) -> None:
        tag = current_subshell()
        if tag is not None and message["type"] in _TAGGED_OUTPUTS and "subshell" not in message:
            message = {**message, "subshell": tag}
        frame = frames.encode(message)
        with self._write_lock:
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPT_SIGNALS)
            try:
                view = memoryview(frame)
                while view:
                    written = os.write(self._write_fd, view)
                    view = view[written:]
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _read_loop(self) -> None:
        while True:
            try:
                message = frames.read_frame(self._read_fd, frames.KERNEL)
            except (OSError, frames.ProtocolError):
                message = None
            if message is None:
                # The kernel is gone: nobody will ever read our output. A cell still
                # running is interrupted (an idle worker ignores it), so that the worker
                # ends soon; its keeper (keeper.py) ends the sandbox if it does not.
                self.kernel_gone.set()
                self.inbox.put({"type": "eof"})
                self.replies.put({"type": "eof"})
                os.kill(os.getpid(), signal.SIGINT)
                return
            if message["type"] in _REPLY_TYPES:
                self.replies.put(message)
            elif (message["type"] in _SUBSHELL_TYPES or "subshell" in message) and self.to_subshells is not None:
                self.to_subshells(message)
            else:
                self.inbox.put(message)


class StreamFlusher:
    """Sends buffered stdout/stderr shortly after it is written.

    A short coalescing delay turns a burst of small writes (print writes the
    text and the newline separately) into one frame, while a line printed once
    a second still reaches the notebook once a second.
    """

    COALESCE_SECONDS = 0.01

    def __init__(self) -> None:
        self.streams: list[ProtocolStream] = []
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capsule-stream-flusher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def flush_all(self) -> None:
        for stream in self.streams:
            stream.flush()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self.COALESCE_SECONDS)
            self._wake.clear()
            try:
                self.flush_all()
            except Exception:  # noqa: BLE001 - a dead pipe ends the worker elsewhere
                return


class ProtocolStream(FrameStream):
    """sys.stdout / sys.stderr of the worker: a FrameStream with a real descriptor and a flusher thread.

    What a subshell's thread writes goes to a buffer of that subshell's, sent
    tagged with it: the kernel shows it in the subshell's cell, never in the
    main shell's, even when the flusher thread sends both.
    """

    def __init__(self, name: str, channel: FrameChannel, flusher: StreamFlusher, fd: int) -> None:
        super().__init__(name, channel.send, threading.RLock())
        self._channel = channel
        self._flusher = flusher
        self._fd = fd
        self._subshells: dict[int, FrameStream] = {}
        flusher.streams.append(self)

    def write(self, text: str) -> int:
        tag = current_subshell()
        if tag is None:
            return super().write(text)
        buffer = self._subshells.get(tag)
        if buffer is None:
            buffer = self._subshells[tag] = _SubshellBuffer(self.name, tag, self._channel, self._flusher)
        return buffer.write(text)

    def flush(self) -> None:
        super().flush()
        for buffer in list(self._subshells.values()):
            buffer.flush()

    def drop_subshell(self, tag: int) -> None:
        """The subshell's thread has ended: send what it left, and forget its buffer."""
        buffer = self._subshells.pop(tag, None)
        if buffer is not None:
            buffer.flush()

    def fileno(self) -> int:
        # The real descriptor is a pipe the kernel forwards too, so code that
        # hands sys.stdout to a subprocess still reaches the notebook.
        return self._fd

    def written(self, text: str) -> None:  # noqa: ARG002 - the hook's signature
        self._flusher.wake()


class _SubshellBuffer(FrameStream):
    """A subshell's part of sys.stdout or sys.stderr: its frames carry the subshell's number."""

    def __init__(self, name: str, tag: int, channel: FrameChannel, flusher: StreamFlusher) -> None:
        super().__init__(name, lambda message: channel.send({**message, "subshell": tag}), threading.RLock())
        self._flusher = flusher

    def written(self, text: str) -> None:  # noqa: ARG002 - the hook's signature
        self._flusher.wake()
