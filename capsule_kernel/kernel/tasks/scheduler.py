"""The session's tasks: where they run, how many at once, what the notebook sees of them.

Runs in the KERNEL, owned by the session controller. It takes
``%%capsule task`` cells and ``@task`` calls as TaskSpecs, finds the names
they read in the notebook's last checkpoint, keys them (task_spec.py), and
runs each at most once per key: a key whose task succeeded answers from its
record. Background tasks queue FIFO for ``[tasks] max_parallel`` slots;
every task gets a fresh sandbox of its own from a small warm pool, confined
and limited like every sandbox (the pool builds them with the same classes
the notebook's sandboxes use). Results are bound into the notebook's
sandbox between cells only, as the bytes the task's sandbox pickled (a value
made in Wasm loads there as data only).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from capsule_kernel.kernel.checkpoint.store import CheckpointRefused, default_home
from capsule_kernel.kernel.checkpoint.task_records import TaskRecord, TaskRecords
from capsule_kernel.kernel.router import route
from capsule_kernel.kernel.sandbox.kinds import SANDBOX_KINDS
from capsule_kernel.kernel.sandbox.process import SandboxDied, SandboxProcess
from capsule_kernel.kernel.tasks import envelope as task_envelope
from capsule_kernel.kernel.tasks import runner as task_runner
from capsule_kernel.kernel.tasks import spec as task_spec
from capsule_kernel.kernel.tasks.envelope import Failure
from capsule_kernel.kernel.tasks.spec import PRELUDE, TaskRefused, TaskSpec, task_code
from capsule_kernel.protocol.limits import format_size

if TYPE_CHECKING:
    import logging

    from capsule_kernel.kernel.analyzer import Analyzer
    from capsule_kernel.kernel.checkpoint.recorder import Checkpoints
    from capsule_kernel.kernel.policy import Policy
    from capsule_kernel.kernel.sandbox.held_mounts import HeldMounts
    from capsule_kernel.kernel.session.durability import CellDurability
    from capsule_kernel.kernel.session.ledger import NameLedger
    from capsule_kernel.kernel.session.relay import Relay


class TaskOwner(Protocol):
    """What the tasks ask of the session that owns them (SessionController implements it).

    Named here, so the scheduler never imports the controller that imports it.
    """

    policy: Policy
    checkpoints: Checkpoints
    relay: Relay
    analyzer: Analyzer
    ledger: NameLedger
    durability: CellDurability
    held_mounts: HeldMounts
    mounts: list[dict[str, Any]]
    sandboxes: dict[str, SandboxProcess]
    ipython_config: dict[str, Any]
    notebook: str
    session_name: str
    kernel_id: str
    routing_mode: str
    cell_running: bool
    log: logging.Logger

    def bound_mounts(self, mounts: list[dict[str, Any]]) -> list[dict[str, Any]]: ...
    def side_task(self, coroutine: Coroutine[Any, Any, Any], *, cell_scoped: bool) -> None: ...
    async def checkpoints_settled(self, timeout: float = 60.0) -> None: ...
    async def ready_sandbox(self) -> SandboxProcess: ...
    async def sandbox_of(self, kind: str) -> SandboxProcess: ...

STATUS_MIME_THROTTLE_SECONDS = 0.2
# Output kept per background task for its live display (the tail is shown).
_OUTPUT_TAIL_CHARS = 4000
# Tasks a session may have queued or running at once (a cell submitting in a loop meets this).
MAX_LIVE_TASKS = 1000
# Bytes of task code (a @task call's pickled arguments are pasted into it) and of results the kernel
# holds in memory for one session at once: a submission past it is refused in the cell. A task's
# code is dropped when it ends, and its result's bytes once they are on disk (task-results/).
MAX_HELD_TASK_BYTES = 256 * 1024 * 1024
# Finished runs remembered in memory (their envelopes, for handles and %capsule tasks); older ones
# are answered from the task records.
MAX_FINISHED_RUNS = 2000
# The options a @task call may give (no mounts: those are the notebook's own lines' to add).
API_OPTIONS = ("sandbox", "timeout", "memory", "cpu", "fuel", "compute", "retries", "backoff", "retry_on", "id")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
# The limits a sandbox is launched with (the others are set per cell).
_LAUNCH_LIMITS = ("memory", "disk", "network", "files", "procs")


def _never_ran(run: TaskRun, failure: Failure) -> task_runner.Outcome:
    """The outcome of a task that failed before any attempt (refused, or its code unreadable)."""
    envelope = task_envelope.build(
        name=run.name, task_id=run.key, sandbox=run.spec.kind, attempts=[], started_at=time.time(),
        duration_ms=0, result=None, failure=failure, fuel=None, peak_memory=None,
    )  # fmt: skip
    return task_runner.Outcome(envelope)


def failure_text(envelope: dict[str, Any]) -> str:
    """The evalue of a TaskFailed (capsule_kernel.tasks.TaskFailed says the same in the notebook)."""
    error = envelope["error"]
    return f"task {envelope['execution']['task_name']} failed ({error['type']}): {error['message']}"


@dataclass
class TaskRun:
    """One task of this kernel, from submission to its envelope."""

    spec: TaskSpec
    key: str
    inputs: dict[str, Any]
    parent: dict[str, Any]
    state: str = "queued"
    attempt: int = 0
    retry_in: float | None = None
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    outcome: task_runner.Outcome | None = None
    future: asyncio.Task | None = None
    display_id: str | None = None
    output: str = ""
    bound: bool = False
    last_shown: float = 0.0
    promise: str | None = None  # its durable promise (resonate-sdk), settled with the envelope
    result_digest: str | None = None  # its result's bytes in task-results/, once saved (then not held)
    code_bytes: int = 0  # its code's size until it ends (in memory, or spilled into its record)
    spilled: bool = False  # its code is in its task record only; read back when it starts

    def held_bytes(self) -> int:
        """What of it the kernel keeps: its code until it ends, its result's bytes until saved."""
        pickled = self.outcome.pickled if self.outcome is not None else None
        return self.code_bytes + (len(pickled) if pickled is not None else 0)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def envelope(self) -> dict[str, Any] | None:
        return self.outcome.envelope if self.outcome else None


