"""One task, run to its end: attempts in fresh sandboxes, retries with backoff, one envelope.

Runs in the KERNEL. Each attempt takes a sandbox of its own from the pool
(never the notebook's), copies the task's inputs in through the checkpoint
machinery (the kernel hands chunk names over; the task's sandbox unpickles),
runs the body, then asks the sandbox for the body's value: its JSON for the
envelope and its pickled bytes, which the kernel carries as opaque data.
The kind of a failure is read on the trusted side (the reply's stop
exception, or the kernel's account of the sandbox's death), so a task cannot
make a crash look like a success or earn retries it was not given.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from capsule_kernel.kernel.sandbox.process import SandboxDied, SandboxProcess
from capsule_kernel.kernel.tasks import envelope as task_envelope
from capsule_kernel.kernel.tasks.envelope import Attempt, Failure
from capsule_kernel.kernel.tasks.spec import RESULT_MIME, RETURN_CLASS, TaskSpec, emit_code

# The largest pickled result a task may hand back (it crosses in one display frame).
MAX_RESULT_BYTES = 64 * 1024 * 1024
_NOT_RETRIED = ("cancelled", "refused", "input")

Sink = Callable[[dict[str, Any]], None]
StateHook = Callable[[str, int, float | None], None]

# A task's envelope lists at most this many of its requests through the allowed-hosts proxy (each
# one is audited in network.sqlite all the same); the last entry then says some were left out.
MAX_HOST_REQUESTS = 100
HOST_REQUEST_FIELDS = ("method", "host", "port", "allowed", "reason", "address", "sent", "received")


@dataclass
class Outcome:
    """What a task ended with: its envelope and, on success, its value's bytes (if it could be pickled)."""

    envelope: dict[str, Any]
    pickled: bytes | None = None
    made_in: str | None = None
    unbindable: str | None = None  # why the value cannot be bound, when it cannot


@dataclass
class _Collector:
    """The events of one attempt's sandbox: output goes to the sink, the result is kept."""

    sink: Sink
    host_requests: list[dict[str, Any]] = field(default_factory=list)  # shared by a task's attempts
    result: dict[str, Any] | None = None
    expecting_result: bool = False
    closed: bool = False  # the attempt is over: what its sandbox says while it is torn down is not shown

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if self.closed:
            return
        if kind == "display" and RESULT_MIME in event.get("data", {}):
            if self.expecting_result and self.result is None and isinstance(event["data"][RESULT_MIME], dict):
                self.result = event["data"][RESULT_MIME]
            return  # never shown; and outside the emit step, a forgery, dropped
        if kind == "error":
            return  # a top-level `return` is a success; a real error is in the envelope, with its traceback
        if kind == "network":
            # Its proxy's decision (the kernel's own; audited by the pool): listed in the envelope.
            if len(self.host_requests) < MAX_HOST_REQUESTS:
                self.host_requests.append({name: event.get(name) for name in HOST_REQUEST_FIELDS})
            else:
                self.host_requests[-1] = {"omitted": True, "reason": f"more than {MAX_HOST_REQUESTS} requests"}
            return
        if kind in ("snapshot", "snapshot_failed", "comm", "input_request", "magic"):
            return  # a task has no checkpoints, widgets, stdin or %capsule
        self.sink(event)


