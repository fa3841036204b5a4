"""The @task API from inside a cell (capsule_kernel.tasks): a "task" frame's action, checked on the trusted side.

A part of TaskScheduler (a mixin over its state). Everything in the frame is
the sandbox's: the action is looked up in a table, the options are limited to
API_OPTIONS and checked against the operator's ceilings, the code must be base64.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from capsule_kernel.kernel.tasks import spec as task_spec
from capsule_kernel.kernel.tasks.runs import (
    API_OPTIONS,
    BASE64,
    MAX_LIVE_TASKS,
    TaskRun,
)
from capsule_kernel.kernel.tasks.spec import TaskRefused

if TYPE_CHECKING:
    pass


class TaskApi:
    """answer(): the cell's task frame, by action, from a table."""

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
        if not isinstance(payload, str) or not BASE64.fullmatch(payload):
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
