"""The life of one cell: magic, task or code; planned, routed, run in its sandbox, retried, reported.

A part of SessionController (a mixin over its state). The walk goes down:
plan (analyzer) -> route (router) -> names brought in (names.py) -> the sandbox
client -> the checkpoint recorded (durability.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from capsule_kernel.kernel import magics
from capsule_kernel.kernel.analyzer import ExecutionPlan
from capsule_kernel.kernel.router import REFUSED, route
from capsule_kernel.kernel.sandbox import crash_dump
from capsule_kernel.kernel.sandbox.process import PreviousCellOverran, SandboxDied, SandboxProcess
from capsule_kernel.kernel.sandbox.wasm import WasmSandbox
from capsule_kernel.kernel.session.relay import sanitized_reply
from capsule_kernel.protocol.peeks import EVERY_NAME


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
    # Candidates the cell only peeked at (len(x), x.shape): the worker may skip them.
    snapshot_peeks: tuple[str, ...] = ()
    # The cell as typed, when `code` was transformed for a sandbox without IPython.
    raw_code: str | None = None
    # The execute_request's header: the sandbox's get_parent() (relay.header_for_sandbox).
    parent_header: dict[str, str] = field(default_factory=dict)


class CellLifecycle:
    """execute(): a %%capsule task cell, a %capsule cell, or code run where the router sends it."""

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
        if plan.opaque:
            names |= {EVERY_NAME}  # the worker's names_reached: any name may have changed
        cell = replace(cell, snapshot_candidates=tuple(sorted(names)), snapshot_peeks=tuple(sorted(plan.peeks & names)))
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