class _Events:
    """A sandbox's event handler whose target is set when a task takes the sandbox."""

    def __init__(self) -> None:
        self.target: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        if self.target is not None:
            self.target(event)


class TaskPool:
    """Fresh sandboxes for tasks, a few of them started ahead (``[tasks] warm`` per kind in use)."""

    def __init__(self, controller: TaskOwner) -> None:
        self.controller = controller
        self.warm = controller.policy.settings.tasks.warm
        self._ready: dict[tuple, deque[tuple[SandboxProcess, _Events]]] = {}
        self._warming: dict[tuple, int] = {}
        self._closed = False

    def _shape(self, spec: TaskSpec) -> tuple:
        launch = tuple(getattr(spec.limits, name) for name in _LAUNCH_LIMITS)
        return (spec.kind, launch, spec.mounts)

    async def take(self, spec: TaskSpec, sink: Any) -> SandboxProcess:
        shape = self._shape(spec)
        ready = self._ready.setdefault(shape, deque())
        sandbox = None
        while ready:
            candidate, events = ready.popleft()
            if candidate.ready:
                sandbox = candidate
                break
            candidate.stopping = True
            self.controller.side_task(candidate.shutdown(grace=0.1), cell_scoped=False)
        if sandbox is None:
            events = _Events()
            sandbox = await self._start(spec, events)
        self._refill(spec)
        events.target = sink
        sandbox.limits = spec.limits  # the per-cell limits (timeout, cpu, fuel) travel with each cell
        return sandbox

    def _refill(self, spec: TaskSpec) -> None:
        if self._closed or self.warm <= 0:
            return
        shape = self._shape(spec)
        missing = self.warm - len(self._ready.get(shape, ())) - self._warming.get(shape, 0)
        for _ in range(max(0, missing)):
            self._warming[shape] = self._warming.get(shape, 0) + 1
            self.controller.side_task(self._warm_one(spec, shape), cell_scoped=False)

    async def _warm_one(self, spec: TaskSpec, shape: tuple) -> None:
        try:
            events = _Events()
            sandbox = await self._start(spec, events)
            if self._closed:
                sandbox.stopping = True
                await sandbox.shutdown(grace=0.1)
                return
            self._ready.setdefault(shape, deque()).append((sandbox, events))
        except (SandboxDied, TimeoutError) as err:
            self.controller.log.warning("a warm task sandbox could not start: %s", err)
        finally:
            self._warming[shape] -= 1

    async def _start(self, spec: TaskSpec, events: _Events) -> SandboxProcess:
        """A new sandbox of the task's kind, confined as the notebook's are, with the task's prelude run."""
        controller = self.controller
        mounts = controller.bound_mounts([*controller.mounts, *({"path": p, "writable": w} for p, w in spec.mounts)])
        sandbox = SANDBOX_KINDS[spec.kind](
            spec.limits,
            events,
            chunk_root=controller.checkpoints.chunk_root,
            mounts=mounts,
            sandbox_settings=controller.policy.settings.sandbox,
            state_dir=None,
            ipython_config=controller.ipython_config,  # a task's IPython is configured as the notebook's
        )
        await sandbox.start()
        reply = await sandbox.execute(task_runner.cell_request(PRELUDE, 0))
        if reply.get("status") != "ok":
            sandbox.stopping = True
            await sandbox.shutdown(grace=0.1)
            raise SandboxDied(f"its task prelude failed: {reply.get('ename')}: {reply.get('evalue')}")
        return sandbox

    async def close(self) -> None:
        self._closed = True
        for ready in self._ready.values():
            while ready:
                sandbox, _ = ready.popleft()
                sandbox.stopping = True
                with contextlib.suppress(Exception):
                    await sandbox.shutdown(grace=0.2)


