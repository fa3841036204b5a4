"""The subprocess sandbox, seen from the kernel: a CPython child confined by the OS.

Runs in the KERNEL. The worker (``worker.py``) is real CPython with the
user's packages, launched inside bubblewrap, a cgroup and rlimits
(``launch.py``); the frames, pipes and reaping it shares with the Wasm
sandbox live in ``process.py``. What is this sandbox's own: finding the
worker inside its PID namespace, the SIGINT to its process group (the
escalation of an ignored one is both kinds', in ``interrupts.py``), the
wall-clock and CPU limits the kernel enforces from outside (a cell cannot
report its way out of them), and moving limits on a running worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import tempfile
from pathlib import Path
from typing import Any

from capsule_kernel.kernel.network.proxy import HostProxy
from capsule_kernel.kernel.sandbox.confinement import RELAY_PORT, SANDBOX_PROXY_SOCKET, sandbox_identity
from capsule_kernel.kernel.sandbox.launch import Launch, memory_enforcement
from capsule_kernel.kernel.sandbox.pipes import read_available
from capsule_kernel.kernel.sandbox.process import (
    PreviousCellOverran,
    SandboxDied,
    SandboxProcess,
)
from capsule_kernel.protocol import allowed_hosts, frames
from capsule_kernel.protocol.limits import Limits, format_duration

__all__ = ["PreviousCellOverran", "SandboxDied", "SubprocessSandbox"]

# How long a cell may keep running after the wall-clock interrupt before the
# sandbox is killed.
TIMEOUT_GRACE_SECONDS = 3.0
# Extra CPU seconds between the soft CPU limit (an exception in the cell) and
# the hard one (the OS kills the process), where the OS lets us set it.
CPU_HARD_GRACE_SECONDS = 5
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _not_applied(err: Exception) -> str:
    if isinstance(err, PermissionError):
        return (
            "the sandbox runs as another user and the kernel lacks CAP_SYS_RESOURCE, so its per-process "
            "limit stays; it applies from the next sandbox (%capsule restart)"
        )
    return f"could not be applied to the running sandbox ({err}); it applies from the next sandbox (%capsule restart)"


def _only_child(pid: int) -> int:
    """The single child of a process (right after start-up, before the worker has forked anything)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if len(children) != 1:
        raise ValueError(f"process {pid} has {len(children)} children, not 1")
    return int(children[0])


