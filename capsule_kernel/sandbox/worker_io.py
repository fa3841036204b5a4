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

from capsule_kernel.sandbox import frames
from capsule_kernel.sandbox.inside.streams import FrameStream

# Signals the kernel uses to interrupt a cell: user interrupt, wall-clock
# timeout, CPU limit. Blocked while a frame is being written.
INTERRUPT_SIGNALS = {signal.SIGINT, signal.SIGUSR2, signal.SIGXCPU}

# Messages the main thread waits for while a cell runs (input() and %capsule
# replies) go to their own queue; everything else waits for the idle loop.
_REPLY_TYPES = {"input_reply", "magic_reply", "task_reply"}


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
    """sys.stdout / sys.stderr of the worker: a FrameStream with a real descriptor and a flusher thread."""

    def __init__(self, name: str, channel: FrameChannel, flusher: StreamFlusher, fd: int) -> None:
        super().__init__(name, channel.send, threading.RLock())
        self._flusher = flusher
        self._fd = fd
        flusher.streams.append(self)

    def fileno(self) -> int:
        # The real descriptor is a pipe the kernel forwards too, so code that
        # hands sys.stdout to a subprocess still reaches the notebook.
        return self._fd

    def written(self, text: str) -> None:  # noqa: ARG002 - the hook's signature
        self._flusher.wake()
