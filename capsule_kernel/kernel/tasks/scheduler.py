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

This module is the queue and the runs' course; its parts, each one job:
runs.py (TaskRun, the bounds, TaskOwner), pool.py (the warm sandboxes),
api.py (the @task frame's actions), book.py (task records, scoped to the
notebook), display.py (live status and the %capsule tasks table).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from capsule_kernel.kernel.checkpoint.home import default_home
from capsule_kernel.kernel.checkpoint.rows import CheckpointRefused
from capsule_kernel.kernel.checkpoint.task_records import TaskRecords
from capsule_kernel.kernel.router import route
from capsule_kernel.kernel.sandbox.process import SandboxDied, SandboxProcess
from capsule_kernel.kernel.tasks import envelope as task_envelope
from capsule_kernel.kernel.tasks import runner as task_runner
from capsule_kernel.kernel.tasks import spec as task_spec
from capsule_kernel.kernel.tasks.api import TaskApi
from capsule_kernel.kernel.tasks.book import TaskBook
from capsule_kernel.kernel.tasks.display import TaskDisplay
from capsule_kernel.kernel.tasks.envelope import Failure
from capsule_kernel.kernel.tasks.pool import TaskPool
from capsule_kernel.kernel.tasks.runs import (
    MAX_FINISHED_RUNS,
    MAX_HELD_TASK_BYTES,
    TaskOwner,
    TaskRun,
    failure_text,
    never_ran,
)
from capsule_kernel.kernel.tasks.spec import TaskRefused, TaskSpec, task_code
from capsule_kernel.protocol.limits import format_size

if TYPE_CHECKING:
    pass


class TaskScheduler(TaskApi, TaskBook, TaskDisplay):
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
            "allowed_hosts": args.allowed_hosts,
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

    # -- submitting -----------------------------------------------------------------------

    def held_bytes(self) -> int:
        return sum(run.held_bytes() for run in self._by_key.values())

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
        run.outcome = never_ran(run, failure)
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
                run.outcome = never_ran(run, unreadable)
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
            run.outcome = never_ran(run, Failure("cancelled", "the task was cancelled before it started"))
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

    # -- %capsule tasks / task wait / task cancel ---------------------------------------------

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
