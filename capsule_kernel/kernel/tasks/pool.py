"""Fresh sandboxes for tasks, a few started ahead ([tasks] warm per kind in use); each is used once."""

from __future__ import annotations

import contextlib
from collections import deque
from typing import TYPE_CHECKING, Any

from capsule_kernel.kernel.sandbox.kinds import SANDBOX_KINDS
from capsule_kernel.kernel.sandbox.process import SandboxDied, SandboxProcess
from capsule_kernel.kernel.tasks import runner as task_runner
from capsule_kernel.kernel.tasks.runs import (
    LAUNCH_LIMITS,
    TaskOwner,
)
from capsule_kernel.kernel.tasks.spec import PRELUDE, TaskSpec

if TYPE_CHECKING:
    pass


class _Events:
    """A sandbox's event handler whose target is set when a task takes the sandbox.

    The proxy's decisions (network = [hosts]) are audited here, under the
    session and the task's name, before the task's collector lists them in
    its envelope: a warm sandbox's events have nobody else to tell.
    """

    def __init__(self, controller: TaskOwner) -> None:
        self.controller = controller
        self.target: Any = None
        self.task_name = ""

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("type") == "network":
            audit = self.controller.network_audit
            if audit is not None:
                audit.add(self.controller.session_name, {**event, "task": self.task_name or "(warm)"})
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
        launch = tuple(getattr(spec.limits, name) for name in LAUNCH_LIMITS)
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
            events = _Events(self.controller)
            sandbox = await self._start(spec, events)
        self._refill(spec)
        events.task_name = spec.name
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
            events = _Events(self.controller)
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
        given = spec.options.get("allowed_hosts")
        sandbox.network_source = (
            "the task's allowed hosts" if given else controller.policy.limits.sources.get("network", "default")
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
