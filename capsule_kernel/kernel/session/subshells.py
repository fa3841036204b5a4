"""Kernel subshells (JEP 91), the kernel's side: concurrent cells beside the main shell's.

ipykernel's kernelbase already creates, lists and deletes subshells and runs
each one's requests on a thread and loop of its own; the kernel class hops
each such request over to the controller's loop, and this module does the
rest there:

- each frontend subshell id stands for a small number the kernel picks (the
  sandbox never learns anything it could confuse with another subshell);
- a subshell's cells, comm messages and completion requests go to the
  subprocess sandbox's thread for that number (sandbox/worker_subshells.py),
  where they run in the notebook's one namespace while the main shell's cell
  runs;
- outputs tagged with that number are published under the request the
  subshell is serving; a number the kernel never gave that sandbox is a
  protocol violation (SandboxProcess._dispatch);
- each subshell counts its own cells from 1, as the JEP says, and its cells
  are not checkpointed on their own: the main shell's next checkpoint holds
  what they changed (the names they touched are added to what it looks at).

Subshells need IPython and threads, so they run in the subprocess sandbox
only; under the Wasm mode a subshell's cell is refused with a clear error.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import TYPE_CHECKING, Any, Protocol

from capsule_kernel.kernel.sandbox.process import SandboxDied, SandboxProcess
from capsule_kernel.kernel.session.relay import Relay, header_for_sandbox, sanitized_reply

if TYPE_CHECKING:
    import logging

    from capsule_kernel.kernel.analyzer import ExecutionPlan


class SubshellOwner(Protocol):
    """What subshells ask of the session that owns them (SessionController implements it)."""

    relay: Relay
    sandboxes: dict[str, SandboxProcess]
    log: logging.Logger

    def plan_cell(self, code: str) -> ExecutionPlan: ...


class SubshellUnavailable(Exception):
    """No sandbox can run a subshell's work now (the Wasm mode, a kernel shutting down)."""


