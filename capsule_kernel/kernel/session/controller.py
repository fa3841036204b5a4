"""A notebook's session: its sandboxes, its identity, and the life of each cell.

The kernel class is the protocol face; this owns what is behind it:

- the sandbox pool (one sandbox per kind today; the coming task sandboxes are
  entries of the same pool), started, replaced after a death, restored,
  resumed and restarted here;
- the session identity (from the operator or the frontend, never a frame);
- the auto-mode name ledger (ledger.py), the durable promises
  (durability.py) and the output relay (relay.py), which subscribe to the
  cell lifecycle below;
- the operator's policy (policy.py), which every notebook change is checked
  against.

Names cross between sandboxes only through checkpoints: a value made in the
Wasm sandbox is marked so in its manifest (by the kernel, from the sandbox
that reported it), and the subprocess sandbox then loads it as data only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
import uuid
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from capsule_kernel.kernel import magics
from capsule_kernel.kernel.analyzer import Analyzer, ExecutionPlan
from capsule_kernel.kernel.checkpoint.recorder import Checkpoints
from capsule_kernel.kernel.checkpoint.store import (
    CheckpointRefused,
    default_home,
    notebook_identity,
    session_identity,
    switched_in_by_another,
)
from capsule_kernel.kernel.magics.authority import Authority
from capsule_kernel.kernel.policy import Policy, PolicyRefused
from capsule_kernel.kernel.policy_files import PolicyFileWatch
from capsule_kernel.kernel.router import REFUSED, route
from capsule_kernel.kernel.sandbox import crash_dump, held_mounts
from capsule_kernel.kernel.sandbox.held_mounts import HeldMounts
from capsule_kernel.kernel.sandbox.kinds import SANDBOX_KINDS
from capsule_kernel.kernel.sandbox.process import PreviousCellOverran, SandboxDied, SandboxProcess
from capsule_kernel.kernel.sandbox.wasm import WasmSandbox
from capsule_kernel.kernel.session.durability import CellDurability
from capsule_kernel.kernel.session.identity import frontend_notebook_path
from capsule_kernel.kernel.session.ledger import NameLedger
from capsule_kernel.kernel.session.relay import Relay, sanitized_reply
from capsule_kernel.kernel.session.subshells import Subshells
from capsule_kernel.kernel.tasks.scheduler import TaskScheduler

_REINTERRUPT_SECONDS = 1.0
# A clean stop waits this long for the worker to take and report its last snapshot.
_STOP_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class Cell:
    """One execute_request, as the sandbox's execute frame carries it."""

    code: str
    silent: bool
    store_history: bool
    user_expressions: dict[str, str]
    allow_stdin: bool
    execution_count: int
    snapshot_candidates: tuple[str, ...] = ()
    # The cell as typed, when `code` was transformed for a sandbox without IPython.
    raw_code: str | None = None
    # The execute_request's header: the sandbox's get_parent() (relay.header_for_sandbox).
    parent_header: dict[str, str] = field(default_factory=dict)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class SessionController:
    """Everything behind the protocol face for one notebook."""

    def __init__(self, kernel: Any, policy: Policy) -> None:
        self.log = kernel.log
        self.policy = policy
        self.relay = Relay(kernel)
        self.relay.controller = self
        self.session_name, self.session_source = session_identity()
        # Which notebook this kernel serves, as its frontend or operator says (a cell never changes
        # it): it owns the session it starts in, and may switch only into sessions it created.
        self.notebook = notebook_identity(self.session_name)
        # VS Code names the notebook only in start-up code it sends before the user's first cell.
        self._frontend_may_name = self.session_source.startswith("fresh id")
        self.checkpoints = Checkpoints.open(self.log)
        self.checkpoints.notebook, self.checkpoints.own_session = self.notebook, self.session_name
        self._claim_own_session()
        self.checkpoints.keep = policy.settings.keep
        self.analyzer = Analyzer()
        self.authority = Authority()
        self.ledger = NameLedger()
        self.kernel_id = uuid.uuid4().hex[:12]
        self.durability = CellDurability(self.checkpoints, self.kernel_id, self.log)
        self.sandboxes: dict[str, SandboxProcess] = {}
        self.active_kind = "subprocess"
        self.routing_mode = policy.mode
        self.held_mounts = HeldMounts()
        self.mounts: list[dict[str, Any]] = self._hold_operator_mounts(policy.settings.fs_access)
        self.next_count = 1
        self.cell_running = False
        self.closing = False  # stop() has begun: no new sandbox starts
        self._cell_serial = 0  # which cell an interrupt was meant for
        self._starting: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._side_tasks: set[asyncio.Task] = set()
        self._notices: list[str] = [f"Capsule: configuration problem: {problem}\n" for problem in policy.problems]
        # The resume offer: news, not a warning, so a quiet note (stdout) with the first cell, once.
        self._offer: str | None = None
        # The whole native dump of the last sandbox crash (%capsule status --last-crash).
        self.last_crash: str | None = None
        self._idle_death: str | None = None
        self._last_death: SandboxDied = SandboxDied("the sandbox ended")
        self._restore_outcome = "the namespace starts empty"
        self._confinement_noted = False
        self._profile_noted = False
        self._policy_files = PolicyFileWatch(Path.cwd(), default_home())
        self.tasks = TaskScheduler(self)
        self.subshells = Subshells(self)
        self.last_checkpoint_at: int | None = None
        # The client's IPython configuration for the subprocess sandbox's shell (kernel.py sets it).
        self.ipython_config: dict[str, Any] = {}

    # -- what magics see (magics/context.py) ------------------------------------------

    @property
    def limit_settings(self) -> Any:
        return self.policy.limits

    @property
    def settings(self) -> Any:
        return self.policy.settings

    @property
    def promises(self) -> Any:
        return self.durability.promises

    @property
    def execution_count(self) -> int:
        return self.next_count

    @property
    def sandbox(self) -> SandboxProcess | None:
        """The sandbox of the active kind (the one the current or last cell ran in)."""
        return self.sandboxes.get(self.active_kind)

    # -- start-up ---------------------------------------------------------------------

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

    # -- restore, resume, restart ------------------------------------------------------

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

    def _hold_operator_mounts(self, declared: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The operator's mounts, each opened now (held_mounts.py); one that cannot be is left out, and said."""
        mounts = []
        for mount in declared:
            try:
                resolved = self.held_mounts.hold(Path(str(mount["path"])))
            except OSError as err:
                # Said on the first cell, with the other configuration problems.
                self.policy.problems.append(f"the fs_access mount {mount.get('path')} is not bound: {err}")
                continue
            mounts.append({**mount, "path": str(resolved)})
        return mounts

    def bound_mounts(self, mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Mounts as a sandbox launch binds them: each with the descriptor held since its check."""
        bound = []
        for mount in mounts:
            fd = self.held_mounts.fd(mount["path"])
            if fd is None:  # a task record's mount, run again by a later kernel: opened (and held) now
                with contextlib.suppress(OSError):
                    self.held_mounts.hold(Path(str(mount["path"])))
                    fd = self.held_mounts.fd(mount["path"])
            if fd is None:
                continue
            if not held_mounts.names_held(Path(str(mount["path"])), fd):
                # bubblewrap binds at the path: where it names another file now, nothing is bound there.
                self._notices.append(
                    f"Capsule: the mount {mount['path']} is not bound in this sandbox: its path names another "
                    "file than the directory that was checked (it was replaced, perhaps by a link)\n"
                )
                continue
            bound.append({**mount, "fd": fd})
        return bound

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

    # -- interrupts ---------------------------------------------------------------------

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
            sandbox.interrupt()

    # -- one cell -----------------------------------------------------------------------

    async def execute(self, cell: Cell) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run one cell where it belongs; return the reply and its metadata."""
        code, count = cell.code, cell.execution_count
        task = magics.task_cell(code)
        if task is not None:
            await self._adopt_frontend_session(cell)
            return await self._execute_task_cell(*task, count), {
                "sandbox": "task",
                "mode": "magic",
                "reason": "%%capsule task: runs in a sandbox of its own",
                "checkpoint_at": count,  # its result is bound now and checkpointed with a later cell
            }
        try:
            magic_lines = magics.capsule_lines(code)
        except magics.MagicUsageError as err:
            reply = self.relay.fail(count, "UsageError", str(err))
            return reply, {"sandbox": "kernel", "mode": "magic", "reason": "%%capsule cell"}
        await self._adopt_frontend_session(cell)
        if magic_lines is not None:
            reply = await self._execute_magic_cell(code, magic_lines, count, cell.store_history and not cell.silent)
            return reply, {"sandbox": "kernel", "mode": "magic", "reason": "%capsule lines run in the kernel"}
        plan = self.plan_cell(code)
        reads = plan.reads | plan.mutates
        if self.routing_mode != "subprocess" and self.ledger.unknown(reads) and self._snapshots_in_flight():
            # Where a name lives and what it is decide the route: learn it from the snapshot in flight.
            await self.checkpoints_settled()
        decision = route(plan, self.routing_mode, self.ledger.value_types(reads))
        meta = {"sandbox": decision.sandbox, "mode": plan.mode, "reason": decision.reason, "routing": self.routing_mode}
        if decision.sandbox == REFUSED:
            reply = self.relay.fail(
                count,
                "WasmRefused",
                f"the Wasm sandbox cannot run this cell: {decision.reason}. "
                "Run %capsule mode auto (such cells then go to the subprocess sandbox) or %capsule mode subprocess.",
            )
            return reply, meta
        names = plan.reads | plan.mutates | plan.writes
        if decision.sandbox == "subprocess":
            # What subshells' cells touched (a large value changed in place) is looked at too.
            names |= self.subshells.touched
        cell = replace(cell, snapshot_candidates=tuple(sorted(names)))
        if decision.sandbox == "wasm" and plan.transformed is not None:
            # No IPython inside: it gets %magics as the calls IPython would make (the analyzer's transform).
            cell = replace(cell, code=plan.transformed, raw_code=code)
        self.last_checkpoint_at = count
        reply = await self._execute_in_sandbox(cell, decision.sandbox, reads)
        if decision.sandbox == "subprocess" and reply.get("status") == "ok" and not cell.silent:
            self.subshells.touched -= set(cell.snapshot_candidates)  # this cell's checkpoint looks at them
        meta["checkpoint_at"] = self.last_checkpoint_at
        sandbox = self.sandboxes.get(decision.sandbox)
        if isinstance(sandbox, WasmSandbox) and sandbox.last_fuel is not None:
            meta["fuel_consumed"] = sandbox.last_fuel
        return reply, meta

    def _snapshots_in_flight(self) -> bool:
        return any(s.snapshots_in_flight for s in self.sandboxes.values())

    def plan_cell(self, code: str) -> ExecutionPlan:
        """The analyzer's plan; a bug in it must never cost the user the cell."""
        try:
            return self.analyzer.plan(code)
        except Exception:
            self.log.exception("the analyzer failed; running the cell as a plain cell")
            return ExecutionPlan(source_hash="", syntax_error=None)

    async def _execute_task_cell(self, line: str, body: str, count: int) -> dict[str, Any]:
        """A %%capsule task cell: the kernel checks the line's authority (its own source) and runs the task."""
        self._publish_notices()
        try:
            args = magics.parse_task_line(line)
        except magics.MagicHelp as help_text:
            self.relay.show([{"text/plain": str(help_text)}])
            return {"status": "ok", "execution_count": count, "user_expressions": {}, "payload": []}
        except magics.MagicUsageError as err:
            return self.relay.fail(count, "UsageError", str(err))
        await self.tasks.bind_pending()
        self.cell_running = True
        try:
            reply = await self.tasks.run_cell(args, body, count)
        finally:
            self.cell_running = False
        if self.sandbox is not None and self.sandbox.alive:
            with contextlib.suppress(SandboxDied, TimeoutError):
                history = {"code": f"%%capsule {line}\n{body}", "execution_count": count}
                await self.sandbox.request("store_history", history)
        return reply

    async def _execute_magic_cell(self, code: str, lines: list[str], count: int, stored: bool) -> dict[str, Any]:
        for line in lines:
            try:
                self.relay.show(await magics.run(self, line))
            except magics.MagicUsageError as err:
                return self.relay.fail(count, "UsageError", str(err))
        if stored and self.sandbox is not None and self.sandbox.alive:
            with contextlib.suppress(SandboxDied, TimeoutError):
                await self.sandbox.request("store_history", {"code": code, "execution_count": count})
        return {"status": "ok", "execution_count": count, "user_expressions": {}, "payload": []}

    async def _execute_in_sandbox(self, cell: Cell, kind: str, reads: frozenset[str]) -> dict[str, Any]:
        count = cell.execution_count
        self.checkpoints.note_cell(count, cell.raw_code or cell.code)
        if kind != self.active_kind and self.sandbox is not None:
            # The other sandbox's last snapshot must be recorded before names cross.
            await self.checkpoints_settled()
        self.active_kind = kind
        try:
            sandbox = await self.ready_sandbox()
        except (SandboxDied, TimeoutError) as err:
            return self.relay.fail(count, "SandboxUnavailable", f"the {kind} sandbox could not start: {err}")
        await self.tasks.bind_pending()
        await self._bring_names(sandbox, reads)
        self._note_confinement(sandbox)
        self._publish_notices()
        self.cell_running = True
        self._cell_serial += 1
        self.relay.outputs.clear()
        self.authority.begin_cell(cell.raw_code or cell.code)
        self.durability.started(
            self.session_name, count, cell.code, cell.silent, sandbox.kind, sandbox.limits.to_json()
        )
        try:
            reply = await self._run_with_retry(sandbox, cell)
            snapshot = sandbox.last_done_snapshot if reply is not None else None
            if reply is not None and sandbox.last_done_deferred:
                snapshot = count  # a coalesced snapshot will hold it
            if reply is None:
                reply = await self._report_death(self.sandbox or sandbox, self._last_death, count)
            await self.durability.created(self.session_name, count, cell.silent)
            self.durability.after_reply(self.session_name, count, cell.silent, reply, self.relay.outputs, snapshot)
            # Which checkpoint will hold this cell's state (a batch run's resume reads it from the reply).
            changed = snapshot is not None or reply.get("status") != "ok"
            self.last_checkpoint_at = count if changed else None
            return reply
        finally:
            self.cell_running = False
            self.authority.end_cell()
            self._check_policy_files()
            for task in list(self._side_tasks):
                if getattr(task, "cell_scoped", False):
                    task.cancel()

    async def _run_with_retry(self, sandbox: SandboxProcess, cell: Cell) -> dict[str, Any] | None:
        """The reply, or None after a death (in self._last_death).

        A sandbox that never took the cell because the cell before it kept
        it busy past its own limit is that earlier cell's fault: the user is
        told so, and this cell runs once more in a fresh sandbox.
        """
        for attempt in range(2):
            try:
                reply = await sandbox.execute(asdict(cell))
                return sanitized_reply(reply, cell.execution_count)
            except PreviousCellOverran as overran:
                if attempt:
                    self._last_death = overran
                    return None
                self.relay.note(
                    f"Capsule: cell [{overran.previous}] kept the sandbox after its reply: "
                    f"the sandbox {overran.reason}. "
                    "This cell runs in a fresh sandbox.\n"
                )
                try:
                    sandbox = await self._start_sandbox(restore=True)
                except (SandboxDied, TimeoutError) as err:
                    self._last_death = SandboxDied(f"could not be replaced ({err})")
                    return None
                self.relay.note(f"Capsule: {self._restore_outcome}.\n")
            except SandboxDied as death:
                self._last_death = death
                return None
        return None

    async def _report_death(self, sandbox: SandboxProcess, death: SandboxDied, count: int) -> dict[str, Any]:
        pid = sandbox.pid
        if sandbox.process is not None:  # reaped: its crash dump, if any, has been read
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sandbox.wait_exit(), 10)
        if sandbox.crash_dump:
            self.last_crash = sandbox.crash_dump
            self.relay.note(crash_dump.summarise(sandbox.crash_dump) + "\n")
        try:
            fresh = await self._start_sandbox(restore=True)
            after = f"A fresh sandbox (pid {fresh.pid}) is running; {self._restore_outcome}"
        except (SandboxDied, TimeoutError) as err:
            after = f"A fresh sandbox could not be started ({err}); the next cell will try again"
        if death.violation:
            ename = "SandboxProtocolError"
        else:
            ename = "CellTimeout" if death.timed_out else "SandboxDied"
        what = f"the Wasm sandbox (host pid {pid})" if sandbox.kind == "wasm" else f"the sandbox process (pid {pid})"
        return self.relay.fail(count, ename, f"{what} {death.reason}. {after}")

    async def _bring_names(self, sandbox: SandboxProcess, reads: frozenset[str]) -> None:
        """Merge into this sandbox the names the cell reads that the other sandbox wrote later."""
        wanted = sorted(name for name in reads if self.ledger.stale(sandbox.kind, name))
        if not wanted:
            return
        try:
            latest = self.checkpoints.latest(self.session_name)
        except CheckpointRefused as err:
            self.relay.note(f"Not brought over from the other sandbox: {err}\n")
            return
        if latest is None:
            return
        entries = {name: latest.entries[name] for name in wanted if name in latest.entries}
        # An alias comes with its target (one object), unless this sandbox holds the target's latest already.
        for entry in list(entries.values()):
            target = entry.get("alias")
            if (
                target
                and target not in entries
                and target in latest.entries
                and self.ledger.stale(sandbox.kind, target)
            ):
                entries[target] = latest.entries[target]
                wanted.append(target)
        failed: dict[str, str] = {}
        try:
            result = await sandbox.restore(entries, replace=False)
            failed = dict(result.get("failed", {}))
        except (SandboxDied, TimeoutError) as err:
            failed = dict.fromkeys(entries, f"the transfer failed: {err}")
        for name in wanted:
            self.ledger.note_brought(sandbox.kind, name)
            if name not in entries:
                failed.setdefault(name, "it was not in the last checkpoint")
        if failed:
            other = "subprocess" if sandbox.kind == "wasm" else "wasm"
            lines = "".join(f"  {name}: {why}\n" for name, why in sorted(failed.items()))
            self.relay.note(f"Not brought over from the {other} sandbox:\n{lines}")

    # -- notices ----------------------------------------------------------------------------

    def _publish_notices(self) -> None:
        notices, self._notices = self._notices, []
        for notice in notices:
            self.relay.note(notice)
        if self._offer is not None:
            offer, self._offer = self._offer, None
            self.relay.info(offer)
        if self._idle_death:
            death, self._idle_death = self._idle_death, None
            self.relay.note(f"{death} A fresh sandbox was started; {self._restore_outcome}.\n")

    def _note_confinement(self, sandbox: SandboxProcess) -> None:
        """Once per kernel: a subprocess sandbox that is not a security boundary says so."""
        state = sandbox.enforcement.get("confinement", "")
        if self._confinement_noted or sandbox.kind != "subprocess" or not state.startswith("not"):
            return
        self._confinement_noted = True
        text = f"Capsule: the subprocess sandbox is {state}. See %capsule status.\n"
        self.log.warning(text.strip())
        self.relay.note(text)

    def _check_policy_files(self) -> None:
        """A config file that changed while a cell ran is never read as policy again (policy_files.py)."""
        changed = self._policy_files.check()
        if changed:
            names = " and ".join(changed)
            text = (
                f"Capsule: {names} changed while this cell ran; a sandbox may have written it, so Capsule "
                "will not read it as configuration. Edit it while no kernel runs, or set limits with "
                "CAPSULE_* variables.\n"
            )
            self.log.warning(text.strip())
            self.relay.note(text)

    # -- events from sandboxes -----------------------------------------------------------

    def _event_handler(self, kind: str) -> Any:
        handlers = {"snapshot": self._on_snapshot, "snapshot_failed": self._on_snapshot_failed}

        def handle(event: dict[str, Any]) -> None:
            special = handlers.get(event["type"])
            if special is not None:
                special(kind, event)
            else:
                self.relay.on_event(event)

        return handle

    def _on_snapshot(self, kind: str, event: dict[str, Any]) -> None:
        if kind == "wasm":
            # Made in Wasm: the subprocess sandbox may load it as data only (sandbox/inside loader).
            event["entries"] = {name: {**entry, "made_in": "wasm"} for name, entry in event["entries"].items()}
        else:
            event["entries"] = {
                name: {k: v for k, v in entry.items() if k != "made_in"} for name, entry in event["entries"].items()
            }
        self.ledger.note_snapshot(kind, event)
        # Recording starts now, so whoever waits for settled checkpoints sees it.
        recording = self.checkpoints.record(self.session_name, event)
        self.side_task(self.durability.recorded(self.session_name, event, recording), cell_scoped=False)

    def _on_snapshot_failed(self, kind: str, event: dict[str, Any]) -> None:  # noqa: ARG002
        self.durability.snapshot_failed(self.session_name, event)

    def side_task(self, coroutine: Coroutine[Any, Any, Any], *, cell_scoped: bool) -> None:
        task = asyncio.ensure_future(coroutine)
        task.cell_scoped = cell_scoped  # type: ignore[attr-defined]
        self._side_tasks.add(task)
        task.add_done_callback(self._side_task_done)

    def _side_task_done(self, task: asyncio.Task) -> None:
        self._side_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("capsule side task failed", exc_info=task.exception())

    # -- requests answered by the sandbox --------------------------------------------------

    def introspection_kind(self, code: str) -> str:
        """Which sandbox completion and inspection ask: the one that holds the names the code refers to.

        The sandbox that last wrote every name the code mentions, while it
        runs (a name from before a %capsule mode switch lives in the other
        sandbox until a cell reads it). Otherwise, under a single mode, that
        mode's sandbox; in auto, the subprocess sandbox (the user's packages,
        IPython's whole completer), unless every name was last written by a
        Wasm cell.
        """
        origins = {self.ledger.origins[name][0] for name in _IDENTIFIER.findall(code) if name in self.ledger.origins}
        if len(origins) == 1:
            (holder,) = origins
            sandbox = self.sandboxes.get(holder)
            if sandbox is not None and sandbox.ready:
                # After a mode switch the names written before it live in the other sandbox: ask
                # it (it answers from its own objects; nothing moves, nothing crosses).
                return holder
        if self.routing_mode != "auto":
            return self.routing_mode
        return "wasm" if origins == {"wasm"} else "subprocess"

    async def ask(self, kind: str, args: dict[str, Any], fallback: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self.closing:
            return fallback
        try:
            sandbox = self.sandboxes.get(self.introspection_kind(str(args.get("code", ""))))
            if sandbox is None or not sandbox.ready:
                sandbox = await self.ready_sandbox()  # only the active one runs: ask it
            answer = await sandbox.request(kind, args, timeout=timeout)
            other = next((s for s in self.sandboxes.values() if s is not sandbox and s.ready), None)
            if kind == "complete" and self.routing_mode == "auto" and other is not None:
                # A name being typed may live in either sandbox: offer what both know.
                with contextlib.suppress(SandboxDied, TimeoutError):
                    answer = _merged_completions(answer, await other.request(kind, args, timeout=timeout))
            return answer
        except (SandboxDied, TimeoutError) as err:
            self.log.warning("%s request failed: %s", kind, err)
            return fallback

    # -- shutdown ---------------------------------------------------------------------------

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

    def kill_all(self) -> None:
        for sandbox in list(self.sandboxes.values()):
            sandbox.kill()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop


__all__ = ["Cell", "SessionController"]


def _merged_completions(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """The first sandbox's completions, then the second's that it lacks (for the same span of text)."""
    if first.get("status") != "ok" or second.get("status") != "ok":
        return first if first.get("status") == "ok" else second
    if not first.get("matches") or not second.get("matches"):
        return first if first.get("matches") else second  # no match: IPython reports an empty span
    span = (first.get("cursor_start"), first.get("cursor_end"))
    if span != (second.get("cursor_start"), second.get("cursor_end")):
        return first
    matches = list(first.get("matches", []))
    added = [match for match in second.get("matches", []) if match not in matches]
    metadata = dict(first.get("metadata", {}))
    types = metadata.get("_jupyter_types_experimental")
    if isinstance(types, list):
        extra = [{"start": span[0], "end": span[1], "text": match, "type": "<unknown>"} for match in added]
        metadata["_jupyter_types_experimental"] = [*types, *extra]
    return {**first, "matches": matches + added, "metadata": metadata}