class SubprocessSandbox(SandboxProcess):
    """One confined worker process: start it, run cells in it, interrupt it, bury it."""

    kind = "subprocess"
    worker_module = "capsule_kernel.inside.worker.worker"
    sender = frames.WORKER
    report_sender = frames.SNAPSHOT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cpu_watch: asyncio.Task | None = None
        # network = [hosts]: the kernel's proxy for this sandbox, and its socket.
        self.proxy: HostProxy | None = None
        self.proxy_socket: Path | None = None

    async def start(self) -> None:
        """With a list of allowed hosts, the proxy listens first: the launch binds its socket."""
        hosts = self.limits.allowed_hosts
        if hosts is not None:
            directory = Path(tempfile.mkdtemp(prefix="capsule-proxy-"))  # the kernel's own
            directory.chmod(0o711)  # bubblewrap (as the sandbox's uid) passes through to bind the socket
            self.proxy = HostProxy(
                allowed_hosts.parse_rules(hosts),
                self.network_source,
                lambda decision: self.on_event({"type": "network", **vars(decision)}),
                lambda: self._cell_count,
            )
            identity = sandbox_identity()
            await self.proxy.start(directory / "proxy.sock", owner=identity.uid if identity.switch else None)
            self.proxy_socket = self.proxy.path
        try:
            await super().start()
        except BaseException:
            await self._close_proxy()
            raise

    async def _reap(self) -> None:
        await super()._reap()
        await self._close_proxy()

    async def _close_proxy(self) -> None:
        proxy, self.proxy = self.proxy, None
        if proxy is not None:
            await proxy.close()
            if proxy.path is not None:
                with contextlib.suppress(OSError):
                    proxy.path.parent.rmdir()

    def hidden_paths(self) -> list[Path]:
        """Host paths a bound directory must not reveal: the store, the Jupyter runtime directory."""
        from jupyter_core.paths import jupyter_runtime_dir

        store = [self.chunk_root.parent] if self.chunk_root else []
        return [*store, Path(jupyter_runtime_dir())]

    def extra_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"ipython": self.ipython_config}
        if self.proxy_socket is not None:
            config["proxy"] = {"socket": str(SANDBOX_PROXY_SOCKET), "port": RELAY_PORT}
        return config

    def _launch(self, name: str) -> Launch:
        """Everything outside the worker that confines it: cgroup, spool, bubblewrap."""
        return Launch.for_sandbox(name, self)

    def _find_worker(self, launch: Launch) -> None:
        """The worker's host pid: bubblewrap's init (pid 1) -> the supervisor -> the worker."""
        if launch.info_read is None:
            # No bubblewrap: the launched process is the supervisor itself (under the keeper).
            assert self.process is not None
            supervisor = _only_child(self.process.pid) if launch.kept else self.process.pid
            self.worker_pid = _only_child(supervisor)
            return
        info = b""
        while chunk := read_available(launch.info_read):
            info += chunk
        os.close(launch.info_read)
        launch.info_read = None
        try:
            self._init_pid = int(json.loads(info)["child-pid"])
            supervisor = _only_child(self._init_pid)
            self.worker_pid = _only_child(supervisor)
        except (ValueError, KeyError, IndexError, OSError) as err:
            self.death_reason = f"could not be located after it started ({err})"
            self.kill()
            raise SandboxDied(self.death_reason) from None

    def host_pid_of_child(self, pid: int) -> int:
        """Among the worker's children, the one whose innermost pid (NSpid) is `pid`."""
        worker = self.worker_pid
        if worker is None:
            return -1
        try:
            children = Path(f"/proc/{worker}/task/{worker}/children").read_text().split()
        except OSError:
            return -1
        for child in children:
            try:
                status = Path(f"/proc/{child}/status").read_text()
            except OSError:
                continue
            nspids = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
            if nspids and nspids[-1] == str(pid):
                return int(child)
        return -1

    def _send_interrupt(self) -> bool:
        """SIGINT to the sandbox's process group (the worker and the shell commands it runs), as Ctrl-C
        would in a terminal."""
        if self.process is None or self.process.poll() is not None or self.worker_pid is None:
            return False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(self.worker_pid), signal.SIGINT)
        return True

    def cell_wait(self) -> float | None:
        return self.limits.timeout

    async def cell_overdue(self) -> None:
        """The cell ran past its wall-clock limit: interrupt it, then kill the sandbox after a grace period."""
        await self._timeout_then_kill()

    def start_patience(self) -> float:
        """How long past the previous cell's deadline the sandbox may take to pick the next cell up."""
        return TIMEOUT_GRACE_SECONDS

    def _cell_running(self) -> None:
        self._arm_cpu_limit()

    def _cell_taken(self) -> None:
        """The cell before gives the sandbox up now: its CPU watch ends."""
        if self._cpu_watch is not None:
            self._cpu_watch.cancel()
            self._cpu_watch = None

    def update_limits(self, limits: Limits) -> dict[str, str]:
        """Apply new limits to the running worker; say what took effect."""
        old, self.limits = self.limits, limits
        notes: dict[str, str] = {}
        pid = self.pid
        if pid is None or not self.alive:
            return {name: "applies when the sandbox starts" for name in ("memory", "files", "procs")}
        for name, which in (("memory", resource.RLIMIT_AS), ("files", resource.RLIMIT_NOFILE)):
            if getattr(old, name) == getattr(limits, name):
                continue
            value = getattr(limits, name)
            value = resource.RLIM_INFINITY if value is None else value
            try:
                resource.prlimit(pid, which, (value, value))
                notes[name] = "applied to the running sandbox"
            except PermissionError:
                # The worker moves its own soft limit (under the hard one set at its launch).
                hard = getattr(self._started_with, name)
                if hard is None or (value != resource.RLIM_INFINITY and value <= hard):
                    notes[name] = "applied to the running sandbox (its soft limit)"
                else:
                    notes[name] = _not_applied(PermissionError())
            except (ValueError, OSError) as err:
                notes[name] = _not_applied(err)
        cgroup = self._cgroup
        if old.memory != limits.memory and cgroup is not None:
            # The whole sandbox's limit moves at once; the per-process one only as far as it may.
            self.enforcement["memory"] = memory_enforcement(cgroup, limits.memory)
            per_process = notes.get("memory", "")
            notes["memory"] = "applied to the whole sandbox (cgroup)" + (
                "" if "applied" in per_process else f"; per process: {per_process}"
            )
        if old.procs != limits.procs:
            if cgroup is not None:
                self.enforcement["procs"] = cgroup.set_pids(limits.procs)
                notes["procs"] = "applied to the running sandbox"
            else:
                try:
                    value = resource.RLIM_INFINITY if limits.procs is None else limits.procs
                    resource.prlimit(pid, resource.RLIMIT_NPROC, (value, value))
                    notes["procs"] = "applied to the running sandbox"
                except (PermissionError, ValueError, OSError) as err:
                    notes["procs"] = _not_applied(err)
        if old.disk != limits.disk:
            notes["disk"] = "a mounted tmpfs keeps its size: applies after %capsule restart"
        if old.network != limits.network:
            notes["network"] = "a running process cannot change networks: applies after %capsule restart"
        if old.cpu != limits.cpu:
            notes["cpu"] = "applies from the next cell"
        if old.timeout != limits.timeout:
            notes["timeout"] = "applies from the next cell"
        with contextlib.suppress(SandboxDied):
            self.send({"type": "limits", "limits": limits.to_json()})
        return notes

    # -- limits enforced from outside ------------------------------------------

    def _cpu_seconds_used(self) -> float | None:
        """CPU time of the whole sandbox (its cgroup), else of the worker process alone."""
        if self._cgroup is not None:
            used = self._cgroup.cpu_seconds()
            if used is not None:
                return used
        return self._worker_cpu_seconds()

    def _worker_cpu_seconds(self) -> float | None:
        """CPU time of the worker process and its threads (not its children)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        except (OSError, ValueError, IndexError):
            return None

    def _arm_cpu_limit(self) -> None:
        """Watch the cell's CPU time from outside: SIGXCPU at the limit, a stop CPU_HARD_GRACE later.

        Measured on the sandbox's cgroup while the cell runs, so CPU burnt by
        the cell's child processes and threads counts too, and nothing the
        sandbox sends can change the budget (it is the kernel's reading, not a
        report). After the cell's reply the watch goes on, on the worker
        process itself (snapshot children are not the cell's work), until the
        next cell starts: a cell that reports its end early and computes on,
        or a thread it left running, spends that cell's budget.
        """
        self._cpu_watch = None
        if self.limits.cpu is None or self._loop is None or self._done is None:
            return
        start = self._cpu_seconds_used()
        if start is None:
            self.enforcement["cpu"] = "not enforced: the sandbox's CPU time cannot be read"
            return
        scope = "the whole sandbox (cgroup)" if self._cgroup is not None else "the worker process"
        self.enforcement["cpu"] = (
            f"enforced by the kernel: CPU time of {scope} per cell, and of the worker after the reply until "
            f"the next cell starts; an exception in the cell, then the sandbox is stopped "
            f"{CPU_HARD_GRACE_SECONDS} s of CPU later"
        )
        self._cpu_watch = self._loop.create_task(self._watch_cpu(start, self.limits.cpu, self._done, self._holder))

    async def _watch_cpu(self, start: float, limit: float, done: asyncio.Future, cell: int | None) -> None:
        signalled = False
        used = 0.0
        last: float | None = None  # after the reply: the worker's own CPU at the previous reading
        while self.alive:
            if not done.done():
                used = (self._cpu_seconds_used() or start) - start
            elif (now := self._worker_cpu_seconds()) is not None:
                used += now - last if last is not None else 0.0
                last = now
            if not signalled and used >= limit:
                signalled = True
                if self.worker_pid is not None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(self.worker_pid, signal.SIGXCPU)
            elif signalled and used >= limit + CPU_HARD_GRACE_SECONDS:
                after = "" if not done.done() else f" after the reply of cell [{cell}]"
                self.death_reason = (
                    f"went on computing {CPU_HARD_GRACE_SECONDS} s of CPU past the CPU limit of "
                    f"{format_duration(limit)} (cpu){after}, so the sandbox was stopped"
                )
                self.kill()
                return
            await asyncio.sleep(max(0.02, min(0.25, (limit - used) / 2)))

    async def _timeout_then_kill(self) -> None:
        self._timed_out = True
        if self.process is not None and self.process.poll() is None and self.worker_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.worker_pid, signal.SIGUSR2)
        assert self._exited is not None and self._done is not None
        done_or_dead = asyncio.ensure_future(self._exited.wait())
        try:
            await asyncio.wait(
                [done_or_dead, self._done], timeout=TIMEOUT_GRACE_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            done_or_dead.cancel()
        if not self._done.done() and self.alive:
            limit = format_duration(self.limits.timeout)
            self.death_reason = (
                f"did not stop within {TIMEOUT_GRACE_SECONDS:g} s of the wall-clock limit of {limit} (timeout), "
                "so it was killed"
            )
            self.kill()
