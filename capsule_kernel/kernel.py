"""CapsuleKernel: the face the frontends see, on ipykernel's kernelbase.

One short ``do_<request>`` hook per request, as kernelbase intends; the work
happens behind them, in a sandbox process. This process never runs user code:
execution, completion, inspection and history are answered by the sandbox's
IPython, and what comes back is JSON that is only forwarded.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import os
import signal
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq
from ipykernel.kernelbase import Kernel
from IPython.core.inputtransformer2 import TransformerManager

from capsule_kernel import __version__, magics
from capsule_kernel.analyzer import Analyzer, ExecutionPlan
from capsule_kernel.checkpoint.recorder import Checkpoints
from capsule_kernel.checkpoint.store import default_home, session_identity
from capsule_kernel.policy_files import PolicyFileWatch
from capsule_kernel.router import REFUSED, route
from capsule_kernel.sandbox import protocol
from capsule_kernel.sandbox.limits import LimitSettings
from capsule_kernel.sandbox.subprocess import SandboxDied, SubprocessSandbox
from capsule_kernel.sandbox.wasm import WasmSandbox
from capsule_kernel.settings import KernelSettings

if TYPE_CHECKING:
    from capsule_kernel.checkpoint.promises import CellPromises

_RED = "\x1b[0;31m"
_RESET = "\x1b[0m"
_INPUT_POLL_SECONDS = 0.01
_REQUEST_WAIT_SECONDS = 30.0
_SANDBOX_START_DELAY_SECONDS = 0.5
_REINTERRUPT_SECONDS = 1.0
# Subcommands that replace the sandbox or its namespace: never from inside a running cell.
_WHOLE_CELL_SUBCOMMANDS = {"restore", "restart", "resume", "session", "mount"}


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


def _error_content(ename: str, evalue: str) -> dict[str, Any]:
    return {
        "ename": ename,
        "evalue": evalue,
        "traceback": [f"{_RED}{ename}{_RESET}: {evalue}"],
    }


class CapsuleKernel(Kernel):
    implementation = "capsule"
    implementation_version = __version__
    banner = (
        f"Capsule {__version__}: every cell runs in a sandbox (Python {sys.version.split()[0]}).\n"
        "%capsule help lists the controls."
    )
    language_info = {
        "name": "python",
        "version": sys.version.split()[0],
        "mimetype": "text/x-python",
        "file_extension": ".py",
        "pygments_lexer": "ipython3",
        "codemirror_mode": {"name": "ipython", "version": 3},
        "nbconvert_exporter": "python",
    }
    help_links = [
        {"text": "Python Reference", "url": "https://docs.python.org/3/"},
        {"text": "IPython Reference", "url": "https://ipython.readthedocs.io/en/stable/"},
        {"text": "Capsule kernel", "url": "https://pypi.org/project/capsule-kernel/"},
    ]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.limit_settings = LimitSettings.load()
        self.session_name, self.session_source = session_identity()
        self.checkpoints = Checkpoints.open(self.log)
        self.analyzer = Analyzer()
        # One sandbox per kind; the active kind runs (or last ran) the cell.
        self.sandboxes: dict[str, SubprocessSandbox] = {}
        self.active_kind = "subprocess"
        # Where each name was last written (sandbox kind, execution count, type),
        # and which version of it each sandbox holds: the merge rule of auto mode.
        self.origins: dict[str, tuple[str, int, str]] = {}
        self.held: dict[str, dict[str, int]] = {"subprocess": {}, "wasm": {}}
        self._starting: asyncio.Task | None = None
        self._next_count = 1
        self._cell_running = False
        self._cell_serial = 0  # which cell an interrupt was meant for
        self._output_parent: dict[str, Any] = {}
        self._stdin_ident: Any = b""
        self._main_loop: asyncio.AbstractEventLoop | None = None
        self._comms: dict[str, str] = {}
        self._side_tasks: set[asyncio.Task] = set()
        self._idle_death: str | None = None
        self._restore_outcome = "the namespace starts empty"
        self._resume_notice: str | None = None
        # Said once, on the first cell, when this machine cannot confine the sandbox.
        self._confinement_notice: str | None = None
        self._confinement_noted = False
        # Config files in the notebook's directory, which a sandbox may write.
        self._policy_files = PolicyFileWatch(Path.cwd(), default_home())
        self._resume_offer: str | None = None
        self.settings = KernelSettings.load()
        self.routing_mode = self.settings.mode
        self.mounts: list[dict[str, Any]] = [dict(m) for m in self.settings.fs_access]
        self.kernel_id = uuid.uuid4().hex[:12]
        self.promises: CellPromises | None = None  # opened on the running loop
        self._cell_outputs: Counter[str] = Counter()
        self._outputs_by_cell: dict[int, dict[str, int]] = {}
        self.checkpoints.keep = self.settings.keep
        self._last_meta: dict[str, Any] = {}
        self._completeness = TransformerManager()
        for msg_type in ("comm_open", "comm_msg", "comm_close"):
            self.shell_handlers[msg_type] = getattr(self, f"_forward_{msg_type}")

    @property
    def cell_running(self) -> bool:
        """Whether a cell is running in a sandbox right now (a magic may arrive from inside it)."""
        return self._cell_running

    @property
    def sandbox(self) -> SubprocessSandbox | None:
        """The sandbox of the active kind (the one the current or last cell ran in)."""
        return self.sandboxes.get(self.active_kind)

    @sandbox.setter
    def sandbox(self, sandbox: SubprocessSandbox) -> None:
        self.sandboxes[sandbox.kind] = sandbox

    # -- start-up and signals ----------------------------------------------------

    def start(self) -> None:
        super().start()
        # In signal interrupt mode Jupyter sends SIGINT to this process: pass it
        # on to the cell instead of raising KeyboardInterrupt in the kernel.
        signal.signal(signal.SIGINT, lambda *_: self._interrupt_sandbox())
        # The sandbox starts right after the first kernel_info reply (frontends
        # ask first thing), so its start-up does not compete with ours; the
        # timer covers clients that never ask.
        self.io_loop.call_later(_SANDBOX_START_DELAY_SECONDS, self._begin_first_sandbox)

    async def kernel_info_request(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        await super().kernel_info_request(stream, ident, parent)
        await self._begin_first_sandbox()

    def pre_handler_hook(self) -> None:
        """kernelbase would make SIGINT raise here; ours is forwarded instead."""

    def post_handler_hook(self) -> None:
        """See pre_handler_hook."""

    async def _begin_first_sandbox(self) -> None:
        if self._main_loop is not None:
            return
        self._main_loop = asyncio.get_running_loop()
        self._open_promises()
        self._starting = asyncio.ensure_future(self._start_first_sandbox())
        self._starting.add_done_callback(self._log_start_failure)

    def _open_promises(self) -> None:
        """Durable promises need the running loop; a failure only costs the bookkeeping."""
        store = self.checkpoints.store
        if store is None:
            return
        try:
            # Imported here, after the first kernel_info reply: resonate-sdk
            # brings aiohttp and friends, which would slow every kernel start.
            from capsule_kernel.checkpoint.promises import CellPromises

            self.promises = CellPromises.open(store.path, self.kernel_id, self.log, os.environ)
        except Exception:
            self.log.exception("durable promises are off: resonate-sdk could not start")

    async def _start_first_sandbox(self) -> SubprocessSandbox:
        sandbox = await self._start_sandbox()
        latest = self.checkpoints.latest(self.session_name)
        if latest is not None and self.settings.auto_resume:
            try:
                self._resume_notice = await self.resume(latest, sandbox) + "\n"
            except (SandboxDied, TimeoutError) as err:
                self.log.error("auto_resume failed: %s", err)
                self._resume_notice = f"auto_resume failed ({err}); the namespace starts empty.\n"
                sandbox = await self._start_sandbox()
        elif latest is not None:
            self._offer_resume()
        return sandbox

    async def _start_sandbox(self, *, restore: bool = False) -> SubprocessSandbox:
        """A new sandbox; with restore, holding the session's last checkpoint."""
        previous = self.sandbox
        held_before = set(self.held.get(self.active_kind, {}))
        sandbox = await self._spawn_sandbox()
        if not restore:
            return sandbox
        # In a session that used both sandboxes, a replacement gets back what its predecessor held.
        mixed = any(kind != sandbox.kind for kind, _, _ in self.origins.values())
        names = held_before if mixed else None
        try:
            self._restore_outcome = await self.checkpoints.restore_latest(
                self.session_name, sandbox, previous, names=names
            )
            self._note_held(sandbox.kind, names)
        except (SandboxDied, TimeoutError) as err:
            # Restoring must never become a crash loop: give up on it once.
            self.log.error("restoring the last checkpoint failed: %s", err)
            sandbox.stopping = True
            await sandbox.shutdown()
            sandbox = await self._spawn_sandbox()
            self._restore_outcome = (
                f"restoring the last checkpoint failed ({err}), so this sandbox starts with an empty namespace"
            )
        return sandbox

    async def _spawn_sandbox(self) -> SubprocessSandbox:
        on_event = self._event_handler(self.active_kind)
        if self.active_kind == "wasm":
            sandbox: SubprocessSandbox = WasmSandbox(
                self.limit_settings.limits, on_event, chunk_root=self.checkpoints.chunk_root, mounts=self.mounts
            )
        else:
            sandbox = SubprocessSandbox(
                self.limit_settings.limits,
                on_event,
                chunk_root=self.checkpoints.chunk_root,
                mounts=self.mounts,
                sandbox_settings=self.settings.sandbox,
                state_dir=self._sandbox_state_dir(),
            )
        self.sandbox = sandbox
        self.held[sandbox.kind] = {}
        await sandbox.start()
        self._side_task(self._watch_sandbox(sandbox), cell_scoped=False)
        self.log.info("capsule sandbox started, pid %s", sandbox.pid)
        return sandbox

    def _sandbox_state_dir(self) -> Path | None:
        """This notebook's persistent IPython directory (history), beside the store; one per session."""
        root = self.checkpoints.chunk_root
        if root is None:
            return None
        return root.parent / "sandbox-state" / hashlib.sha256(self.session_name.encode()).hexdigest()[:24]

    async def _watch_sandbox(self, sandbox: SubprocessSandbox) -> None:
        """Notice a sandbox that dies between cells, and replace it at once."""
        await sandbox.wait_exit()
        if sandbox is not self.sandboxes.get(sandbox.kind) or self._cell_running or sandbox.stopping:
            return
        if sandbox.kind != self.active_kind:
            return  # replaced when a cell needs it again, with its checkpointed names
        self._note_death_between_cells(sandbox)
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._start_sandbox(restore=True))
            self._starting.add_done_callback(self._log_start_failure)

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
            self._publish("stream", {"name": "stderr", "text": text})

    def _note_confinement(self, sandbox: SubprocessSandbox) -> None:
        """Once per kernel: a subprocess sandbox that is not a security boundary says so."""
        state = sandbox.enforcement.get("confinement", "")
        if self._confinement_noted or sandbox.kind != "subprocess" or not state.startswith("not"):
            return
        self._confinement_noted = True
        self._confinement_notice = f"Capsule: the subprocess sandbox is {state}. See %capsule status.\n"
        self.log.warning(self._confinement_notice.strip())

    def _note_death_between_cells(self, sandbox: SubprocessSandbox) -> None:
        if not sandbox.death_noted:
            sandbox.death_noted = True
            self._idle_death = f"The sandbox (pid {sandbox.pid}) {sandbox.death_reason} while no cell was running."
            self.log.warning(self._idle_death)

    def _log_start_failure(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("the sandbox could not start: %s", task.exception())

    async def resume(self, checkpoint: Any, sandbox: SubprocessSandbox | None = None) -> str:
        """Bring back a checkpoint from an earlier kernel; numbering goes on from it."""
        if sandbox is None:
            sandbox = await self.ready_sandbox()
        outcome = await self.checkpoints.restore(checkpoint, sandbox, replace=True)
        await self.namespace_replaced(checkpoint)
        self._next_count = max(self._next_count, checkpoint.execution_count + 1)
        self._resume_offer = None
        return (
            f"Resumed session {self.session_name}: {outcome}. "
            f"Execution counts continue from [{checkpoint.execution_count + 1}]."
        )

    async def switch_session(self, name: str, source: str) -> None:
        """Checkpoints go to another session from now on, starting with a full one."""
        if name == self.session_name:
            return
        self.session_name, self.session_source = name, source
        if self.sandbox is not None and self.sandbox.alive:
            # The next snapshot must hold every name, not a delta against
            # another session's checkpoint.
            with contextlib.suppress(SandboxDied, TimeoutError):
                await self.sandbox.request("forget_digests", {})

    async def _adopt_frontend_session(self, sandbox: SubprocessSandbox) -> None:
        """VS Code names the notebook only in its start-up code (__vsc_ipynb_file__)."""
        path = sandbox.notebook_path
        if path and self.session_source.startswith("fresh id") and path != self.session_name:
            await self.switch_session(path, "__vsc_ipynb_file__ (VS Code's notebook path)")
            self._offer_resume()

    def _offer_resume(self) -> None:
        """A new kernel in a session that has checkpoints: say how to get them back."""
        latest = self.checkpoints.latest(self.session_name)
        if latest is not None:
            self._resume_offer = (
                f"Session {self.session_name} has checkpoints from an earlier kernel (the last after cell "
                f"[{latest.execution_count}], {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(latest.created))}). "
                "Run %capsule resume to restore them, or set auto_resume = true in capsule.toml.\n"
            )

    async def ready_sandbox(self) -> SubprocessSandbox:
        """The running sandbox, starting (or replacing) one when needed."""
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

    async def restart_sandbox(self, why: str) -> SubprocessSandbox:
        """Replace the sandbox with a fresh one (the namespace is lost)."""
        old = await self.ready_sandbox()
        old.stopping = True
        self.log.info("restarting the sandbox: %s", why)
        await old.shutdown()
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
        self.origins.clear()
        self.held = {"subprocess": {}, "wasm": {}}
        if checkpoint is not None:
            for name, entry in checkpoint.entries.items():
                self.origins[name] = (self.active_kind, checkpoint.execution_count, str(entry.get("type", "")))
                self.held[self.active_kind][name] = checkpoint.execution_count
        for kind, sandbox in list(self.sandboxes.items()):
            if kind != self.active_kind:
                sandbox.stopping = True
                del self.sandboxes[kind]
                await sandbox.shutdown()

    def _interrupt_sandbox(self) -> None:
        sandbox = self.sandbox
        if sandbox is None or not self._cell_running:
            return
        sandbox.interrupt()
        # A SIGINT that lands while the cell is starting a child (between
        # fork and exec of `!cmd`) reaches no one who acts on it: say it again.
        loop, serial = self._main_loop, self._cell_serial
        if loop is not None:
            loop.call_soon_threadsafe(loop.call_later, _REINTERRUPT_SECONDS, self._interrupt_again, sandbox, serial)

    def _interrupt_again(self, sandbox: SubprocessSandbox, serial: int) -> None:
        if sandbox is self.sandbox and self._cell_running and serial == self._cell_serial:
            sandbox.interrupt()

    # -- execution count -------------------------------------------------------------

    @property
    def execution_count(self) -> int:
        """The number the next stored cell gets; the sandbox's IPython agrees."""
        return self._next_count

    @execution_count.setter
    def execution_count(self, value: int) -> None:
        """kernelbase increments for every non-silent cell; we count like IPython."""

    # -- execute ----------------------------------------------------------------------

    async def do_execute(
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict[str, str] | None = None,
        allow_stdin: bool = False,
        *,
        cell_meta: dict[str, Any] | None = None,  # noqa: ARG002
        cell_id: str | None = None,  # noqa: ARG002
    ) -> dict[str, Any]:
        started = time.perf_counter()
        self._output_parent = self.get_parent("shell")
        # Side tasks run outside this handler's context: remember who asked.
        self._stdin_ident = self._get_shell_context_var(self._shell_parent_ident)
        count = self._next_count
        cell = Cell(code, silent, store_history, user_expressions or {}, allow_stdin, count)
        try:
            reply, meta = await self._execute(cell)
        except Exception as err:
            self.log.exception("capsule kernel error while executing a cell")
            reply = self._fail(count, "CapsuleKernelError", f"internal error in the capsule kernel: {err!r}")
            meta = {"sandbox": "kernel", "mode": "error", "reason": "internal error"}
        if not silent and store_history:
            self._next_count = max(count + 1, int(reply.get("execution_count", count)) + 1)
        meta["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
        self._last_meta = meta
        return reply

    async def _execute(self, cell: Cell) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run one cell where it belongs; return the reply and its metadata."""
        code, count = cell.code, cell.execution_count
        try:
            magic_lines = magics.capsule_lines(code)
        except magics.MagicUsageError as err:
            reply = self._fail(count, "UsageError", str(err))
            return reply, {"sandbox": "kernel", "mode": "magic", "reason": "%%capsule cell"}
        if magic_lines is not None:
            reply = await self._execute_magic_cell(code, magic_lines, count)
            return reply, {"sandbox": "kernel", "mode": "magic", "reason": "%capsule lines run in the kernel"}
        plan = self._plan(code)
        reads = plan.reads | plan.mutates
        if self.routing_mode != "subprocess" and self._origins_pending(reads):
            # Where a name lives and what it is decide the route: learn it from the snapshot in flight.
            await self.checkpoints_settled()
        value_types = {name: self.origins[name][2] for name in reads if name in self.origins}
        decision = route(plan, self.routing_mode, value_types)
        meta = {"sandbox": decision.sandbox, "mode": plan.mode, "reason": decision.reason, "routing": self.routing_mode}
        if decision.sandbox == REFUSED:
            reply = self._fail(
                count,
                "WasmRefused",
                f"the Wasm sandbox cannot run this cell: {decision.reason}. "
                "Run %capsule mode auto (such cells then go to the subprocess sandbox) or %capsule mode subprocess.",
            )
            return reply, meta
        candidates = tuple(sorted(plan.reads | plan.mutates | plan.writes))
        cell = replace(cell, snapshot_candidates=candidates)
        if decision.sandbox == "wasm" and plan.transformed is not None:
            # No IPython inside: it gets %magics as the calls IPython would make (the analyzer's transform).
            cell = replace(cell, code=plan.transformed, raw_code=code)
        reply = await self._execute_in_sandbox(cell, decision.sandbox, reads)
        sandbox = self.sandboxes.get(decision.sandbox)
        if isinstance(sandbox, WasmSandbox) and sandbox.last_fuel is not None:
            meta["fuel_consumed"] = sandbox.last_fuel
        return reply, meta

    def _plan(self, code: str) -> ExecutionPlan:
        """The analyzer's plan; a bug in it must never cost the user the cell."""
        try:
            return self.analyzer.plan(code)
        except Exception:
            self.log.exception("the analyzer failed; running the cell as a plain cell")
            return ExecutionPlan(source_hash="", syntax_error=None)

    def _fail(self, count: int, ename: str, evalue: str) -> dict[str, Any]:
        """Publish an error output and build the matching error reply."""
        content = _error_content(ename, evalue)
        self._publish("error", content)
        return {"status": "error", "execution_count": count, "user_expressions": {}, "payload": [], **content}

    async def _execute_magic_cell(self, code: str, lines: list[str], count: int) -> dict[str, Any]:
        for line in lines:
            try:
                bundles = await magics.run(self, line)
            except magics.MagicUsageError as err:
                return self._fail(count, "UsageError", str(err))
            for bundle in bundles:
                self._publish("display_data", {"data": bundle, "metadata": {}, "transient": {}})
        if self.sandbox is not None and self.sandbox.alive:
            with contextlib.suppress(SandboxDied, TimeoutError):
                await self.sandbox.request("store_history", {"code": code, "execution_count": count})
        return {"status": "ok", "execution_count": count, "user_expressions": {}, "payload": []}

    async def _execute_in_sandbox(
        self, cell: Cell, kind: str = "subprocess", reads: frozenset[str] = frozenset()
    ) -> dict[str, Any]:
        count = cell.execution_count
        self.checkpoints.note_cell(count, cell.raw_code or cell.code)
        switching = kind != self.active_kind
        if switching and self.sandbox is not None:
            # The other sandbox's last snapshot must be recorded before names cross.
            await self.checkpoints_settled()
        self.active_kind = kind
        try:
            sandbox = await self.ready_sandbox()
        except (SandboxDied, TimeoutError) as err:
            return self._fail(count, "SandboxUnavailable", f"the {kind} sandbox could not start: {err}")
        await self._bring_names(sandbox, reads)
        self._note_confinement(sandbox)
        for attribute in ("_confinement_notice", "_resume_notice", "_resume_offer"):
            text = getattr(self, attribute)
            if text:
                setattr(self, attribute, None)
                self._publish("stream", {"name": "stderr", "text": text})
        if self._idle_death:
            notice, self._idle_death = self._idle_death, None
            self._publish(
                "stream",
                {"name": "stderr", "text": f"{notice} A fresh sandbox was started; {self._restore_outcome}.\n"},
            )
        self._cell_running = True
        self._cell_serial += 1
        self._cell_outputs = Counter()
        self._promise_started(cell, sandbox)
        try:
            reply = await sandbox.execute(asdict(cell))
            await self._adopt_frontend_session(sandbox)
            self._promise_after_reply(cell, reply, sandbox.last_done_snapshot)
            return reply
        except SandboxDied as death:
            reply = await self._report_death(sandbox, death, count)
            self._promise_after_reply(cell, reply, None)
            return reply
        finally:
            self._cell_running = False
            self._check_policy_files()
            for task in list(self._side_tasks):
                if getattr(task, "cell_scoped", False):
                    task.cancel()

    def _origins_pending(self, reads: frozenset[str]) -> bool:
        """Whether a name the cell reads may be in a snapshot not recorded yet."""
        unknown = [name for name in reads if name not in self.origins and not hasattr(builtins, name)]
        return bool(unknown) and any(s.snapshots_in_flight for s in self.sandboxes.values())

    async def _bring_names(self, sandbox: SubprocessSandbox, reads: frozenset[str]) -> None:
        """Merge into this sandbox the names the cell reads that the other sandbox wrote later."""
        held = self.held.setdefault(sandbox.kind, {})

        def stale(name: str) -> bool:
            return (
                name in self.origins
                and self.origins[name][0] != sandbox.kind
                and held.get(name, -1) < self.origins[name][1]
            )

        wanted = sorted(name for name in reads if stale(name))
        if not wanted:
            return
        latest = self.checkpoints.latest(self.session_name)
        if latest is None:
            return
        entries = {name: latest.entries[name] for name in wanted if name in latest.entries}
        # An alias comes with its target (one object), unless this sandbox holds the target's latest already.
        for entry in list(entries.values()):
            target = entry.get("alias")
            if target and target not in entries and target in latest.entries and stale(target):
                entries[target] = latest.entries[target]
                wanted.append(target)
        failed: dict[str, str] = {}
        try:
            result = await sandbox.restore(entries, replace=False)
            failed = dict(result.get("failed", {}))
        except (SandboxDied, TimeoutError) as err:
            failed = dict.fromkeys(entries, f"the transfer failed: {err}")
        for name in wanted:
            held[name] = self.origins[name][1]  # tried once per write: no retry storm
            if name not in entries:
                failed.setdefault(name, "it was not in the last checkpoint")
        if failed:
            other = "subprocess" if sandbox.kind == "wasm" else "wasm"
            lines = "".join(f"  {name}: {why}\n" for name, why in sorted(failed.items()))
            self._publish(
                "stream",
                {"name": "stderr", "text": f"Not brought over from the {other} sandbox:\n{lines}"},
            )

    def _note_held(self, kind: str, names: set[str] | None) -> None:
        """After a restore: this sandbox holds the checkpointed version of those names."""
        held = self.held.setdefault(kind, {})
        for name, (_, count, _) in self.origins.items():
            if names is None or name in names:
                held[name] = count

    def _note_snapshot(self, kind: str, event: dict[str, Any]) -> None:
        count = int(event.get("execution_count", 0))
        held = self.held.setdefault(kind, {})
        for name, entry in event.get("entries", {}).items():
            self.origins[name] = (kind, count, str(entry.get("type", "")))
            held[name] = count
        for name in event.get("removed", []):
            self.origins.pop(name, None)
            held.pop(name, None)

    def _event_handler(self, kind: str) -> Any:
        def handle(event: dict[str, Any]) -> None:
            if event.get("type") == "snapshot":
                self._note_snapshot(kind, event)
            self._on_sandbox_event(event)

        return handle

    def _promise_started(self, cell: Cell, sandbox: SubprocessSandbox) -> None:
        if self.promises is None or cell.silent:
            return
        first_line = next((line for line in cell.code.splitlines() if line.strip()), "")[:120]
        param = {
            "code_sha256": hashlib.sha256(cell.code.encode("utf-8", "surrogatepass")).hexdigest(),
            "first_line": first_line,
            "parent_checkpoint": self.checkpoints.latest_id(self.session_name),
            "sandbox": sandbox.kind,
            "limits": sandbox.limits.to_json(),
        }
        self.promises.started(self.session_name, cell.execution_count, param)

    def _promise_after_reply(self, cell: Cell, reply: dict[str, Any], snapshot_follows: int | None) -> None:
        """Reject a failed cell now; resolve a good one once its checkpoint is recorded."""
        if self.promises is None or cell.silent:
            return
        outputs = dict(self._cell_outputs)
        if reply.get("status") != "ok":
            value = {"ename": reply.get("ename"), "evalue": reply.get("evalue"), "outputs": outputs}
            self.promises.rejected(self.session_name, cell.execution_count, value)
        elif snapshot_follows is None:
            latest = self.checkpoints.latest_id(self.session_name)
            value = {"checkpoint": latest, "changed": False, "outputs": outputs}
            self.promises.resolved(self.session_name, cell.execution_count, value)
        else:
            self._outputs_by_cell[cell.execution_count] = outputs

    async def _record_checkpoint(self, event: dict[str, Any], recording: asyncio.Task) -> None:
        checkpoint = await recording
        count = int(event.get("execution_count", 0))
        outputs = self._outputs_by_cell.pop(count, None)
        if self.promises is None or outputs is None:
            return
        changed = bool(event.get("entries") or event.get("removed"))
        checkpoint_id = checkpoint.id if checkpoint else None
        if checkpoint is None and not changed:
            # The snapshot found nothing new: the latest checkpoint still holds.
            checkpoint_id = self.checkpoints.latest_id(self.session_name)
        value = {"checkpoint": checkpoint_id, "changed": changed, "outputs": outputs}
        if checkpoint_id is None:
            value["checkpoint_error"] = self.checkpoints.failures.get(count, "no checkpoint")
        self.promises.resolved(self.session_name, count, value)

    def _snapshot_failed(self, event: dict[str, Any]) -> None:
        count = int(event.get("execution_count", 0))
        reason = event.get("reason", "")
        self.log.warning("checkpoint after cell %s failed: %s", count, reason)
        self.checkpoints.failures[count] = reason
        outputs = self._outputs_by_cell.pop(count, None)
        if self.promises is not None and outputs is not None:
            value = {"checkpoint": None, "checkpoint_error": reason, "outputs": outputs}
            self.promises.resolved(self.session_name, count, value)

    async def _report_death(self, sandbox: SubprocessSandbox, death: SandboxDied, count: int) -> dict[str, Any]:
        pid = sandbox.pid
        try:
            fresh = await self._start_sandbox(restore=True)
            after = f"A fresh sandbox (pid {fresh.pid}) is running; {self._restore_outcome}"
        except (SandboxDied, TimeoutError) as err:
            after = f"A fresh sandbox could not be started ({err}); the next cell will try again"
        ename = "CellTimeout" if death.timed_out else "SandboxDied"
        what = f"the Wasm sandbox (host pid {pid})" if sandbox.kind == "wasm" else f"the sandbox process (pid {pid})"
        return self._fail(count, ename, f"{what} {death.reason}. {after}")

    def finish_metadata(
        self,
        parent: dict[str, Any],  # noqa: ARG002 - kernelbase's signature
        metadata: dict[str, Any],
        reply_content: dict[str, Any],
    ) -> dict[str, Any]:
        metadata["status"] = reply_content.get("status")
        metadata["capsule"] = self._last_meta
        return metadata

    # -- events from the sandbox ------------------------------------------------------

    def _publish(self, msg_type: str, content: dict[str, Any], **extra: Any) -> None:
        assert self.session is not None
        self._cell_outputs[msg_type] += 1
        self.session.send(
            self.iopub_socket, msg_type, content, self._output_parent, ident=self._topic(msg_type), **extra
        )

    def _on_sandbox_event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "stream":
            self._publish("stream", {"name": event["name"], "text": event["text"]})
        elif kind == "display":
            msg_type = "update_display_data" if event.get("update") else "display_data"
            self._publish(
                msg_type, {"data": event["data"], "metadata": event["metadata"], "transient": event["transient"]}
            )
        elif kind == "clear_output":
            self._publish("clear_output", {"wait": event.get("wait", False)})
        elif kind == "execute_result":
            self._publish("execute_result", {k: event[k] for k in ("data", "metadata", "execution_count")})
        elif kind == "error":
            self._publish("error", {k: event[k] for k in ("ename", "evalue", "traceback")})
        elif kind == "comm":
            self._on_sandbox_comm(event)
        elif kind == "input_request":
            self._side_task(self._answer_input(event), cell_scoped=True)
        elif kind == "magic":
            self._side_task(self._answer_magic(event), cell_scoped=True)
        elif kind == "snapshot":
            # Recording starts now, so whoever waits for settled checkpoints sees it.
            recording = self.checkpoints.record(self.session_name, event)
            self._side_task(self._record_checkpoint(event, recording), cell_scoped=False)
        elif kind == "snapshot_failed":
            self._snapshot_failed(event)
        else:
            self.log.warning("ignoring unknown sandbox event %r", kind)

    def _side_task(self, coroutine: Any, *, cell_scoped: bool) -> None:
        task = asyncio.ensure_future(coroutine)
        task.cell_scoped = cell_scoped  # type: ignore[attr-defined]
        self._side_tasks.add(task)
        task.add_done_callback(self._side_task_done)

    def _side_task_done(self, task: asyncio.Task) -> None:
        self._side_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("capsule side task failed", exc_info=task.exception())

    def _on_sandbox_comm(self, event: dict[str, Any]) -> None:
        msg_type, content = event["msg_type"], event["content"]
        if msg_type == "comm_open":
            self._comms[content["comm_id"]] = content.get("target_name", "")
        elif msg_type == "comm_close":
            self._comms.pop(content.get("comm_id"), None)
        self._publish(
            msg_type, content, metadata=event.get("metadata"), buffers=protocol.unpack_buffers(event.get("buffers"))
        )

    async def _answer_input(self, event: dict[str, Any]) -> None:
        """Relay input()/getpass from the sandbox to the frontend's stdin channel."""
        assert self.session is not None and self.sandbox is not None
        sandbox = self.sandbox
        socket = self.stdin_socket
        while True:  # purge stale replies
            try:
                socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
        ident = self._stdin_ident
        content = {"prompt": event.get("prompt", ""), "password": bool(event.get("password"))}
        self.session.send(socket, "input_request", content, self._output_parent, ident=ident)
        while True:
            if socket.poll(0):
                _, reply = self.session.recv(socket, zmq.NOBLOCK)
                if reply is not None:
                    break
            await asyncio.sleep(_INPUT_POLL_SECONDS)
        value = reply.get("content", {}).get("value", "")
        with contextlib.suppress(SandboxDied):
            sandbox.send({"type": "input_reply", "id": event.get("id"), "value": value})

    async def _answer_magic(self, event: dict[str, Any]) -> None:
        """A %capsule line inside a cell: run it here, answer the sandbox."""
        sandbox = self.sandbox
        answer: dict[str, Any] = {"type": "magic_reply", "id": event.get("id"), "ok": True}
        words = event.get("line", "").split()
        if event.get("cell"):
            answer.update(ok=False, error=f"%%capsule {event.get('line', '')}: this subcommand takes no cell body")
        elif words and words[0] in _WHOLE_CELL_SUBCOMMANDS:
            answer.update(
                ok=False,
                error=f"%capsule {words[0]} replaces the sandbox's state, so it cannot run inside a cell "
                "with other code; put it in a cell of its own",
            )
        else:
            try:
                for bundle in await magics.run(self, event.get("line", "")):
                    self._publish("display_data", {"data": bundle, "metadata": {}, "transient": {}})
            except magics.MagicUsageError as err:
                answer.update(ok=False, error=str(err))
        if sandbox is not None:
            with contextlib.suppress(SandboxDied):
                sandbox.send(answer)

    # -- comms from the frontend ------------------------------------------------------

    def _forward_comm(self, msg: dict[str, Any]) -> None:
        msg_type = msg["header"]["msg_type"]
        content = msg["content"]
        if msg_type == "comm_open":
            self._comms[content.get("comm_id")] = content.get("target_name", "")
        elif msg_type == "comm_close":
            self._comms.pop(content.get("comm_id"), None)
        if not self._cell_running:
            self._output_parent = msg
        if self.sandbox is None or not self.sandbox.alive:
            self.log.warning("dropping %s: the sandbox is not running", msg_type)
            return
        buffers = [bytes(b) for b in msg.get("buffers") or []]
        with contextlib.suppress(SandboxDied):
            self.sandbox.send(
                {
                    "type": "comm",
                    "msg_type": msg_type,
                    "content": content,
                    "metadata": msg.get("metadata", {}),
                    "buffers": protocol.pack_buffers(buffers),
                }
            )

    def _forward_comm_open(self, stream: Any, ident: Any, msg: dict[str, Any]) -> None:  # noqa: ARG002
        self._forward_comm(msg)

    def _forward_comm_msg(self, stream: Any, ident: Any, msg: dict[str, Any]) -> None:  # noqa: ARG002
        self._forward_comm(msg)

    def _forward_comm_close(self, stream: Any, ident: Any, msg: dict[str, Any]) -> None:  # noqa: ARG002
        self._forward_comm(msg)

    async def comm_info_request(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        assert self.session is not None
        target = parent["content"].get("target_name")
        comms = {cid: {"target_name": name} for cid, name in self._comms.items() if target in (None, name)}
        self.session.send(stream, "comm_info_reply", {"status": "ok", "comms": comms}, parent, ident)

    # -- introspection (answered by the sandbox) -----------------------------------

    async def _ask_sandbox(self, kind: str, args: dict[str, Any], fallback: dict[str, Any]) -> dict[str, Any]:
        try:
            sandbox = await self.ready_sandbox()
            return await sandbox.request(kind, args, timeout=_REQUEST_WAIT_SECONDS)
        except (SandboxDied, TimeoutError) as err:
            self.log.warning("%s request failed: %s", kind, err)
            return fallback

    async def do_complete(self, code: str, cursor_pos: int | None) -> dict[str, Any]:
        cursor = len(code) if cursor_pos is None else cursor_pos
        fallback = {"status": "ok", "matches": [], "cursor_start": cursor, "cursor_end": cursor, "metadata": {}}
        return await self._ask_sandbox("complete", {"code": code, "cursor_pos": cursor}, fallback)

    async def do_inspect(
        self, code: str, cursor_pos: int, detail_level: int = 0, omit_sections: Any = ()
    ) -> dict[str, Any]:
        args = {
            "code": code,
            "cursor_pos": cursor_pos,
            "detail_level": detail_level,
            "omit_sections": list(omit_sections),
        }
        return await self._ask_sandbox("inspect", args, {"status": "ok", "data": {}, "metadata": {}, "found": False})

    async def do_history(
        self,
        hist_access_type: str,
        output: bool,
        raw: bool,
        session: int | None = None,
        start: int | None = None,
        stop: int | None = None,
        n: int | None = None,
        pattern: str | None = None,
        unique: bool = False,
    ) -> dict[str, Any]:
        args = {
            "hist_access_type": hist_access_type,
            "output": output,
            "raw": raw,
            "session": session or 0,
            "start": start or 0,
            "stop": stop,
            "n": n,
            "pattern": pattern,
            "unique": unique,
        }
        return await self._ask_sandbox("history", args, {"status": "ok", "history": []})

    async def do_is_complete(self, code: str) -> dict[str, Any]:
        # Parsing only: safe to do here, and answers even while a cell runs.
        status, indent = self._completeness.check_complete(code)
        reply: dict[str, Any] = {"status": status}
        if status == "incomplete":
            reply["indent"] = " " * (indent or 0)
        return reply

    # -- control ---------------------------------------------------------------------

    async def interrupt_request(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        assert self.session is not None
        self._interrupt_sandbox()
        self.session.send(stream, "interrupt_reply", {"status": "ok"}, parent, ident=ident)

    async def shutdown_request(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        """kernelbase's shutdown, but the loops stop after this message is done.

        kernelbase stops the shell loop while the control thread is still
        flushing after the handler; the main thread then closes the iopub
        thread under it and the control thread can block for ever on a send
        (the frontend then kills the kernel after its timeout). Stopping the
        loops from a callback on the control loop runs after that flush.
        """
        assert self.session is not None
        content = await self.do_shutdown(parent["content"]["restart"])
        self.session.send(stream, "shutdown_reply", content, parent, ident=ident)
        self._shutdown_message = self.session.msg("shutdown_reply", content, parent)
        await self._at_shutdown()
        control_loop = self.control_stream.io_loop if self.control_stream else None
        shell_loop = self.shell_stream.io_loop if self.shell_stream else None

        def stop_loops() -> None:
            for loop in {shell_loop, self.io_loop} - {None}:
                loop.add_callback(loop.stop)
            if control_loop is not None:
                control_loop.stop()

        if control_loop is not None:
            control_loop.add_callback(stop_loops)
        else:
            stop_loops()

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        # Called on the control thread; the sandbox lives on the shell loop.
        if self._main_loop is not None and self._main_loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._stop_sandbox(), self._main_loop)
            try:
                await asyncio.wait_for(asyncio.wrap_future(future), timeout=10)
            except (TimeoutError, Exception):
                self.log.exception("sandbox did not stop cleanly; killing it")
                for sandbox in list(self.sandboxes.values()):
                    sandbox.kill()
        else:
            for sandbox in list(self.sandboxes.values()):
                sandbox.kill()
        return {"status": "ok", "restart": restart}

    async def _stop_sandbox(self) -> None:
        if self._starting is not None:
            with contextlib.suppress(Exception):
                await self._starting
        for sandbox in list(self.sandboxes.values()):
            sandbox.stopping = True
            await sandbox.shutdown()
        with contextlib.suppress(Exception):
            await self.checkpoints.settled(10.0)
        if self.promises is not None:
            with contextlib.suppress(Exception):
                await self.promises.close()

    async def do_debug_request(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "response",
            "request_seq": msg.get("seq", 0),
            "success": False,
            "command": msg.get("command", ""),
            "message": "the capsule kernel does not support the debugger",
        }

    @property
    def kernel_info(self) -> dict[str, Any]:
        info = super().kernel_info
        # No debugger, and one sandbox cannot run subshells concurrently.
        info["supported_features"] = [
            f for f in info.get("supported_features", []) if f not in ("debugger", "kernel subshells")
        ]
        return info

    async def _refuse_subshells(self, socket: Any, ident: Any, parent: dict[str, Any]) -> None:
        assert self.session is not None
        msg_type = parent["header"]["msg_type"].replace("_request", "_reply")
        content = {
            "status": "error",
            "ename": "NotImplementedError",
            "evalue": "the capsule kernel has no subshells",
            "traceback": [],
        }
        self.session.send(socket, msg_type, content, parent, ident)

    create_subshell_request = _refuse_subshells
    delete_subshell_request = _refuse_subshells
    list_subshell_request = _refuse_subshells