class TaskScheduler:
    """The tasks of one session: submit, run (FIFO under max_parallel), record, show, bind."""

    def __init__(self, controller: TaskOwner) -> None:
        self.controller = controller
        self.settings = controller.policy.settings.tasks
        self.pool = TaskPool(controller)
        self.records: TaskRecords | None = None
        if controller.checkpoints.store is not None:
            try:
                self.records = TaskRecords(default_home())
            except Exception as err:  # noqa: BLE001 - tasks still run; they are not durable then
                controller.log.error("task records are off: %s", err)
        self.runs: dict[str, TaskRun] = {}  # name -> its latest run in this kernel
        self._by_key: dict[str, TaskRun] = {}
        self._slots: asyncio.Semaphore | None = None
        self._to_bind: list[TaskRun] = []
        self._bind_lock: asyncio.Lock | None = None
        self.foreground: TaskRun | None = None
        self._promise_runs = 0

    # -- from a cell --------------------------------------------------------------------

    async def run_cell(self, args: Any, body: str, count: int) -> dict[str, Any]:
        """``%%capsule task NAME [options]`` + body: the cell's reply (TaskFailed when the task failed)."""
        relay = self.controller.relay
        try:
            spec = self.spec_from_cell(args, body)
            run, cached = await self.submit(spec)
        except TaskRefused as err:
            return relay.fail(count, "UsageError", f"%%capsule task: {err}")
        if cached:
            await self._bind_now(run)
            relay.show([task_envelope.bundle(run.envelope)])
            return self._reply(run, count)
        if spec.background:
            run.display_id = f"capsule-task-{run.key[:12]}-{int(time.time() * 1000)}"
            self._show_status(run, first=True)
            return {"status": "ok", "execution_count": count, "user_expressions": {}, "payload": []}
        self.foreground = run
        try:
            await asyncio.shield(run.future)
        except asyncio.CancelledError:
            if run.future is not None and not run.future.done():
                run.future.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await run.future
        finally:
            self.foreground = None
        await self._bind_now(run)
        relay.show([task_envelope.bundle(run.envelope)])
        return self._reply(run, count)

    def _reply(self, run: TaskRun, count: int) -> dict[str, Any]:
        envelope = run.envelope
        assert envelope is not None
        if envelope["success"]:
            return {"status": "ok", "execution_count": count, "user_expressions": {}, "payload": []}
        return self.controller.relay.fail(count, "TaskFailed", failure_text(envelope))

    def spec_from_cell(self, args: Any, body: str) -> TaskSpec:
        if not body.strip():
            raise TaskRefused("the cell has no body to run")
        try:
            code = task_code(body)
        except SyntaxError as err:
            raise TaskRefused(f"the body does not parse: {err.msg} (line {err.lineno})") from None
        plan = self.controller.analyzer.plan(body)
        reads = plan.reads | plan.mutates
        decision = route(plan, "auto", self.controller.ledger.value_types(reads))
        default = decision.sandbox
        options = {
            "sandbox": args.sandbox,
            "timeout": args.timeout,
            "memory": args.memory,
            "cpu": args.cpu,
            "fuel": args.fuel,
            "compute": args.compute,
            "retries": args.retries,
            "backoff": args.backoff,
            "retry_on": args.retry_on,
            "id": args.id,
            "inputs": args.inputs,
            "background": args.background,
            "mount": args.mount,
            "rerun": args.rerun,
        }
        spec = task_spec.build(
            self.controller.policy,
            held=self.controller.held_mounts,
            name=args.name,
            body=body,
            code=code,
            default_kind=default,
            options=options,
        )
        if not spec.inputs_explicit:
            spec = replace(spec, inputs=tuple(sorted(reads)))
        if spec.kind == "wasm" and decision.sandbox != "wasm":
            why = decision.reason.removeprefix("auto: ")
            spec = replace(spec, refusal=f"the Wasm sandbox cannot run this body: {why}")
        return spec

    # -- from inside a cell: the @task API (capsule_kernel.tasks) -------------------------

    async def answer(self, action: str, args: dict[str, Any], caller_kind: str) -> dict[str, Any]:
        """A ``task`` frame from the notebook's sandbox: untrusted, so every field is checked here."""
        handler = {"submit": self._api_submit, "wait": self._api_wait, "cancel": self._api_cancel}.get(action)
        if handler is None:
            return {"status": "error", "error": f"unknown task action {action[:40]!r}"}
        try:
            return await handler(args, caller_kind)
        except TaskRefused as err:
            return {"status": "error", "error": str(err)}

    async def _api_submit(self, args: dict[str, Any], caller_kind: str) -> dict[str, Any]:
        live = sum(1 for run in self._by_key.values() if run.future is not None and not run.future.done())
        if live >= MAX_LIVE_TASKS:
            raise TaskRefused(f"{live} tasks are queued or running: at most {MAX_LIVE_TASKS} at once")
        payload = args.get("payload")
        if not isinstance(payload, str) or not _BASE64.fullmatch(payload):
            raise TaskRefused("the call's payload is not base64")
        options = args.get("options")
        options = options if isinstance(options, dict) else {}
        unknown = sorted(set(options) - set(API_OPTIONS))
        if unknown:
            raise TaskRefused(f"unknown @task option(s): {', '.join(map(str, unknown))[:200]}")
        name = str(args.get("name", ""))
        code = task_spec.call_code(payload)
        if caller_kind == "wasm":
            # The call was pickled in Wasm: it may be unpickled in Wasm only.
            if options.get("sandbox") == "subprocess":
                raise TaskRefused("a @task called from a Wasm cell runs in the Wasm sandbox only")
            default = "wasm"  # called from a Wasm cell
            options = {**options, "sandbox": "wasm"}
        else:
            default = "subprocess"  # @task: the subprocess sandbox unless sandbox= says otherwise
        spec = task_spec.build(
            self.controller.policy,
            name=name,
            body=f"@task {name}: call {hashlib.sha256(payload.encode()).hexdigest()}",
            code=code,
            default_kind=default,
            options={**{k: (str(v) if v is not None else None) for k, v in options.items()}, "background": True},
        )
        spec = replace(spec, bind=False)
        run, _ = await self.submit(spec)
        return {"status": "ok", "key": run.key, "name": run.name}

    def _api_run(self, args: dict[str, Any]) -> TaskRun:
        key = args.get("key")
        run = self._by_key.get(key) if isinstance(key, str) else None
        if run is None:
            run = next((r for r in self.runs.values() if r.key == key), None)
        if run is None:
            raise TaskRefused(f"no task with key {str(key)[:40]!r} in this kernel")
        return run

    async def _api_wait(self, args: dict[str, Any], caller_kind: str) -> dict[str, Any]:  # noqa: ARG002
        run = self._api_run(args)
        timeout = args.get("timeout")
        if run.future is not None and not run.future.done():
            done, _ = await asyncio.wait(
                [run.future], timeout=float(timeout) if isinstance(timeout, int | float) else None
            )
            if not done:
                return {"status": "timeout"}
        outcome = run.outcome
        assert outcome is not None
        answer: dict[str, Any] = {"status": "ok", "envelope": outcome.envelope}
        pickled = self._result_bytes(run)
        if pickled is not None:
            answer["pickle"] = base64.b64encode(pickled).decode("ascii")
            answer["made_in"] = outcome.made_in
        elif outcome.unbindable:
            answer["unbindable"] = outcome.unbindable
        return answer

    async def _api_cancel(self, args: dict[str, Any], caller_kind: str) -> dict[str, Any]:  # noqa: ARG002
        run = self._api_run(args)
        cancelled = False
        if run.future is not None and not run.future.done():
            run.future.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run.future
            cancelled = True
        return {"status": "ok", "cancelled": cancelled}

    # -- submitting -----------------------------------------------------------------------

    def held_bytes(self) -> int:
        return sum(run.held_bytes() for run in self._by_key.values())

    def _result_bytes(self, run: TaskRun) -> bytes | None:
        """A finished run's result bytes: held until saved, then read back from task-results/ when asked."""
        if run.outcome is not None and run.outcome.pickled is not None:
            return run.outcome.pickled
        if run.result_digest is None or self.records is None:
            return None
        try:
            return self.records.load_result(run.result_digest)
        except (OSError, CheckpointRefused) as err:
            self.controller.relay.note(f"Capsule: the result of task {run.name} cannot be read back: {err}\n")
            return None

    def _forget_finished(self) -> None:
        """Keep at most MAX_FINISHED_RUNS finished runs in memory (the oldest go; their records stay)."""
        finished = [key for key, run in self._by_key.items() if run.future is None or run.future.done()]
        for key in finished[: max(0, len(finished) - MAX_FINISHED_RUNS)]:
            run = self._by_key.pop(key)
            if self.runs.get(run.name) is run:
                del self.runs[run.name]

    async def submit(self, spec: TaskSpec) -> tuple[TaskRun, bool]:
        """A run for this spec: (run, cached). A key that already succeeded is answered from its record."""
        held = self.held_bytes()
        if held + len(spec.code) > MAX_HELD_TASK_BYTES:
            raise TaskRefused(
                f"task {spec.name}: its code and arguments ({format_size(len(spec.code))}) would take the tasks "
                f"queued, running or unsaved past the kernel's {format_size(MAX_HELD_TASK_BYTES)} budget (held now: "
                f"{format_size(held)}); wait for some to finish, or pass large data as a file in a mount"
            )
        self._forget_finished()
        entries, digests = await self._inputs(spec)
        key = spec.key(digests, self.scope())
        live = self._by_key.get(key)
        if live is not None and live.future is not None and not live.future.done() and not spec.rerun:
            return live, False  # the same task is running now: it runs once
        parent = dict(self.controller.relay.parent)
        record = self._record(key)
        if record is not None and record.state == "succeeded" and record.envelope and not spec.rerun:
            run = TaskRun(spec, key, entries, parent, state="succeeded")
            envelope = dict(record.envelope)
            envelope["execution"] = {**envelope["execution"], "cached": True}
            made_in = "wasm" if envelope["execution"]["sandbox"] == "wasm" else None
            # The result's bytes stay on disk until they are bound or waited for (_result_bytes).
            run.outcome = task_runner.Outcome(envelope, None, made_in)
            run.result_digest = record.result
            self.runs[spec.name] = run
            self._by_key[key] = run  # a @task handle finds it by its key
            return run, True
        run = TaskRun(spec, key, entries, parent)
        missing = [name for name in spec.inputs if name not in entries] if spec.inputs_explicit else []
        self.runs[spec.name] = run
        self._by_key[key] = run
        previous_attempts = len(record.envelope["execution"]["attempts"]) if record and record.envelope else 0
        if spec.refusal:
            run.future = asyncio.ensure_future(self._refused(run, Failure("refused", spec.refusal)))
        elif missing:
            failure = Failure("input", f"not in the notebook's last checkpoint: {', '.join(missing)}")
            run.future = asyncio.ensure_future(self._refused(run, failure))
        else:
            run.future = asyncio.ensure_future(self._run(run, first_attempt=previous_attempts + 1))
        run.code_bytes = len(spec.code)
        if self._save(run, "queued") and spec.code:
            # Waiting for a slot, its code (a call's arguments) is on disk, in its record, not here.
            run.spec, run.spilled = replace(spec, code=""), True
        return run, False

    async def _inputs(self, spec: TaskSpec) -> tuple[dict[str, Any], dict[str, str]]:
        """The input names' entries in the notebook's last checkpoint, and their digests (for the key)."""
        if not spec.inputs:
            return {}, {}
        await self.controller.checkpoints_settled()
        try:
            latest = self.controller.checkpoints.latest(self.controller.session_name)
        except CheckpointRefused as err:
            raise TaskRefused(str(err)) from None
        if latest is None:
            return {}, {}
        entries = {name: latest.entries[name] for name in spec.inputs if name in latest.entries}
        for entry in list(entries.values()):  # an alias comes with its target
            target = entry.get("alias")
            if target and target in latest.entries:
                entries.setdefault(target, latest.entries[target])
        digests = {name: str(entry.get("digest") or entry.get("module") or "") for name, entry in entries.items()}
        return entries, digests

    async def _refused(self, run: TaskRun, failure: Failure) -> None:
        run.outcome = _never_ran(run, failure)
        self._finished(run)

    async def _run(self, run: TaskRun, first_attempt: int) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(max(1, self.settings.max_parallel))
        foreground = not run.spec.background
        try:
            if foreground:
                await self._run_now(run, first_attempt)
            else:
                async with self._slots:
                    await self._run_now(run, first_attempt)
        finally:
            self._finished(run)

    async def _run_now(self, run: TaskRun, first_attempt: int) -> None:
        run.started = time.monotonic()
        promises = self.controller.durability.promises
        if promises is not None:
            self._promise_runs += 1
            param = {"name": run.name, "sandbox": run.spec.kind, "first_attempt": first_attempt}
            run.promise = promises.task_started(
                self.controller.session_name, run.key, self._promise_runs, run.name, param
            )

        def on_state(state: str, attempt: int, retry_in: float | None) -> None:
            run.state, run.attempt, run.retry_in = state, attempt, retry_in
            self._save(run, state)
            self._show_status(run)

        spec = run.spec
        if run.spilled:
            record = self._record(run.key)
            code = record.spec.get("code") if record is not None else None
            if not isinstance(code, str) or not code:
                unreadable = Failure("refused", "its code could not be read back from its task record")
                run.outcome = _never_ran(run, unreadable)
                return  # _run's finally records it as failed
            spec = replace(spec, code=code)  # in memory while it runs (counted in the budget throughout)
        run.outcome = await task_runner.run(
            spec,
            task_id=run.key,
            inputs=run.inputs,
            take_sandbox=self.pool.take,
            sink=lambda event: self._on_output(run, event),
            on_state=on_state,
            first_attempt=first_attempt,
        )

    def _finished(self, run: TaskRun) -> None:
        if run.outcome is None:  # cancelled before it started
            run.outcome = _never_ran(run, Failure("cancelled", "the task was cancelled before it started"))
        envelope = run.outcome.envelope
        error = envelope["error"]
        state = "succeeded" if error is None else ("cancelled" if error["type"] == "cancelled" else "failed")
        run.state = state
        digest = None
        if envelope["success"] and run.outcome and run.outcome.pickled is not None and self.records is not None:
            with contextlib.suppress(OSError):
                digest = self.records.save_result(run.outcome.pickled)
        self._save(run, state, envelope=envelope, result=digest)
        # Its code (a call's arguments) and its result's bytes, once on disk, leave the kernel's memory.
        run.spec, run.code_bytes = replace(run.spec, code=""), 0
        if digest is not None and run.outcome is not None:
            run.result_digest, run.outcome.pickled = digest, None
        promises = self.controller.durability.promises
        if promises is not None and run.promise is not None:
            promises.task_settled(run.promise, envelope)
        if run.spec.background and run.spec.bind:
            self._show_status(run, final=True)
            self._to_bind.append(run)
            if not self.controller.cell_running:
                self.controller.side_task(self.bind_pending(), cell_scoped=False)

    # -- records ----------------------------------------------------------------------------

    def scope(self) -> str:
        """The view a task's record belongs to: a record answers (or is replaced) only within it."""
        controller = self.controller
        view = {
            "notebook": controller.notebook,
            "session": controller.session_name,
            "cwd": os.getcwd(),
            "mounts": controller.mounts,
            "fs_access": controller.policy.settings.fs_access,
            "ceiling": controller.policy.ceiling.to_json(),
        }
        return hashlib.sha256(json.dumps(view, sort_keys=True, default=str).encode()).hexdigest()

    def _record(self, key: str) -> TaskRecord | None:
        if self.records is None:
            return None
        try:
            return self.records.get(key)
        except CheckpointRefused as err:
            self.controller.relay.note(f"Capsule: {err}\n")
            return None

    def _save(self, run: TaskRun, state: str, **extra: Any) -> bool:
        """Write the run's record (a spilled run's spec, code included, stays as stored); True if written."""
        if self.records is None:
            return False
        try:
            self.records.put(
                run.key,
                session=self.controller.session_name,
                name=run.name,
                state=state,
                kernel=self.controller.kernel_id,
                spec=None if run.spilled else run.spec.to_json(),
                **extra,
            )
        except Exception as err:  # noqa: BLE001 - bookkeeping must never cost the task
            self.controller.log.warning("task record %s not written: %s", run.name, err)
            return False
        return True

    # -- binding results into the notebook ---------------------------------------------

    async def bind_pending(self) -> None:
        """Bind the results of background tasks that ended (between cells: the controller calls this)."""
        if self._bind_lock is None:
            self._bind_lock = asyncio.Lock()
        async with self._bind_lock:
            while self._to_bind:
                await self._bind_now(self._to_bind.pop(0))

    async def _bind_now(self, run: TaskRun) -> None:
        """NAME = the task's value in the notebook's sandbox; its envelope for capsule_kernel.tasks.envelope()."""
        outcome = run.outcome
        if outcome is None or run.bound:
            return
        run.bound = True
        envelope = outcome.envelope
        args: dict[str, Any] = {"name": run.name, "envelope": envelope}
        if envelope["success"]:
            pickled = self._result_bytes(run)
            if pickled is not None:
                args["pickle"] = base64.b64encode(pickled).decode("ascii")
                args["made_in"] = outcome.made_in
            elif envelope["execution"].get("result_json"):
                args["json"] = True
        for sandbox in await self._notebook_sandboxes():
            try:
                answer = await sandbox.request("bind", args, timeout=120)
            except (SandboxDied, TimeoutError) as err:
                answer = {"status": "error", "evalue": f"the notebook's sandbox did not take it ({err})"}
            if envelope["success"] and answer.get("status") != "ok":
                why = answer.get("evalue") or outcome.unbindable or "it could not be loaded"
                where = f" in the {sandbox.kind} sandbox" if self.controller.routing_mode == "auto" else ""
                self.controller.relay.note(
                    f"Capsule: the result of task {run.name} was not bound to {run.name}{where}: {why}\n"
                )

    async def _notebook_sandboxes(self) -> list[SandboxProcess]:
        """Where the notebook's next cells run: the routing mode's sandbox, or in auto mode every one running."""
        controller = self.controller
        mode = controller.routing_mode
        if mode in ("subprocess", "wasm"):
            try:
                return [await controller.sandbox_of(mode)]
            except (SandboxDied, TimeoutError):
                return []
        running = [s for s in controller.sandboxes.values() if s.ready]
        return running or [await controller.ready_sandbox()]

    # -- showing ------------------------------------------------------------------------------

    def _on_output(self, run: TaskRun, event: dict[str, Any]) -> None:
        """Output of a task's code: live in the cell for a foreground task; into its display in the background."""
        relay = self.controller.relay
        if not run.spec.background:
            relay.on_event_for(event, run.parent)
            return
        if event.get("type") == "stream":
            run.output = _terminal_tail(run.output + event["text"])
            self._show_status(run)

    def _show_status(self, run: TaskRun, *, first: bool = False, final: bool = False) -> None:
        if run.display_id is None:
            return
        now = time.monotonic()
        if not (first or final) and now - run.last_shown < STATUS_MIME_THROTTLE_SECONDS:
            return
        run.last_shown = now
        if final and run.envelope is not None:
            data = task_envelope.bundle(run.envelope)
            if run.output:
                data["text/plain"] = run.output.rstrip("\n") + "\n" + data["text/plain"]
        else:
            line = self._status_line(run)
            data = {"text/plain": (run.output.rstrip("\n") + "\n" if run.output else "") + line}
        msg_type = "display_data" if first else "update_display_data"
        content = {"data": data, "metadata": {}, "transient": {"display_id": run.display_id}}
        self.controller.relay.publish_for(msg_type, content, run.parent)

    @staticmethod
    def _status_line(run: TaskRun) -> str:
        elapsed = time.monotonic() - (run.started or run.submitted)
        state = run.state
        if state == "retrying" and run.retry_in is not None:
            state = f"retrying in {run.retry_in:.1f} s"
        attempt = f", attempt {run.attempt}" if run.attempt else ""
        return f"task {run.name}: {state}, {elapsed:.1f} s{attempt}"

    # -- %capsule tasks / task wait / task cancel ---------------------------------------------

    def table(self) -> tuple[list[str], list[list[str]]]:
        headers = ["name", "id", "state", "attempts", "duration", "sandbox", "fuel", "peak memory"]
        rows: dict[str, list[str]] = {}
        records = self.records.of_session(self.controller.session_name) if self.records else []
        for record in records:
            envelope = record.envelope or {}
            rows[record.key] = _row(record.name, record.key, record.shown_state(self.controller.kernel_id),
                                    envelope.get("execution"), record.spec.get("kind", ""))  # fmt: skip
        for run in self._by_key.values():
            if run.future is not None and not run.future.done():
                rows[run.key] = _row(run.name, run.key, run.state, None, run.spec.kind, run.attempt)
            elif run.key not in rows and run.envelope is not None:  # answered from another session's record
                execution = run.envelope["execution"]
                state = "succeeded (cached)" if execution.get("cached") else run.state
                rows[run.key] = _row(run.name, run.key, state, execution, run.spec.kind)
        return headers, list(rows.values())

    def interrupted(self) -> list[TaskRecord]:
        """Tasks of this session that a kernel now gone left unfinished."""
        if self.records is None:
            return []
        kernel = self.controller.kernel_id
        records = self.records.of_session(self.controller.session_name)
        return [record for record in records if record.shown_state(kernel) == "interrupted"]

    async def rerun_interrupted(self) -> list[str]:
        """Run interrupted tasks again, in the background, as new attempts (after %capsule resume)."""
        names = []
        for record in self.interrupted():
            spec = replace(TaskSpec.from_json(record.spec), background=True, rerun=True, record_key=record.key)
            run, _ = await self.submit(spec)
            run.display_id = f"capsule-task-{run.key[:12]}-{int(time.time() * 1000)}"
            self._show_status(run, first=True)
            names.append(record.name)
        return names

    async def wait(self, names: list[str]) -> list[dict[str, Any]]:
        runs = [self.runs[n] for n in names if n in self.runs] if names else list(self.runs.values())
        unknown = [n for n in names if n not in self.runs]
        if unknown:
            raise TaskRefused(f"no task named {', '.join(unknown)} in this kernel")
        pending = [run.future for run in runs if run.future is not None and not run.future.done()]
        if pending:
            await asyncio.wait(pending)
        await self.bind_pending()
        return [run.envelope for run in runs if run.envelope is not None]

    async def cancel(self, name: str) -> bool:
        run = self.runs.get(name)
        if run is None:
            raise TaskRefused(f"no task named {name} in this kernel")
        if run.future is None or run.future.done():
            return False
        run.future.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run.future
        return True

    def interrupt(self) -> bool:
        """The stop button during a foreground task cancels the task."""
        run = self.foreground
        if run is None or run.future is None or run.future.done():
            return False
        run.future.cancel()
        return True

    async def close(self) -> None:
        for run in list(self._by_key.values()):
            if run.future is not None and not run.future.done():
                run.future.cancel()
        await self.pool.close()
        if self.records is not None:
            self.records.close()


def _row(name: str, key: str, state: str, execution: dict[str, Any] | None, kind: str, attempt: int = 0) -> list[str]:
    execution = execution or {}
    attempts = len(execution.get("attempts", [])) or attempt
    duration = f"{execution['duration_ms']} ms" if "duration_ms" in execution else ""
    fuel = execution.get("fuel_consumed")
    peak = execution.get("peak_memory_bytes")
    return [
        name,
        key[:12],
        state,
        str(attempts or ""),
        duration,
        execution.get("sandbox", kind),
        f"{fuel:,}" if isinstance(fuel, int) else "",
        format_size(peak) if isinstance(peak, int) else "",
    ]


def _terminal_tail(text: str) -> str:
    """What a terminal would show of this output: a carriage return rewrites its line (tqdm), the tail kept."""
    lines = []
    for line in text.split("\n"):
        lines.append(line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r"))
    return "\n".join(lines)[-_OUTPUT_TAIL_CHARS:]
