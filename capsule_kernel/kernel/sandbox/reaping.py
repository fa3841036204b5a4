"""The end of a sandbox: its raw output drained, its process reaped, the cause of its death said.

A part of SandboxProcess (a mixin over its state). Raw output (C code,
faulthandler, shell commands) is read from the sandbox's pipes, held a moment
for whole lines, and bounded like every other stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from capsule_kernel.kernel.sandbox import crash_dump
from capsule_kernel.kernel.sandbox.pipes import (
    RAW_LINE_WAIT_SECONDS,
    SNAPSHOT_PATIENCE_SECONDS,
    _Pipe,
    read_available,
)
from capsule_kernel.protocol.deaths import describe_exit
from capsule_kernel.protocol.limits import format_size


class SandboxReaping:
    """Raw output, end of file, reaping and the sentence that says why it ended."""

    def _on_raw_output(self, pipe: _Pipe) -> None:
        data = read_available(pipe.fd)
        if data is None:
            return
        assert self._loop is not None
        if not data:
            self._loop.remove_reader(pipe.fd)
            self._emit_raw(pipe, everything=True)
            return
        pipe.pending += pipe.decoder.decode(data)
        self._emit_raw(pipe)

    def _emit_raw(self, pipe: _Pipe, *, everything: bool = False) -> None:
        """Send the whole lines read so far (all of it with everything); hold a partial line back a moment."""
        if pipe.timer is not None:
            pipe.timer.cancel()
            pipe.timer = None
        text = pipe.pending
        cut = len(text) if everything else max(text.rfind("\n"), text.rfind("\r")) + 1
        pipe.pending = text[cut:]
        if cut:
            self.on_event({"type": "stream", "name": pipe.name, "text": text[:cut]})
        if pipe.pending and self._loop is not None:
            pipe.timer = self._loop.call_later(RAW_LINE_WAIT_SECONDS, self._flush_raw, pipe)

    def _flush_raw(self, pipe: _Pipe) -> None:
        pipe.timer = None
        self._emit_raw(pipe, everything=True)

    def drain_raw_output(self) -> None:
        for pipe in self._pipes:
            chunks = []
            while data := read_available(pipe.fd):
                chunks.append(data)
            pipe.pending += pipe.decoder.decode(b"".join(chunks))
            self._emit_raw(pipe, everything=True)

    def _on_eof(self) -> None:
        assert self._loop is not None
        if self._from_worker is not None:
            self._loop.remove_reader(self._from_worker)
        self._reaped()

    def _forget_fd(self, fd: int) -> None:
        """Stop watching fd, then close it (in that order: never close a watched fd).

        Closing first leaves the loop's selector holding a key for a number
        the next pipe reuses; add_reader on that pipe then only swaps the
        key's callback and never arms epoll for it, so the next sandbox's
        frames go unread (its ``ready`` never arrives). The worker's frame
        pipe is still watched whenever the sandbox is killed before its end
        of file has been read.
        """
        assert self._loop is not None
        self._loop.remove_reader(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def _reaped(self) -> asyncio.Future:
        """The one task that buries this worker; every caller shares it."""
        if self._reap_task is None:
            assert self._loop is not None
            self._reap_task = self._loop.create_task(self._reap())
        return self._reap_task

    async def _reap(self) -> None:
        """Collect the exit status, forward last words, release everything."""
        if self.process is None or self._exited is None:
            return
        # The sandbox's supervisor lets snapshot children finish before the
        # sandbox ends (they report on their own pipe): wait for them too.
        patience = SNAPSHOT_PATIENCE_SECONDS if self.snapshots_in_flight else 5.0
        deadline = self.clock() + patience
        while self.process.poll() is None and self.clock() < deadline:
            await asyncio.sleep(0.01)
        if self.process.poll() is None:
            self.kill()
            self.process.wait()
        self.drain_raw_output()
        self.crash_dump = crash_dump.read_dump(self.spool)
        if self.death_reason is None:
            self.death_reason = self._cause_of_death()
        assert self._loop is not None
        for pipe in self._pipes:
            self._forget_fd(pipe.fd)
        self._pipes = []
        for fd in (self._to_worker, self._from_worker):
            if fd is not None:
                self._forget_fd(fd)
        self._to_worker = self._from_worker = None
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self._chunks is not None:
            self._chunks.close()
            self._chunks = None
        self._exited.set()
        if self._launched is not None:
            launch = self._launched
            # The cgroup can go once its last process has fully exited (a moment after the kill).
            deadline = self.clock() + 2.0
            launch.discard(keep_spool=True)
            while launch.cgroup is not None and self.clock() < deadline:
                await asyncio.sleep(0.02)
                launch.discard(keep_spool=True)
            # The last reports may still be being adopted from the spool.
            self._loop.call_later(SNAPSHOT_PATIENCE_SECONDS, launch.remove_spool)

    def _cause_of_death(self) -> str:
        assert self.process is not None
        code = self.process.returncode
        if self._launched is not None and self._launched.confined and code is not None and 128 < code <= 128 + 64:
            code = -(code - 128)  # bubblewrap's init reports a signal as 128 + its number
        cgroup = self._cgroup
        if cgroup is not None and cgroup.oom_kills() > 0 and self.limits.memory:  # its own cgroup: counts from 0
            return (
                f"was killed for exceeding the sandbox memory limit of {format_size(self.limits.memory)} "
                "(memory: every process of the sandbox and its /tmp files together); "
                "raise it with %capsule limits --memory SIZE"
            )
        return describe_exit(code, self.limits)