async def run(
    spec: TaskSpec,
    *,
    task_id: str,
    inputs: dict[str, Any],
    take_sandbox: Callable[[TaskSpec, Sink], Awaitable[SandboxProcess]],
    sink: Sink,
    on_state: StateHook,
    first_attempt: int = 1,
) -> Outcome:
    """Every attempt the spec allows; returns the task's outcome (cancellation gives a cancelled one)."""
    started = time.time()
    clock = time.monotonic()
    attempts: list[Attempt] = []
    fuel_total: int | None = None
    peak: int | None = None
    failure: Failure | None = None
    result: dict[str, Any] | None = None
    host_requests: list[dict[str, Any]] = []
    n = first_attempt
    while True:
        attempt = Attempt(n, time.monotonic())
        attempts.append(attempt)
        on_state("running", n, None)
        collector = _Collector(sink, host_requests)
        sandbox: SandboxProcess | None = None
        try:
            sandbox = await take_sandbox(spec, collector)
            failure, result = await _attempt(spec, sandbox, collector, inputs)
        except asyncio.CancelledError:
            failure = Failure("cancelled", "the task was cancelled (%capsule task cancel, or its handle's cancel())")
            cancelled = True
        except SandboxDied as death:
            failure, cancelled = Failure("crash", f"the task's sandbox could not start: {death.reason}"), False
        else:
            cancelled = False
        finally:
            collector.closed = True
            if sandbox is not None:
                fuel = getattr(sandbox, "last_fuel", None)
                if isinstance(fuel, int):
                    fuel_total = (fuel_total or 0) + fuel
                with contextlib.suppress(Exception):
                    reading = sandbox.peak_memory()
                    if reading is not None:
                        peak = max(peak or 0, reading)
                _dispose(sandbox)
        attempt.duration_ms = int((time.monotonic() - attempt.started) * 1000)
        attempt.error_type = failure.type if failure else None
        if cancelled:  # the envelope says so; the cancellation ends here
            break
        if failure is None or failure.type in _NOT_RETRIED or failure.type not in spec.retry_on:
            break
        if n - first_attempt >= spec.retries:
            break
        delay = min(spec.backoff_max, spec.backoff * 2 ** (n - first_attempt)) * random.uniform(0.5, 1.0)
        on_state("retrying", n, delay)
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            failure = Failure("cancelled", "the task was cancelled while it waited to retry")
            break
        n += 1
    envelope = task_envelope.build(
        name=spec.name,
        task_id=task_id,
        sandbox=spec.kind,
        attempts=attempts,
        started_at=started,
        duration_ms=int((time.monotonic() - clock) * 1000),
        result=result,
        failure=failure,
        fuel=fuel_total,
        peak_memory=peak,
        host_requests=host_requests,
    )
    outcome = Outcome(envelope, made_in="wasm" if spec.kind == "wasm" else None)
    if failure is None and result is not None:
        outcome.pickled, outcome.unbindable = _pickled(result)
    return outcome


async def _attempt(
    spec: TaskSpec, sandbox: SandboxProcess, collector: _Collector, inputs: dict[str, Any]
) -> tuple[Failure | None, dict[str, Any] | None]:
    if inputs:
        try:
            copied = await sandbox.restore(inputs, replace=False, timeout=300)
        except (SandboxDied, TimeoutError) as err:
            return Failure("input", f"the inputs could not be copied in: {err}"), None
        failed = copied.get("failed") or {}
        if failed:
            named = "; ".join(f"{name}: {why}" for name, why in sorted(failed.items()))
            return Failure("input", f"input(s) could not be copied into the task's sandbox: {named}"), None
    try:
        reply = await sandbox.execute(cell_request(spec.code, 1))
    except SandboxDied as death:
        return task_envelope.failure_from_death(death, spec.kind), None
    if reply.get("status") != "ok" and reply.get("ename") != RETURN_CLASS:
        return task_envelope.failure_from_reply(reply), None
    collector.expecting_result = True
    try:
        await sandbox.execute(cell_request(emit_code(spec.name, task_envelope.JSON_RESULT_LIMIT), 2))
    except SandboxDied as death:
        return task_envelope.failure_from_death(death, spec.kind), None
    if collector.result is None:
        return Failure("crash", "the task's sandbox did not report the task's value"), None
    return None, collector.result


# Sandboxes being torn down after their task: off the task's critical path, never garbage-collected early.
_DISPOSING: set[asyncio.Task] = set()


def _dispose(sandbox: SandboxProcess) -> None:
    """A task's sandbox is used once: stop it in the background (its envelope does not wait for that)."""
    sandbox.stopping = True

    async def stop() -> None:
        with contextlib.suppress(Exception):
            await sandbox.shutdown(grace=0.5)

    task = asyncio.ensure_future(stop())
    _DISPOSING.add(task)
    task.add_done_callback(_DISPOSING.discard)


def cell_request(code: str, count: int) -> dict[str, Any]:
    """An execute request for a task's sandbox: silent (no checkpoint, no history), no stdin."""
    return {
        "code": code,
        "silent": True,
        "store_history": False,
        "user_expressions": {},
        "allow_stdin": False,
        "execution_count": count,
    }


def _pickled(result: dict[str, Any]) -> tuple[bytes | None, str | None]:
    """The value's bytes as its sandbox pickled them (never unpickled here), or why there are none."""
    encoded = result.get("pickle")
    if not isinstance(encoded, str):
        return None, str(result.get("unpicklable") or "its sandbox could not pickle it")
    if len(encoded) > MAX_RESULT_BYTES * 4 // 3 + 4:
        return None, f"its pickle is larger than {MAX_RESULT_BYTES // 2**20} MiB"
    try:
        return base64.b64decode(encoded, validate=True), None
    except (binascii.Error, ValueError):
        return None, "its sandbox sent bytes that are not base64"
