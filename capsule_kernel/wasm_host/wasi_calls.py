"""The WASI calls the host answers itself: reads and writes on the frame descriptors, the clock, poll_oneoff.

A part of WasmHost (a mixin over its state). Every pointer and length comes
from the guest and is checked against its linear memory; a call is where a
soft stop (an interrupt, a deadline) is delivered, as an errno the guest's
CPython turns into KeyboardInterrupt or CellTimeout.
"""

from __future__ import annotations

import struct
import time
from typing import Any

from capsule_kernel.protocol import frames

# WASI errno values (wasi_snapshot_preview1).
SUCCESS, BADF, CANCELED, INVAL, SPIPE, TIMEDOUT = 0, 8, 11, 28, 70, 73


class ShadowedWasi:
    """fd_pread/fd_pwrite on the frame descriptors, clock_time_get, poll_oneoff."""

    def _cancel_errno(self) -> int | None:
        """The errno that tells the guest to stop its cell, if a stop is pending."""
        if not self.in_cell:
            return None
        why = self.stopper.take_pending()
        if why is None:
            return None
        return CANCELED if why == "interrupt" else TIMEDOUT

    @staticmethod
    def _iovecs(caller: Any, memory: Any, iovs: int, count: int) -> list[tuple[int, int]]:
        raw = memory.read(caller, iovs, iovs + 8 * count)
        return [struct.unpack_from("<II", raw, 8 * i) for i in range(count)]

    def _fd_pread(self, caller: Any, fd: int, iovs: int, iovs_len: int, offset: int, nread: int) -> int:  # noqa: ARG002
        if fd != 0:
            return SPIPE  # positional reads are the channel's; files are read sequentially
        if (cancel := self._cancel_errno()) is not None:
            return cancel
        if self.from_guest.pending_bytes:
            # Waiting for the kernel with a frame half written: the channel is out of step for good.
            self._violation("an unfinished frame, then waited for the kernel")
        while not self.to_guest:
            if self.phase == "done":
                # The guest asks for its next frame: the cell is over, truly (a forged
                # "done" followed by more work never gets here). Its clocks stop now.
                self._cell_idle()
            message = self.inbox.get()
            if message is None:
                message = {"type": "eof"}
            if message["type"] == "_wake":
                if (cancel := self._cancel_errno()) is not None:
                    return cancel
                continue
            message = self.kernel_handlers[message["type"]](caller, message)
            if message is not None:
                self.to_guest += frames.encode(message)
        memory = caller["memory"]
        given = 0
        for pointer, length in self._iovecs(caller, memory, iovs, iovs_len):
            piece = bytes(self.to_guest[:length])
            memory.write(caller, piece, pointer)
            del self.to_guest[: len(piece)]
            given += len(piece)
            if not self.to_guest:
                break
        memory.write(caller, struct.pack("<I", given), nread)
        return SUCCESS

    def _fd_pwrite(self, caller: Any, fd: int, iovs: int, iovs_len: int, offset: int, nwritten: int) -> int:  # noqa: ARG002
        if fd != 1:
            return SPIPE
        if (cancel := self._cancel_errno()) is not None:
            return cancel
        memory = caller["memory"]
        data = b"".join(
            memory.read(caller, pointer, pointer + length)
            for pointer, length in self._iovecs(caller, memory, iovs, iovs_len)
        )
        try:
            messages = self.from_guest.feed(data)
        except frames.ProtocolError as err:
            self._violation(str(err))
        for message in messages:
            self.guest_handlers[message["type"]](caller, message)
        memory.write(caller, struct.pack("<I", len(data)), nwritten)
        return SUCCESS

    @staticmethod
    def _clock_now(clock_id: int) -> int | None:
        if clock_id == 0:
            return time.time_ns()
        if clock_id == 1:
            return time.monotonic_ns()
        if clock_id in (2, 3):
            return time.process_time_ns() if clock_id == 2 else time.thread_time_ns()
        return None

    def _clock_time_get(self, caller: Any, clock_id: int, precision: int, result: int) -> int:  # noqa: ARG002
        now = self._clock_now(clock_id)
        if now is None:
            return INVAL
        caller["memory"].write(caller, struct.pack("<Q", now), result)
        return SUCCESS

    def _poll_oneoff(self, caller: Any, subscriptions: int, events: int, count: int, nevents: int) -> int:
        """time.sleep and select: clocks wait (up to the deadline), descriptors are always ready."""
        memory = caller["memory"]
        raw = memory.read(caller, subscriptions, subscriptions + 48 * count)
        soonest: float | None = None
        clocks, ready = [], []
        for i in range(count):
            userdata, tag = struct.unpack_from("<QB", raw, 48 * i)
            if tag == 0:
                clock_id, timeout, _, flags = struct.unpack_from("<I4xQQH", raw, 48 * i + 16)
                if flags & 1:  # an absolute time on that clock
                    timeout = max(0, timeout - (self._clock_now(clock_id) or 0))
                seconds = timeout / 1e9
                clocks.append((seconds, userdata))
                soonest = seconds if soonest is None else min(soonest, seconds)
            else:
                ready.append((userdata, tag))
        if soonest is not None and not ready:
            stop = self.stopper
            if stop.sleep_wake.wait(soonest) and self.in_cell and stop.pending:
                # End the sleep; the reason goes out at the guest's next channel call.
                return CANCELED if stop.pending == "interrupt" else TIMEDOUT
        out = bytearray()
        for userdata, tag in ready:
            out += struct.pack("<QHBxxxxxQHxxxxxx", userdata, SUCCESS, tag, 0, 0)
        # Descriptors answer at once; otherwise we slept until the soonest clock.
        due = 0.0 if ready else (soonest or 0.0)
        for seconds, userdata in clocks:
            if seconds <= due:
                out += struct.pack("<QHBxxxxxQHxxxxxx", userdata, SUCCESS, 0, 0, 0)
        memory.write(caller, bytes(out), events)
        memory.write(caller, struct.pack("<I", len(out) // 32), nevents)
        return SUCCESS
