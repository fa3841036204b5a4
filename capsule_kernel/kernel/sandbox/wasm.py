"""The Wasm sandbox, seen from the kernel: a host process running wasmtime.

Runs in the KERNEL. A sibling of the subprocess sandbox over
``SandboxProcess`` (``process.py``): the same frames on the same pipes, so
start-up, death, restore, snapshot reports and output forwarding are shared
code. What differs: the host enforces fuel, memory and the wall clock itself (the kernel
only keeps a backstop), interrupts are relayed by the host into the guest, a
trap ends the host with a reason the kernel shows, and each reply carries
the fuel the cell used.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

from capsule_kernel.kernel.sandbox.launch import Launch
from capsule_kernel.kernel.sandbox.process import SandboxDied, SandboxProcess
from capsule_kernel.protocol import frames
from capsule_kernel.protocol.limits import STOP_GRACE_SECONDS, Limits, format_duration

# Beyond the host's own timeout handling, when the kernel gives up on the host.
_BACKSTOP_SECONDS = 10.0


class WasmSandbox(SandboxProcess):
    """One wasmtime host process, with one guest CPython inside."""

    kind = "wasm"
    worker_module = "capsule_kernel.wasm_host.host"
    # The trusted host writes both pipes (snapshot reports too): it has checked the guest's frames.
    sender = frames.HOST
    report_sender = frames.HOST

    def __init__(self, limits: Limits, on_event: Any, *, mounts: list[dict[str, Any]] | None = None, **kwargs: Any):
        super().__init__(limits, on_event, **kwargs)
        self.mounts = list(mounts or [])
        self._host_mounts: list[dict[str, Any]] = list(self.mounts)
        self.last_fuel: int | None = None
        self.total_fuel = 0
        self.python_version = "3.12 (WASI)"

    def extra_config(self) -> dict[str, Any]:
        return {
            "mounts": self._host_mounts,
            "chunk_root": str(self.chunk_root) if self.chunk_root else None,
            "parent_pid": os.getpid(),
        }

    def _launch(self, name: str) -> Launch:
        """The host is a trusted process: it runs with the kernel's environment, unconfined by bubblewrap.

        The guest is confined by Wasm itself (no sockets, threads or host files
        but the mounts); the host still isolates its own network and drops
        capabilities (``host_limits.py``) as defence in depth.
        """
        environ = dict(self.environ)
        environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        environ["CAPSULE_SANDBOX"] = "wasm"
        environ.pop("PYTHONSTARTUP", None)
        launch = Launch.plain(environ, str(self.cwd))
        # The host preopens each mount through a copy of the descriptor the kernel held since it
        # checked it (held_mounts.py), as /proc/self/fd/N: never by the path a sandbox may have changed.
        self._host_mounts = []
        for mount in self.mounts:
            held = mount.get("fd")
            if held is not None:
                copy = os.dup(held)
                os.set_inheritable(copy, True)
                launch.fds.copies.append(copy)
                mount = {**mount, "fd": copy}
            self._host_mounts.append(mount)
        if self.chunk_root is not None:
            # The host writes its chunks into the store itself; its spool holds only its
            # report journal (frames.journal), for a kernel that dies before recording one.
            launch.spool = self.chunk_root.parent / "spool" / name
            launch.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
            launch.spool_inside = str(launch.spool)
        return launch

    def _find_worker(self, launch: Launch) -> None:  # noqa: ARG002 - the base class's signature
        """The host runs the guest on its own main thread: the host is the worker."""
        assert self.process is not None
        self.worker_pid = self.process.pid

    def trusted_enforcement(self, ready: dict[str, Any]) -> dict[str, str]:
        """The host is trusted: what it reports of the limits it set is believed."""
        return dict(ready.get("enforcement", {}))

    async def start(self) -> None:
        await super().start()
        self.python_version = f"{self.python_version.split()[0]} (WASI, wasmtime)"

    async def execute(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one cell; the host stops it at its limits, the kernel only if the host stops answering."""
        self.last_fuel = None
        return await super().execute(request)

    def cell_wait(self) -> float | None:
        if not self.limits.timeout:
            return None
        return self.limits.timeout + STOP_GRACE_SECONDS + _BACKSTOP_SECONDS

    async def cell_overdue(self) -> None:
        await self._backstop_kill()

    def start_patience(self) -> float:
        return STOP_GRACE_SECONDS + _BACKSTOP_SECONDS

    async def _backstop_kill(self) -> None:
        self._timed_out = True
        limit = format_duration(self.limits.timeout)
        self.death_reason = f"did not stop at the wall-clock limit of {limit} (timeout), so the Wasm host was killed"
        self.kill()

    def _send_interrupt(self) -> bool:
        """SIGINT to the host alone: it raises KeyboardInterrupt in the guest."""
        if self.process is None or self.process.poll() is not None:
            return False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.process.pid, signal.SIGINT)
        return True

    def update_limits(self, limits: Limits) -> dict[str, str]:
        old, self.limits = self.limits, limits
        notes: dict[str, str] = {}
        for name in ("fuel", "timeout"):
            if getattr(old, name) != getattr(limits, name):
                notes[name] = "applies from the next Wasm cell"
        if old.memory != limits.memory:
            notes["memory"] = "the Wasm store's memory cap is fixed at start: applies after %capsule restart"
        for name in ("cpu", "files", "procs", "network", "disk"):
            if getattr(old, name) != getattr(limits, name):
                notes[name] = "not used by Wasm cells (fuel meters CPU; there are no files, processes or sockets)"
        if self.alive:
            with contextlib.suppress(SandboxDied):
                self.send({"type": "limits", "limits": limits.to_json()})
        return notes

    def _frame_handlers(self) -> dict[str, Any]:
        """The shared table, plus the host's own frames."""
        return {**super()._frame_handlers(), "trap": self._on_trap}

    def _on_trap(self, message: dict[str, Any]) -> None:
        self.death_reason = message["reason"]
        if "broke the protocol" in self.death_reason:
            self.violated = True

    def _on_done(self, message: dict[str, Any]) -> None:
        fuel = message.get("fuel_consumed")
        self.last_fuel = fuel if isinstance(fuel, int) and fuel >= 0 else None
        self.total_fuel += self.last_fuel or 0
        super()._on_done(message)
