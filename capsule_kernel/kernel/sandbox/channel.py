"""The sandbox's frames as the kernel reads them: one handler table, sequence checks, the snapshot reports.

A part of SandboxProcess (a mixin over its state): every frame is checked
against protocol/frames.py before a handler sees it; a frame out of sequence
or outside the vocabulary stops the sandbox (VIOLATION).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capsule_kernel.kernel.sandbox.pipes import (
    VIOLATION,
    read_available,
)
from capsule_kernel.protocol import frames
from capsule_kernel.protocol.deaths import process_exists


class FrameChannel:
    """Reading the frame and report pipes; a handler per frame type."""

    def _on_subshell_done(self, message: dict[str, Any]) -> None:
        future = self._subshell_cells.get(message["subshell"])
        if future is None or future.done():
            self._out_of_sequence(f"a 'subshell_done' for subshell {message['subshell']}, which ran no cell")
            return
        future.set_result(message["reply"])

    def _on_frames_readable(self) -> None:
        assert self._from_worker is not None
        data = read_available(self._from_worker)
        if data is None:
            return
        if not data:
            self._on_eof()
            return
        try:
            messages = self._decoder.feed(data)
        except frames.ProtocolError as err:
            self._on_violation(VIOLATION.format(what=err))
            self._on_eof()
            return
        for message in messages:
            if self.death_reason is not None and self.process_ended:
                break  # stopped for an earlier frame of this read: believe nothing after it
            self._dispatch(message)

    def _on_reports_readable(self) -> None:
        reports = self._reports
        assert reports is not None and self._loop is not None
        data = read_available(reports.fd)
        if data is None:
            return
        if not data:
            self._forget_fd(reports.fd)
            self._reports = None
            return
        try:
            messages = reports.decoder.feed(data)
        except frames.ProtocolError as err:
            # Written by the sandbox's snapshot children: a broken report is the sandbox breaking the protocol.
            self._forget_fd(reports.fd)
            self._reports = None
            self._give_up_in_flight(believe_the_journal=False)
            self._on_violation(VIOLATION.format(what=f"{err} on its snapshot report pipe"))
            return
        for message in messages:
            self._report(message)

    def _report(self, message: dict[str, Any]) -> None:
        """One snapshot report (from the report pipe, or from the journal of a worker that died)."""
        count = message["execution_count"]
        said = hashlib.sha256(frames.encode(message)).hexdigest()
        if self._reports_seen.get(count) == said:
            # Said twice (a worker passing on what its killed child journaled, which the child may
            # have sent after all): recorded once. (A cell outside history shares its count with
            # the next one, whose report says something else: that one is recorded too.)
            return
        self._reports_seen[count] = said
        for old in [cell for cell in self._reports_seen if cell < count - 256]:
            del self._reports_seen[old]
        after = message.get("after")
        if after is not None and after not in self._snapshotted:
            # A change on top of a snapshot that never came: recording it would hold a wrong state.
            message = {
                "type": "snapshot_failed",
                "execution_count": count,
                "reason": f"it builds on the snapshot of cell [{after}], which was not recorded",
            }
        if message["type"] == "snapshot":
            self._snapshotted.add(count)
            for old in [cell for cell in self._snapshotted if cell < count - 256]:
                self._snapshotted.discard(old)
        announced = self.snapshots_in_flight.pop(count, None) is not None
        if not announced:
            self._reported_early.add(count)  # read before the frame that announces it
        # Which cells this snapshot holds, reckoned here from the kernel's own bookkeeping: a
        # coalesced one its deferred cells; one a "done" announced only its cell (a cell that
        # is not stored in history shares its count with the next, which may be deferred).
        if count in self._covers:
            message["covers"] = self._covers.pop(count)
        else:
            message["covers"] = [count] if announced else self._take_covers(count)
        # Where the report's new chunks are, and whose it is: set here, on the
        # trusted side, over anything the report itself says.
        message["spool"] = self.spool
        message["sandbox"] = self.name
        self.on_event(message)

    async def snapshots_settled(self, timeout: float) -> None:
        """Wait until every snapshot this worker started has reported or died, and deferred ones were taken.

        A live worker takes the coalesced snapshot of deferred cells once it
        is idle; a dead one never will: those cells are lost (lost_cells).
        """
        deadline = self.clock() + timeout
        while (self.snapshots_in_flight or self.deferred) and self.clock() < deadline:
            if self.deferred and not self.snapshots_in_flight and self.process_ended:
                self._lost.extend(self.deferred)
                self.deferred = []
                break
            if self.snapshots_in_flight and self._reports is None:
                # Every writer has gone: whatever was written has been read.
                self._give_up_in_flight()
                continue
            earlier_running = False
            for count, pid in list(self.snapshots_in_flight.items()):
                if pid == 0 and not self.process_ended:
                    continue  # the worker has not forked it yet, or took it itself and reports it soon
                if process_exists(pid):
                    earlier_running = True
                    continue
                if pid == 0 and earlier_running:
                    continue  # taken by the worker behind a child that still runs: that one comes first
                # Gone: its report, if it wrote one, is in the pipe now, or else in the journal.
                self._on_reports_readable()
                if count in self.snapshots_in_flight:
                    self._from_journal(count)
            await asyncio.sleep(0.01)

    def lost_cells(self) -> list[int]:
        """Cells that ended well but whose state no snapshot of this sandbox will ever hold (it died first)."""
        return sorted(set(self._lost))

    def _give_up_in_flight(self, *, believe_the_journal: bool = True) -> None:
        """Every writer of the report pipe has gone: what did not report is in the journal, or lost.

        A sandbox that broke the protocol is believed no further: all of it is lost.
        """
        for count in sorted(self.snapshots_in_flight):
            if count in self.snapshots_in_flight:
                self._from_journal(count, believe_the_journal)

    def _from_journal(self, count: int, believe_the_journal: bool = True) -> None:
        """A snapshot whose report never came on the pipe: believed from the journal, or lost.

        A worker that took a cell's snapshot itself behind a child still in
        flight (worker/snapshots.py take_here) journals it before the reply
        and reports it after that child; killed in between, only the journal
        has it. The entry is read like any report (a frame from the snapshot
        sender, under its cap, never through a link) and believed only on top
        of a snapshot this sandbox did report (`after`).
        """
        report = self._journal_entry(count) if believe_the_journal else None
        if report is not None:
            self._report(report)
        if self.snapshots_in_flight.pop(count, None) is not None:
            self._lost.extend(self._covers.pop(count, [count]))

    def _journal_entry(self, count: int) -> dict[str, Any] | None:
        if not isinstance(self.spool, Path):
            return None
        try:
            with frames.opened_journal(self.spool) as directory:
                return frames.read_journaled_snapshot(frames.journal_name(count), frames.SNAPSHOT, directory)
        except (OSError, frames.ProtocolError):
            return None

    def _take_covers(self, count: int) -> list[int]:
        """The cells a snapshot named after `count` holds: it, and all deferred up to it."""
        covers = [cell for cell in self.deferred if cell < count] + [count]
        self.deferred = [cell for cell in self.deferred if cell > count]
        return covers

    def _frame_handlers(self) -> dict[str, Callable[[dict[str, Any]], None]]:
        """What the kernel does with each frame a sandbox may send it (frames.FRAMES says which)."""
        forward = self.on_event
        return {
            "ready": self._on_ready,
            "started": self._on_started,
            "done": self._on_done,
            "reply": self._on_reply,
            "snapshot_started": self._on_snapshot_started,
            "snapshot_unchanged": self._on_snapshot_unchanged,
            "stream": forward,
            "display": forward,
            "clear_output": forward,
            "execute_result": forward,
            "error": forward,
            "comm": forward,
            "input_request": forward,
            "magic": forward,
            "task": forward,
            "subshell_done": self._on_subshell_done,
        }

    def _dispatch(self, message: dict[str, Any]) -> None:
        handler = self._handlers.get(message["type"])
        if handler is None:
            self._on_violation(VIOLATION.format(what=f"a {message['type']!r} frame on its frame pipe"))
            return
        tag = message.get("subshell")
        if tag is not None and tag not in self._subshells_given:
            self._out_of_sequence(f"output for subshell {tag}, which it was never given")
            return
        if tag is not None and tag not in self.subshells_open and message["type"] != "subshell_done":
            return  # what a deleted subshell's thread still said: nobody asked for it any more
        handler(message)

    def _out_of_sequence(self, what: str) -> None:
        self._on_violation(VIOLATION.format(what=f"{what}, out of sequence"))

    def _on_ready(self, message: dict[str, Any]) -> None:
        if self._ready is None or self._ready.done():
            self._out_of_sequence("a second 'ready'")
            return
        self._ready.set_result(message)

    def _on_started(self, message: dict[str, Any]) -> None:
        if self._started is None or self._started.done() or message["execution_count"] != self._cell_count:
            self._out_of_sequence("a 'started' for no cell it was given")
            return
        self._cell_taken()
        self._started.set_result(True)

    def _on_done(self, message: dict[str, Any]) -> None:
        if self._done is None or self._done.done() or self._started is None or not self._started.done():
            self._out_of_sequence("a 'done' while no cell of its ran")
            return
        snapshot = message.get("snapshot")
        if snapshot is not None and snapshot != self._cell_count:
            self._out_of_sequence(f"a 'done' announcing a snapshot of cell [{snapshot}]")
            return
        # Everything the cell wrote to its raw descriptors is already in the
        # pipes: forward it now, so that it precedes the execute_reply.
        self.drain_raw_output()
        if message.get("deferred"):
            if snapshot is not None:
                self._out_of_sequence("a 'done' both announcing and deferring a snapshot")
                return
            self.deferred.append(self._cell_count)
        self.last_done_deferred = bool(message.get("deferred"))
        self.last_done_snapshot = snapshot
        if snapshot is not None and snapshot not in self._reported_early:
            self.snapshots_in_flight[snapshot] = 0  # its pid follows
        self._reported_early.discard(snapshot)
        self._done.set_result(message["reply"])

    def _on_reply(self, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        if not isinstance(request_id, int) or not 0 < request_id <= self._next_request:
            self._out_of_sequence("a 'reply' to a request the kernel never made")
            return
        future = self._replies.get(request_id)
        if future is not None and not future.done():
            future.set_result(message["content"])

    def _on_snapshot_started(self, message: dict[str, Any]) -> None:
        count = message["execution_count"]
        pid = self.host_pid_of_child(message["pid"])
        if count in self.deferred:
            # A coalesced snapshot: it holds every deferred cell up to this one.
            self._covers[count] = self._take_covers(count)
            self.snapshots_in_flight[count] = pid
            return
        if count in self._reported_early and count != self.last_done_snapshot:
            self._reported_early.discard(count)  # a coalesced snapshot whose report was read first
            return
        if count != self.last_done_snapshot:
            self._out_of_sequence(f"a 'snapshot_started' for cell [{count}], which announced none")
            return
        if count in self.snapshots_in_flight:  # else its report was read already
            self.snapshots_in_flight[count] = pid

    def host_pid_of_child(self, pid: int) -> int:
        """The host pid of a process the worker forked, from the pid it reported (its own view).

        The kernel checks whether a snapshot child still lives by its pid; a
        sandbox in a PID namespace names it by a number that means another
        process (or none) on the host. -1 when it cannot be found (gone already).
        """
        return pid

    def _on_snapshot_unchanged(self, message: dict[str, Any]) -> None:
        """The deferred cells up to this one changed nothing: recorded as an empty snapshot of it."""
        count = message["execution_count"]
        if count not in self.deferred:
            self._out_of_sequence(f"a 'snapshot_unchanged' for cell [{count}], which was not deferred")
            return
        covers = self._take_covers(count)
        self.on_event(
            {"type": "snapshot", "execution_count": count, "entries": {}, "removed": [], "written": 0,
             "covers": covers, "spool": self.spool, "sandbox": self.name}
        )  # fmt: skip