class Subshells:
    """Which number stands for which subshell, what each is serving, and its cells."""

    def __init__(self, controller: SubshellOwner) -> None:
        self.controller = controller
        self._numbers = itertools.count(1)
        self.tags: dict[str, int] = {}
        self.parents: dict[int, dict[str, Any]] = {}  # tag -> the request whose outputs it makes now
        self.counts: dict[int, int] = {}  # tag -> its last execution count
        self.running: set[int] = set()
        # Names the subshells' cells read, wrote or changed in place: the main shell's next checkpoint
        # looks at them (a large value changed in place is otherwise taken as unchanged).
        self.touched: set[str] = set()

    def tag(self, subshell_id: str) -> int:
        if subshell_id not in self.tags:
            self.tags[subshell_id] = next(self._numbers)
        return self.tags[subshell_id]

    def parent_of(self, tag: int) -> dict[str, Any]:
        return self.parents.get(tag, {})

    def next_count(self, subshell_id: str) -> int:
        """The count the subshell's next cell will get (execute_input shows it before the cell runs)."""
        return self.counts.get(self.tags.get(subshell_id, -1), 0) + 1

    def count_of(self, tag: int) -> int:
        return self.counts.get(tag, 0)

    # -- life ----------------------------------------------------------------------------

    async def created(self, subshell_id: str) -> None:
        """A frontend created a subshell: its thread starts in the sandbox now (as ipykernel's does)."""
        tag = self.tag(subshell_id)
        with contextlib.suppress(SubshellUnavailable, SandboxDied, TimeoutError):
            sandbox = await self._sandbox()
            sandbox.open_subshell(tag, subshell_id)

    async def deleted(self, subshell_id: str) -> None:
        """A subshell was deleted: a cell it runs is interrupted, and its thread ends."""
        tag = self.tags.pop(subshell_id, None)
        if tag is None:
            return
        for sandbox in self.controller.sandboxes.values():
            sandbox.close_subshell(tag)
        self.parents.pop(tag, None)

    def interrupt(self) -> None:
        """The kernel's interrupt stops the subshells' running cells too (JEP 91: interrupts are per kernel)."""
        sandbox = self.controller.sandboxes.get("subprocess")
        if sandbox is not None and self.running:
            sandbox.interrupt_subshells()

    # -- requests ------------------------------------------------------------------------

    async def execute(self, subshell_id: str, parent: dict[str, Any], code: str, silent: bool,
                      user_expressions: dict[str, str]) -> dict[str, Any]:  # fmt: skip
        """Run a subshell's cell; its reply, with the subshell's own execution count."""
        tag = self.tag(subshell_id)
        plan = self.controller.plan_cell(code)
        self.touched |= plan.reads | plan.mutates | plan.writes
        count = self.counts.get(tag, 0) + (0 if silent else 1)
        self.counts[tag] = count
        self.parents[tag] = parent
        try:
            sandbox = await self._sandbox()
        except (SubshellUnavailable, SandboxDied, TimeoutError) as err:
            return self.controller.relay.fail(count, "SubshellUnavailable", str(err), parent)
        limits = sandbox.limits
        bounds = [limit for limit in (limits.timeout, limits.cpu) if limit]
        request = {
            "code": code,
            "silent": silent,
            "user_expressions": user_expressions,
            "parent_header": header_for_sandbox(parent),
        }
        self.running.add(tag)
        try:
            reply = await sandbox.subshell_execute(tag, request, min(bounds) if bounds else None)
        except SandboxDied as death:
            what = "CellTimeout" if death.timed_out else "SandboxDied"
            reason = sandbox.death_reason or death.reason
            return self.controller.relay.fail(
                count, what, f"the sandbox process (pid {sandbox.pid}) {reason}. "
                "The main shell's next cell starts a fresh sandbox with the last checkpoint.", parent,
            )  # fmt: skip
        finally:
            self.running.discard(tag)
        return sanitized_reply(reply, count)  # its outputs were published as they came (relay.on_event)

    async def forward_comm(self, subshell_id: str, msg: dict[str, Any]) -> None:
        """A comm message the frontend sent on a subshell: handled on that subshell's thread at once."""
        tag = self.tag(subshell_id)
        self.parents[tag] = msg
        try:
            sandbox = await self._sandbox()
        except (SubshellUnavailable, SandboxDied, TimeoutError):
            await self.controller.relay.forward_comm(msg)  # refused there, as the main shell refuses it
            return
        sandbox.open_subshell(tag, subshell_id)
        await self.controller.relay.forward_comm(msg, sandbox=sandbox, subshell=tag)

    async def ask(self, subshell_id: str, kind: str, args: dict[str, Any], fallback: dict[str, Any],
                  timeout: float) -> dict[str, Any]:  # fmt: skip
        """Completion, inspection or history on a subshell: answered at once, even while a cell runs."""
        try:
            sandbox = await self._sandbox()
            return await sandbox.request(kind, args, timeout=timeout, subshell=self.tag(subshell_id))
        except (SubshellUnavailable, SandboxDied, TimeoutError) as err:
            self.controller.log.warning("%s request on a subshell failed: %s", kind, err)
            return fallback

    # -- helpers -------------------------------------------------------------------------

    async def _sandbox(self) -> SandboxProcess:
        """The subprocess sandbox, which holds the namespace subshells share."""
        controller = self.controller
        if controller.closing:
            raise SubshellUnavailable("the kernel is shutting down")
        if controller.routing_mode == "wasm":
            raise SubshellUnavailable(
                "subshells run in the subprocess sandbox (they need threads and IPython), and this notebook's "
                "cells run in the Wasm sandbox (%capsule mode wasm); run this on the notebook's main shell"
            )
        sandbox = controller.sandboxes.get("subprocess")
        if sandbox is not None and sandbox.ready:
            return sandbox
        if controller.active_kind == "subprocess":
            return await controller.ready_sandbox()
        raise SubshellUnavailable("the subprocess sandbox is not running; run a cell on the notebook's main shell")
