"""The narrow interface %capsule commands use: what they may read and ask of a session.

SessionController implements it; commands never reach the kernel class, its
sockets or its sandboxes' internals beyond what is named here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from capsule_kernel.kernel.checkpoint.network_audit import NetworkAudit
    from capsule_kernel.kernel.checkpoint.recorder import Checkpoints
    from capsule_kernel.kernel.limit_settings import LimitSettings
    from capsule_kernel.kernel.policy import Policy
    from capsule_kernel.kernel.sandbox.held_mounts import HeldMounts
    from capsule_kernel.kernel.sandbox.process import SandboxProcess
    from capsule_kernel.kernel.settings import KernelSettings


class TaskBoard(Protocol):
    """The session's tasks as commands and the relay use them (tasks/scheduler.py's TaskScheduler)."""

    def table(self) -> tuple[list[str], list[list[str]]]: ...
    async def rerun_interrupted(self) -> list[str]: ...
    async def wait(self, names: list[str]) -> list[dict[str, Any]]: ...
    async def cancel(self, name: str) -> bool: ...
    async def answer(self, action: str, args: dict[str, Any], caller_kind: str) -> dict[str, Any]: ...


class MagicContext(Protocol):
    policy: Policy
    checkpoints: Checkpoints
    sandboxes: dict[str, SandboxProcess]
    routing_mode: str
    active_kind: str
    mounts: list[dict[str, Any]]
    held_mounts: HeldMounts
    session_name: str
    notebook: str  # this kernel's notebook identity (the frontend's or operator's, never a cell's)
    session_source: str
    cell_running: bool
    tasks: TaskBoard
    last_crash: str | None
    network_audit: NetworkAudit | None

    @property
    def limit_settings(self) -> LimitSettings: ...
    @property
    def settings(self) -> KernelSettings: ...
    @property
    def promises(self) -> Any: ...
    @property
    def execution_count(self) -> int: ...
    @property
    def sandbox(self) -> SandboxProcess | None: ...

    async def sandbox_started(self) -> None: ...
    async def ready_sandbox(self) -> SandboxProcess: ...
    async def checkpoints_settled(self, timeout: float = 60.0) -> None: ...
    async def resume(self, checkpoint: Any, sandbox: SandboxProcess | None = None) -> str: ...
    async def adopt_orphans(self, *, wait: bool) -> None: ...
    async def lost_cells(self, checkpoint: Any) -> list[dict[str, Any]]: ...
    async def namespace_replaced(self, checkpoint: Any | None) -> None: ...
    async def switch_session(self, name: str, source: str) -> None: ...
    async def restart_sandbox(self, why: str) -> SandboxProcess: ...
    async def replace_sandbox(self, kind: str) -> None: ...
