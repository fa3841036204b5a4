"""A notebook's session: the coordinator behind the kernel's protocol face.

SessionController owns the session's state and is made of named parts, one
job each, all over that state (mixins, so the walk of a cell stays in one
object and no part imports another back):

- cells.py      the life of one cell (magic, task or code; plan, route, run, retry, report);
- pool.py       the sandbox pool (one per kind): start, watch, replace, restart, stop;
- restore.py    the session's identity (operator or frontend, never a frame), resume, adoption;
- names.py      names moving between the two sandboxes, through checkpoints only.

What stays here: the state itself, the mounts the operator declared (held by
descriptor), notices, the sandboxes' events, side tasks and the requests the
sandbox answers (completion, inspection). The collaborators with objects of
their own (relay.py, subshells.py, tasks/scheduler.py) and the magics see the
session only through the interfaces they name (RelayOwner, SubshellOwner,
TaskOwner, MagicContext), which this class implements.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from capsule_kernel.kernel.analyzer import Analyzer
from capsule_kernel.kernel.checkpoint.home import default_home, notebook_identity, session_identity
from capsule_kernel.kernel.checkpoint.network_audit import NetworkAudit
from capsule_kernel.kernel.checkpoint.recorder import Checkpoints
from capsule_kernel.kernel.magics.authority import Authority
from capsule_kernel.kernel.policy import Policy
from capsule_kernel.kernel.policy_files import PolicyFileWatch
from capsule_kernel.kernel.sandbox import held_mounts
from capsule_kernel.kernel.sandbox.held_mounts import HeldMounts
from capsule_kernel.kernel.sandbox.process import SandboxDied, SandboxProcess
from capsule_kernel.kernel.session.cells import Cell, CellLifecycle
from capsule_kernel.kernel.session.durability import CellDurability
from capsule_kernel.kernel.session.ledger import NameLedger
from capsule_kernel.kernel.session.names import NameMovement
from capsule_kernel.kernel.session.pool import SandboxPool
from capsule_kernel.kernel.session.relay import Relay
from capsule_kernel.kernel.session.restore import SessionRestore
from capsule_kernel.kernel.session.subshells import Subshells
from capsule_kernel.kernel.tasks.scheduler import TaskScheduler

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class SessionController(SessionRestore, SandboxPool, CellLifecycle, NameMovement):
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
        # What the allowed-hosts proxies decided, beside the checkpoints (%capsule network).
        store = self.checkpoints.store
        self.network_audit = NetworkAudit(store.home) if store is not None else None
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

    # -- restore, resume, restart ------------------------------------------------------

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

    # -- interrupts ---------------------------------------------------------------------

    # -- one cell -----------------------------------------------------------------------

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
        handlers = {
            "snapshot": self._on_snapshot,
            "snapshot_failed": self._on_snapshot_failed,
            "network": self._on_network,
        }

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

    def _on_network(self, kind: str, event: dict[str, Any]) -> None:  # noqa: ARG002
        """A decision of the sandbox's allowed-hosts proxy (the kernel's own, never a frame from the sandbox)."""
        audit = self.network_audit
        if audit is not None:
            audit.add(self.session_name, event)

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
