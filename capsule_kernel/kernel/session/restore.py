"""The session's identity and its past: which session this notebook owns, switching, resume and adoption.

A part of SessionController (a mixin over its state). The session's name comes
from the operator or the frontend, never from a frame; a notebook switches only
into sessions it owns (Policy.check_session).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from capsule_kernel.kernel import magics
from capsule_kernel.kernel.checkpoint.rows import CheckpointRefused, switched_in_by_another
from capsule_kernel.kernel.policy import PolicyRefused
from capsule_kernel.kernel.sandbox.process import SandboxDied, SandboxProcess
from capsule_kernel.kernel.session.cells import Cell
from capsule_kernel.kernel.session.identity import frontend_notebook_path


class SessionRestore:
    """Start-up (offer or auto-resume), the session this notebook owns, switching, resume, adoption."""

    async def begin(self) -> None:
        """Once, on the kernel's loop: promises, then the first sandbox (and an offered or automatic resume)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.durability.open()
        self._starting = asyncio.ensure_future(self._start_first_sandbox())
        self._starting.add_done_callback(self._log_start_failure)

    async def _start_first_sandbox(self) -> SandboxProcess:
        sandbox = await self._start_sandbox()
        # What dead kernels' sandboxes journaled after their last record becomes checkpoints
        # before the resume is offered (waiting for this session's, if it resumes at once).
        await self.adopt_orphans(wait=self.policy.settings.auto_resume)
        try:
            latest = self.checkpoints.latest(self.session_name)
        except CheckpointRefused as err:
            self._notices.append(f"Capsule: {err}\n")
            return sandbox
        if latest is not None and self._left_by_restart(latest):
            latest = None  # the user's Restart chose an empty namespace: neither resumed nor offered
        if latest is not None and (why := switched_in_by_another(latest, self.notebook)):
            self._notices.append(f"Capsule: not resumed: {why}\n")
            latest = None
        if latest is not None and self.policy.settings.auto_resume:
            try:
                resumed = await self.resume(latest, sandbox)
                self._notices.append(resumed + "\n")
                return sandbox
            except (SandboxDied, TimeoutError) as err:
                self.log.error("auto_resume failed: %s", err)
                self._notices.append(f"auto_resume failed ({err}); the namespace starts empty.\n")
                sandbox = await self._start_sandbox()
        elif latest is not None:
            self._offer_resume()
        # A new kernel (a restart too) starts empty: the session's checkpoints are an earlier kernel's.
        self.checkpoints.begin_afresh(self.session_name)
        return sandbox

    async def adopt_orphans(self, *, wait: bool) -> None:
        """Adopt dead kernels' journaled snapshots (checkpoint/adoption.py); with wait, this session's too."""
        try:
            adopted = await self.checkpoints.adopt_orphans(
                self.durability.promises, wait_for=self.session_name if wait else None
            )
        except Exception:
            self.log.exception("adopting journaled snapshots failed")
            return
        if adopted.refused:
            self._notices.append(
                "Capsule: snapshots journaled by a sandbox of an earlier kernel were not believed: "
                + "; ".join(adopted.refused[:5])
                + "\n"
            )
        if self.durability.promises is not None and adopted.recorded:
            await self.durability.promises.settled()

    async def lost_cells(self, checkpoint: Any) -> list[dict[str, Any]]:
        """Cells that dead kernels ran after `checkpoint` and never saved; settled as lost, so named once.

        They are the session's pending cell promises of kernels that are gone
        (adoption has settled every one whose snapshot was journaled).
        """
        promises = self.durability.promises
        if promises is None:
            return []
        cells = [
            cell for cell in await promises.interrupted(self.session_name) if cell["cell"] > checkpoint.execution_count
        ]
        for cell in cells:
            promises.rejected_for(
                self.session_name, cell["kernel"], cell["cell"], {"lost": True, "resumed_from": checkpoint.id}
            )
        return cells

    async def resume(self, checkpoint: Any, sandbox: SandboxProcess | None = None) -> str:
        """Bring back a checkpoint from an earlier kernel; numbering goes on from it."""
        if sandbox is None:
            sandbox = await self.ready_sandbox()
        outcome = await self.checkpoints.restore(checkpoint, sandbox, replace=True)
        latest_id = self.checkpoints.latest_id(self.session_name)
        if latest_id is not None and latest_id != checkpoint.id:
            # An older checkpoint: the restore becomes the newest, so later changes build on it.
            self.checkpoints.record_restore(
                self.session_name, checkpoint.execution_count, "%capsule resume", checkpoint
            )
        await self.namespace_replaced(checkpoint)
        self.next_count = max(self.next_count, checkpoint.execution_count + 1)
        self._offer = None
        return (
            f"Resumed session {self.session_name}: {outcome}. "
            f"Execution counts continue from [{checkpoint.execution_count + 1}]."
        )

    def _claim_own_session(self) -> None:
        """The frontend's (or operator's) name for this notebook owns the session of that name."""
        store = self.checkpoints.store
        if store is not None and not self.session_source.startswith("fresh id"):
            try:
                store.claim_session(self.session_name, self.notebook, replace=True)
            except Exception:  # a store that cannot record owners refuses switches instead
                self.log.exception("could not record the owner of session %s", self.session_name)

    async def switch_session(self, name: str, source: str) -> None:
        """Checkpoints go to another session from now on, starting with a full one.

        Only into a session this notebook created, or a new one (which it then
        owns), unless the operator allows more (Policy.check_session).
        """
        if name == self.session_name:
            return
        store = self.checkpoints.store
        if store is not None:
            owner = store.claim_session(name, self.notebook, replace=False)
            try:
                self.policy.check_session(name, owner, self.notebook)
            except PolicyRefused as err:
                raise magics.MagicUsageError(f"%capsule session: {err}") from None
        await self.checkpoints_settled()  # what was reported so far belongs to the old session
        self.session_name, self.session_source = name, source
        # The other session's checkpoints are not this namespace's: the next one holds every name.
        self.checkpoints.begin_afresh(name)
        for sandbox in self.sandboxes.values():
            self.checkpoints.sandbox_session(sandbox, name)
        if self.sandbox is not None and self.sandbox.alive:
            # The next snapshot must hold every name, not a delta against another session's checkpoint.
            with contextlib.suppress(SandboxDied, TimeoutError):
                await self.sandbox.request("forget_digests", {})

    async def _adopt_frontend_session(self, cell: Cell) -> None:
        """VS Code names the notebook only in its start-up code: read from the source the frontend sent.

        Only from a cell sent before the user's first one, and not stored in
        history (VS Code's start-up code is sent that way): an agent's or a
        user's cell that assigns __vsc_ipynb_file__ later names nothing.
        """
        if not self._frontend_may_name:
            return
        if cell.store_history and not cell.silent:
            self._frontend_may_name = False
            return
        path = frontend_notebook_path(cell.code, Path.cwd())
        if path and path != self.session_name:
            self._frontend_may_name = False
            self.notebook = self.checkpoints.notebook = self.checkpoints.own_session = path
            await self.switch_session(path, "__vsc_ipynb_file__ (VS Code's notebook path)")
            self._claim_own_session()
            self._offer_resume()

    def _left_by_restart(self, latest: Any) -> bool:
        """The user restarted the kernel while this was the newest checkpoint: leave it (%capsule log has it)."""
        store = self.checkpoints.store
        return store is not None and store.restarted_at(self.session_name) == latest.id

    def _offer_resume(self) -> None:
        """A new kernel in a session that has checkpoints: say how to get them back."""
        try:
            latest = self.checkpoints.latest(self.session_name)
        except CheckpointRefused as err:
            self._notices.append(f"Capsule: {err}\n")
            return
        if latest is None or self._left_by_restart(latest):
            return
        if why := switched_in_by_another(latest, self.notebook):
            self._notices.append(f"Capsule: {why}\n")
            return
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(latest.created))
        self._offer = (
            f"Session {self.session_name} has checkpoints from an earlier kernel (the last after cell "
            f"[{latest.execution_count}], {when}). "
            "Run %capsule resume to restore them, or set auto_resume = true in capsule.toml.\n"
        )
