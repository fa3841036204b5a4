"""What the guest sends, and when it may: one handler per frame type, with sequence checks.

A part of WasmHost (a mixin over its state). A frame out of sequence or
outside the vocabulary is a violation and ends the guest; a snapshot's pickles
are stored as bytes (protocol/chunks.write_entry), never unpickled.
"""

from __future__ import annotations

import base64
import contextlib
import os
from typing import Any

from capsule_kernel.protocol import chunks, crash_points, frames

# The fuel a store holds when no budget applies (a budget is added on top of what is left).
UNLIMITED_FUEL = 1 << 62


class GuestFrames:
    """The guest's frames, each with the phase it may come in."""

    def _forward(self, caller: Any, message: dict[str, Any]) -> None:  # noqa: ARG002
        self.send(message)

    def _guest_ready(self, caller: Any, message: dict[str, Any]) -> None:  # noqa: ARG002
        if self.ready_sent:
            self._violation("a second 'ready'")
        self.ready_sent = True
        self.send({"type": "ready", "python": message["python"], "enforcement": self.enforcement, "pid": os.getpid()})

    def _guest_cell_start(self, caller: Any, message: dict[str, Any]) -> None:  # noqa: ARG002
        """Fuel is reported from here (the cell's own code, not the guest's parsing); budgets ignore it."""
        if self.phase == "running" and self.fuel_at_start == (self.fuel_budget or UNLIMITED_FUEL):
            self.fuel_at_start = self.wasmtime.Store.get_fuel(caller)

    def _guest_cell_end(self, caller: Any, message: dict[str, Any]) -> None:  # noqa: ARG002
        """The cell's code has finished; the snapshot follows, once, with an allowance of its own.

        A forged mark gains at most that allowance once per cell (another
        budget as large as the cell's), never unlimited fuel; the deadline
        stays armed until the guest is idle.
        """
        if self.phase != "running":
            return  # a repeated mark: believed for nothing
        self.phase = "ended"
        left = self.wasmtime.Store.get_fuel(caller)
        self.last_fuel = max(0, min(self.fuel_at_start - left, self.fuel_at_start))
        if self.fuel_budget:
            self.wasmtime.Store.set_fuel(caller, min(left + self.fuel_budget, UNLIMITED_FUEL))

    def _guest_snapshot(self, caller: Any, message: dict[str, Any]) -> None:  # noqa: ARG002
        if self.phase != "ended" or message["execution_count"] != self.cell or self.snapshot_sent is not None:
            self._violation("a 'snapshot_data' frame out of sequence")
        self.snapshot_sent = self.cell
        self._store_snapshot(message)

    def _guest_snapshot_failed(self, caller: Any, message: dict[str, Any]) -> None:  # noqa: ARG002
        if self.phase != "ended" or message["execution_count"] != self.cell:
            self._violation("a 'snapshot_failed' frame out of sequence")
        self.snapshot_sent = self.cell
        self._report(message)

    def _guest_done(self, caller: Any, message: dict[str, Any]) -> None:
        if self.phase not in ("running", "ended"):
            self._violation("a 'done' while no cell ran")
        if self.phase == "running":
            self._guest_cell_end(caller, message)
        self.phase = "done"
        fuel, self.last_fuel = self.last_fuel, None
        self.send({"type": "done", "reply": message["reply"], "snapshot": self.snapshot_sent, "fuel_consumed": fuel})

    def _cell_idle(self) -> None:
        self.stopper.end_cell()
        self.in_cell = False
        self.phase = "idle"

    def _report(self, report: dict[str, Any]) -> None:
        """Snapshot reports go on the report pipe, as the subprocess sandbox's snapshot children write them.

        A snapshot is journaled in the spool first (frames.journal): if the
        kernel dies before recording it, the next kernel adopts it.
        """
        if self.spool is not None and report["type"] == "snapshot":
            count = report["execution_count"]  # this cell's: _guest_snapshot checked it
            crash_points.reach("wasm.before_journal", count)
            with contextlib.suppress(OSError):
                frames.journal(self.spool, report)
            crash_points.reach("wasm.after_journal", count)
        if self.report_fd is not None:
            with contextlib.suppress(OSError):
                frames.write_frame(self.report_fd, report)

    def _store_snapshot(self, message: dict[str, Any]) -> None:
        """Write the guest's pickles as chunks (never unpickled here) and report like a fork child."""
        count = message.get("execution_count")
        if self.chunk_root is None:
            self._report({"type": "snapshot_failed", "execution_count": count, "reason": "checkpoints are off"})
            return
        entries, written = {}, 0
        try:
            for name, entry in dict(message.get("entries", {})).items():
                entry = dict(entry)
                if "data" not in entry:
                    entries[name] = entry
                    continue
                data = base64.b64decode(entry.pop("data"))
                buffers = [base64.b64decode(b) for b in entry.pop("buffer_data", [])]
                # Chunk names come from the guest: hash the bytes here instead.
                entry.pop("pickle", None)
                entry.pop("buffers", None)
                entries[name], new_bytes = chunks.write_entry(self.chunk_root, entry, data, buffers)
                written += new_bytes
        except (OSError, ValueError) as err:
            self._report(
                {"type": "snapshot_failed", "execution_count": count, "reason": f"{type(err).__name__}: {err}"}
            )
            return
        report = {
            "type": "snapshot",
            "execution_count": count,
            "entries": entries,
            "removed": list(message.get("removed", [])),
            "written": written,
        }
        self._report(report)
