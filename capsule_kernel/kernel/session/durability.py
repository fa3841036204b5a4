"""Each cell as a durable promise: started before it runs, settled once its checkpoint is recorded.

Subscribes to the cell lifecycle of the session controller; a failure here
costs only the bookkeeping, never the cell.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capsule_kernel.kernel.checkpoint.promises import CellPromises
    from capsule_kernel.kernel.checkpoint.recorder import Checkpoints


class CellDurability:
    def __init__(self, checkpoints: Checkpoints, kernel_id: str, log: logging.Logger) -> None:
        self.checkpoints = checkpoints
        self.kernel_id = kernel_id
        self.log = log
        self.promises: CellPromises | None = None
        self._outputs_by_cell: dict[int, dict[str, int]] = {}
        # Counts resolved before their reply was handled (the report can beat the reply).
        self._recorded: dict[int, dict[str, Any]] = {}

    def open(self) -> None:
        """Durable promises need the running loop; resonate-sdk is imported only now (it is slow to import)."""
        store = self.checkpoints.store
        if store is None:
            return
        try:
            from capsule_kernel.kernel.checkpoint.promises import CellPromises

            self.promises = CellPromises.open(store.path, self.kernel_id, self.log, os.environ)
        except Exception:
            self.log.exception("durable promises are off: resonate-sdk could not start")

    def started(self, session: str, count: int, code: str, silent: bool, kind: str, limits: dict[str, Any]) -> None:
        if self.promises is None or silent:
            return
        first_line = next((line for line in code.splitlines() if line.strip()), "")[:120]
        param = {
            "code_sha256": hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest(),
            "first_line": first_line,
            "parent_checkpoint": self.checkpoints.latest_id(session),
            "sandbox": kind,
            "limits": limits,
        }
        self.promises.started(session, count, param)

    async def created(self, session: str, count: int, silent: bool) -> None:
        """Before the reply: the cell's promise exists, so a later kernel knows the cell ran (adoption.py)."""
        if self.promises is not None and not silent:
            await self.promises.created(session, count)

    def after_reply(
        self, session: str, count: int, silent: bool, reply: dict[str, Any], outputs: Counter[str], snapshot: int | None
    ) -> None:
        """Reject a failed cell now; resolve a good one once its checkpoint is recorded."""
        if snapshot is not None and reply.get("status") == "ok":
            self.checkpoints.window.replied(count)
        if self.promises is None or silent:
            return
        counted = dict(outputs)
        if reply.get("status") != "ok":
            value = {"ename": reply.get("ename"), "evalue": reply.get("evalue"), "outputs": counted}
            self.promises.rejected(session, count, value)
        elif snapshot is None:
            value = {"checkpoint": self.checkpoints.latest_id(session), "changed": False, "outputs": counted}
            self.promises.resolved(session, count, value)
        elif count in self._recorded:
            self.promises.resolved(session, count, {**self._recorded.pop(count), "outputs": counted})
        else:
            self._outputs_by_cell[count] = counted

    async def recorded(self, session: str, event: dict[str, Any], recording: asyncio.Task) -> None:
        checkpoint = await recording
        count = int(event.get("execution_count", 0))
        changed = bool(event.get("entries") or event.get("removed"))
        covers = event.get("covers") or [count]
        if checkpoint is not None or not changed:
            self.checkpoints.window.on_disk(covers)  # committed (an unchanged one as a row of its own)
        else:
            self.checkpoints.window.never(covers)
        checkpoint_id = checkpoint.id if checkpoint else None
        if checkpoint is None and not changed:
            # The snapshot found nothing new: the latest checkpoint still holds.
            checkpoint_id = self.checkpoints.latest_id(session)
        value: dict[str, Any] = {"checkpoint": checkpoint_id, "changed": changed}
        if checkpoint_id is None:
            value["checkpoint_error"] = self.checkpoints.failure(count) or "no checkpoint"
        self._settle_covered(session, event, value)

    def snapshot_failed(self, session: str, event: dict[str, Any]) -> None:
        count = int(event.get("execution_count", 0))
        reason = event.get("reason", "")
        self.log.warning("checkpoint after cell %s failed: %s", count, reason)
        self.checkpoints.failed(session, count, reason)
        self.checkpoints.window.never(event.get("covers") or [count])
        self._settle_covered(session, event, {"checkpoint": None, "checkpoint_error": reason})

    def _settle_covered(self, session: str, event: dict[str, Any], value: dict[str, Any]) -> None:
        """Settle every cell a (coalesced) snapshot holds; the earlier ones say which snapshot held them."""
        count = int(event.get("execution_count", 0))
        for covered in event.get("covers") or [count]:
            self._settle(session, covered, value if covered == count else {**value, "coalesced_into": count})

    def _settle(self, session: str, count: int, value: dict[str, Any]) -> None:
        if self.promises is None:
            return
        outputs = self._outputs_by_cell.pop(count, None)
        if outputs is None:
            self._recorded[count] = value  # the reply is still on its way
            while len(self._recorded) > 64:
                self._recorded.pop(next(iter(self._recorded)))
            return
        self.promises.resolved(session, count, {**value, "outputs": outputs})

    async def close(self) -> None:
        if self.promises is not None:
            await self.promises.close()
