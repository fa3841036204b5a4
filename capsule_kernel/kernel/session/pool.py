"""The session's sandboxes: started, watched, replaced after a death, restarted, interrupted, stopped.

A part of SessionController (a mixin over its state: sandboxes, active_kind,
checkpoints, ledger, relay); one job, kept apart from the cell's walk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path
from typing import Any

from capsule_kernel.kernel.checkpoint.rows import CheckpointRefused
from capsule_kernel.kernel.sandbox.kinds import SANDBOX_KINDS
from capsule_kernel.kernel.sandbox.process import SandboxDied, SandboxProcess

_REINTERRUPT_SECONDS = 1.0
# A clean stop waits this long for the worker to take and report its last snapshot.
_STOP_GRACE_SECONDS = 5.0


class SandboxPool:
    """One sandbox per kind: start (restoring the last checkpoint when it replaces one), watch, replace, stop."""

    async def _start_sandbox(self, *, restore: bool = False) -> SandboxProcess:
        """A new sandbox of the active kind; with restore, holding the session's last checkpoint."""
        previous = self.sandbox
        held_before = set(self.ledger.held.get(self.active_kind, {}))
        sandbox = await self._spawn_sandbox()
        if not restore:
            return sandbox
        # In a session that used both sandboxes, a replacement gets back what its predecessor held.
        names = held_before if self.ledger.mixed(sandbox.kind) else None
        try:
            self._restore_outcome = await self.checkpoints.restore_latest(
                self.session_name, sandbox, previous, names=names
            )
            if previous is not None and previous.lost_cells():
                self._restore_outcome += "; " + self.checkpoints.describe_lost(previous.lost_cells())
            self.ledger.note_held(sandbox.kind, names)
        except (SandboxDied, TimeoutError, CheckpointRefused) as err:
            # Restoring must never become a crash loop: give up on it once.
            self.log.error("restoring the last checkpoint failed: %s", err)
            sandbox.stopping = True
            await sandbox.shutdown()
            sandbox = await self._spawn_sandbox()
            self.checkpoints.begin_afresh(self.session_name)
            self._restore_outcome = (
                f"restoring the last checkpoint failed ({err}), so this sandbox starts with an empty namespace"
            )
        return sandbox

    async def _spawn_sandbox(self) -> SandboxProcess:
        kind = self.active_kind
        sandbox = SANDBOX_KINDS[kind](
            self.policy.limits.limits,
            self._event_handler(kind),
            chunk_root=self.checkpoints.chunk_root,
            mounts=self.bound_mounts(self.mounts),
            sandbox_settings=self.policy.settings.sandbox,
            coalesce=(self.policy.settings.coalesce, self.policy.settings.coalesce_cells),
            state_dir=self._sandbox_state_dir(),
            ipython_config=self.ipython_config,
        )
        sandbox.frontend_comms = lambda: list(self.relay.comms)
        sandbox.network_source = self.policy.limits.sources.get("network", "default")
        self.sandboxes[kind] = sandbox
        self.ledger.fresh_sandbox(kind)
        await sandbox.start()
        self.note_profile_problems(sandbox.startup_problems)
        self.checkpoints.register(sandbox, self.session_name, self.kernel_id)
        self.side_task(self._watch_sandbox(sandbox), cell_scoped=False)
        self.log.info("capsule %s sandbox started, pid %s", kind, sandbox.pid)
        return sandbox

    def _sandbox_state_dir(self) -> Path | None:
        """This notebook's persistent IPython directory (history), beside the store; one per session."""
        root = self.checkpoints.chunk_root
        if root is None:
            return None
        return root.parent / "sandbox-state" / hashlib.sha256(self.session_name.encode()).hexdigest()[:24]

    async def _watch_sandbox(self, sandbox: SandboxProcess) -> None:
        """Notice a sandbox that dies between cells, and replace it at once."""
        await sandbox.wait_exit()
        if sandbox is not self.sandboxes.get(sandbox.kind) or self.cell_running or sandbox.stopping:
            return
        if sandbox.kind != self.active_kind:
            return  # replaced when a cell needs it again, with its checkpointed names
        self._note_death_between_cells(sandbox)
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._start_sandbox(restore=True))
            self._starting.add_done_callback(self._log_start_failure)

    def note_profile_problems(self, problems: list[str]) -> None:
        """What of the user's IPython profile did not apply: shown once per kernel, with the next cell."""
        if not problems or self._profile_noted:
            return
        self._profile_noted = True
        lines = "".join(f"  {problem}\n" for problem in problems)
        self.log.warning("IPython profile problems in the sandbox:\n%s", lines)
        self._notices.append(f"Capsule: your IPython profile did not fully apply in the sandbox:\n{lines}")

    def _note_death_between_cells(self, sandbox: SandboxProcess) -> None:
        if not sandbox.death_noted:
            sandbox.death_noted = True
            text = f"The sandbox (pid {sandbox.pid}) {sandbox.death_reason} while no cell was running."
            self.log.warning(text)
            self._idle_death = text

    def _log_start_failure(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("the sandbox could not start: %s", task.exception())

    async def ready_sandbox(self) -> SandboxProcess:
        """The running sandbox, starting (or replacing) one when needed."""
        if self.closing:
            raise SandboxDied("the kernel is shutting down")
        sandbox = self.sandbox
        if sandbox is not None and sandbox.process_ended and not sandbox.stopping:
            # Dead, perhaps not yet reaped: bury it before deciding anything.
            await sandbox.wait_exit()
            self._note_death_between_cells(sandbox)
        if self._starting is not None and not self._starting.done():
            with contextlib.suppress(SandboxDied, TimeoutError):
                await asyncio.shield(self._starting)
        if self.sandbox is None or not self.sandbox.ready:
            self._starting = asyncio.ensure_future(self._start_sandbox(restore=self.sandbox is not None))
            await self._starting
        assert self.sandbox is not None
        return self.sandbox

    async def sandbox_of(self, kind: str) -> SandboxProcess:
        """The ready sandbox of this kind, which becomes the active one (where the next cell of that kind runs)."""
        if kind != self.active_kind and self.sandbox is not None:
            await self.checkpoints_settled()
        self.active_kind = kind
        return await self.ready_sandbox()

    async def sandbox_started(self) -> None:
        """Wait for a sandbox that is starting (the first starts right after kernel_info)."""
        if self.sandbox is not None and not self.sandbox.ready and not self.cell_running:
            with contextlib.suppress(Exception):
                await self.ready_sandbox()

    async def restart_sandbox(self, why: str) -> SandboxProcess:
        """Replace the sandbox with a fresh one (the namespace is lost)."""
        old = await self.ready_sandbox()
        # Every sandbox's last snapshots (deferred cells too) are recorded as the old namespace's
        # before it goes: nothing of it can land after the new namespace begins.
        await self.checkpoints_settled()
        old.stopping = True
        self.log.info("restarting the sandbox: %s", why)
        await old.shutdown()
        self.checkpoints.begin_afresh(self.session_name)
        fresh = await self._start_sandbox()
        await self.namespace_replaced(None)
        return fresh

    async def checkpoints_settled(self, timeout: float = 60.0) -> None:
        """Wait for the snapshot of the last cell to be recorded (for log and status)."""
        for sandbox in list(self.sandboxes.values()):
            await sandbox.snapshots_settled(timeout)
        await self.checkpoints.settled(timeout)

    async def replace_sandbox(self, kind: str) -> None:
        """A new sandbox of this kind (new mounts or memory cap) holding what the old one held."""
        await self.checkpoints_settled()
        old = self.sandboxes.get(kind)
        if old is None:
            return
        previous_kind, self.active_kind = self.active_kind, kind
        try:
            old.stopping = True
            await old.shutdown()
            await self._start_sandbox(restore=True)
        finally:
            self.active_kind = previous_kind

    async def namespace_replaced(self, checkpoint: Any | None) -> None:
        """After a restore, resume or restart: the active sandbox alone holds the truth.

        The other sandbox's namespace is stale now, so it is stopped; when a
        cell needs it again it starts fresh and receives the names it reads.
        """
        self.ledger.replaced(self.active_kind, checkpoint)
        for kind, sandbox in list(self.sandboxes.items()):
            if kind != self.active_kind:
                sandbox.stopping = True
                del self.sandboxes[kind]
                await sandbox.shutdown()

    def interrupt(self) -> None:
        """The frontend's interrupt (from the control thread or a signal): the running cells stop."""
        if self.tasks.interrupt():
            return  # the stop button during a foreground task cancels the task
        if self.subshells.running and self._loop is not None:
            # Frames are written on the loop's thread only; the subshells' cells get theirs from there.
            self._loop.call_soon_threadsafe(self.subshells.interrupt)
        sandbox = self.sandbox
        if sandbox is None or not self.cell_running:
            return
        sandbox.interrupt()
        # A SIGINT that lands while the cell is starting a child (between
        # fork and exec of `!cmd`) reaches no one who acts on it: say it again.
        loop, serial = self._loop, self._cell_serial
        if loop is not None:
            loop.call_soon_threadsafe(loop.call_later, _REINTERRUPT_SECONDS, self._interrupt_again, sandbox, serial)

    def _interrupt_again(self, sandbox: SandboxProcess, serial: int) -> None:
        if sandbox is self.sandbox and self.cell_running and serial == self._cell_serial:
            sandbox.interrupt(by_user=False)

    async def stop(self, *, restart: bool = False) -> None:
        # Requests that arrive from now on (history, completion, comms around a restart) are
        # refused cleanly: nothing starts a new sandbox in a kernel that is going away.
        self.closing = True
        with contextlib.suppress(Exception):
            await self.tasks.close()
        if self._starting is not None:
            with contextlib.suppress(Exception):
                await self._starting
        for sandbox in list(self.sandboxes.values()):
            sandbox.stopping = True
            # The worker takes the snapshot of deferred cells before it stops: record it too.
            await sandbox.shutdown(grace=_STOP_GRACE_SECONDS)
            with contextlib.suppress(Exception):
                await sandbox.snapshots_settled(_STOP_GRACE_SECONDS)
        with contextlib.suppress(Exception):
            await self.checkpoints.settled(10.0)
        if restart and self.checkpoints.store is not None:
            with contextlib.suppress(Exception):
                self.checkpoints.store.note_restart(self.session_name, self.checkpoints.latest_id(self.session_name))
        with contextlib.suppress(Exception):
            await self.durability.close()
        if self.network_audit is not None:
            with contextlib.suppress(Exception):
                await self.network_audit.flush()

    def kill_all(self) -> None:
        for sandbox in list(self.sandboxes.values()):
            sandbox.kill()
