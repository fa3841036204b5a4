"""The session's task runs: TaskRun (one task from submission to its envelope), the bounds on them, and TaskOwner.

TaskOwner is what the tasks ask of the session (SessionController implements it), named
here so nothing in tasks/ imports the controller that imports it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from capsule_kernel.kernel.sandbox.process import SandboxProcess
from capsule_kernel.kernel.tasks import envelope as task_envelope
from capsule_kernel.kernel.tasks import runner as task_runner
from capsule_kernel.kernel.tasks.envelope import Failure
from capsule_kernel.kernel.tasks.spec import TaskSpec

if TYPE_CHECKING:
    import logging

    from capsule_kernel.kernel.analyzer import Analyzer
    from capsule_kernel.kernel.checkpoint.network_audit import NetworkAudit
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
    network_audit: NetworkAudit | None
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
OUTPUT_TAIL_CHARS = 4000

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
API_OPTIONS = (
    "sandbox", "timeout", "memory", "cpu", "fuel", "compute", "retries", "backoff", "retry_on", "id", "allowed_hosts",
)  # fmt: skip

BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")

# The limits a sandbox is launched with (the others are set per cell).
LAUNCH_LIMITS = ("memory", "disk", "network", "files", "procs")


def never_ran(run: TaskRun, failure: Failure) -> task_runner.Outcome:
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
