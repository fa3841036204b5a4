"""The subprocess sandbox, seen from the kernel: a CPython child under OS limits.

The kernel talks to the worker over two pipes of length-prefixed JSON frames
and forwards the worker's raw stdout/stderr descriptors too (C extensions and
shell commands write there). It never runs, evals or unpickles anything the
worker sends. A worker can die at any instant; every wait here also watches
for that, so the kernel survives and can say why.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import fcntl
import json
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsule_kernel.sandbox import protocol
from capsule_kernel.sandbox.cgroups import PidsCgroup
from capsule_kernel.sandbox.deaths import describe_exit, process_exists
from capsule_kernel.sandbox.limits import Limits, format_duration

EventHandler = Callable[[dict[str, Any]], None]

# How long a cell may keep running after the wall-clock interrupt before the
# sandbox is killed.
TIMEOUT_GRACE_SECONDS = 3.0
# Extra CPU seconds between the soft CPU limit (an exception in the cell) and
# the hard one (the OS kills the process), where the OS lets us set it.
CPU_HARD_GRACE_SECONDS = 5
STARTUP_TIMEOUT_SECONDS = 60.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def can_raise_hard_limits() -> bool:
    """Whether this process holds CAP_SYS_RESOURCE (root in many containers does not)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 24))
    except (OSError, ValueError):
        pass
    return False


def _not_applied(err: Exception) -> str:
    if isinstance(err, PermissionError):
        return (
            "raising a running sandbox's hard limit needs CAP_SYS_RESOURCE, which the kernel lacks; "
            "it applies from the next sandbox (%capsule restart)"
        )
    return f"could not be applied to the running sandbox ({err}); it applies from the next sandbox (%capsule restart)"


class SandboxDied(Exception):
    """The worker process ended while the kernel was waiting on it."""

    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out


@dataclass
class _ReportPipe:
    fd: int
    decoder: protocol.FrameDecoder


@dataclass
class _Pipe:
    fd: int
    name: str
    decoder: codecs.IncrementalDecoder


def _read_available(fd: int) -> bytes | None:
    """What a readable non-blocking pipe holds: None if nothing yet, b"" at its end."""
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _nonblocking(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


def worker_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The environment a worker starts with: the kernel's, made notebook-friendly."""
    env = dict(base)
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    env["CAPSULE_SANDBOX"] = "subprocess"
    env.pop("PYTHONSTARTUP", None)
    return env


class SubprocessSandbox:
    """One worker process: start it, run cells in it, interrupt it, bury it.

    ``on_event`` receives every output frame (stream, display, error, comm,
    input_request, magic...) the moment it arrives, so the kernel can publish
    it at once. ``spawn`` and ``clock`` exist so tests and benchmarks can look
    inside without patching globals.
    """

    kind = "subprocess"
    # The program that runs inside: ``python -m <worker_module> CONFIG``.
    worker_module = "capsule_kernel.sandbox.worker"

    def __init__(
        self,
        limits: Limits,
        on_event: EventHandler,
        *,
        cwd: Path | None = None,
        environ: Mapping[str, str] | None = None,
        python: str = sys.executable,
        chunk_root: Path | None = None,
        spawn: Callable[..., subprocess.Popen] = subprocess.Popen,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.on_event = on_event
        self.cwd = cwd or Path.cwd()
        self.environ = worker_environment(os.environ if environ is None else environ)
        self.python = python
        self.chunk_root = chunk_root
        self.spawn = spawn
        self.clock = clock
        self.process: subprocess.Popen | None = None
        self.started_at: float | None = None
        self.cells_run = 0
        self.enforcement: dict[str, str] = {}
        self.python_version = sys.version.split()[0]
        self.death_reason: str | None = None
        self._cgroup: PidsCgroup | None = None
        self._to_worker: int | None = None
        self._from_worker: int | None = None
        self._pipes: list[_Pipe] = []
        self._decoder = protocol.FrameDecoder()
        self._ready: asyncio.Future | None = None
        self._done: asyncio.Future | None = None
        self._replies: dict[int, asyncio.Future] = {}
        self._exited: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_request = 0
        self._timed_out = False
        self._reap_task: asyncio.Task | None = None
        # Set by whoever stops the sandbox on purpose, so its end is not news.
        self.stopping = False
        # Set once the kernel has told the user about this sandbox's death.
        self.death_noted = False
        self._reports: _ReportPipe | None = None
        self.snapshots_in_flight: dict[int, int] = {}
        # What the frontend's start-up code said the notebook is (VS Code).
        self.notebook_path: str | None = None
        # The execution count whose checkpoint the last "done" announced, if any.
        self.last_done_snapshot: int | None = None

    # -- life cycle -------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def alive(self) -> bool:
        """Started and not yet reaped (the process may be dying)."""
        return self.process is not None and self._exited is not None and not self._exited.is_set()

    @property
    def process_ended(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    @property
    def ready(self) -> bool:
        """Said it is ready, and its process still runs: cells can go to it."""
        started = self._ready is not None and self._ready.done() and not self._ready.cancelled()
        return started and self._ready.exception() is None and self.alive and not self.process_ended

    async def wait_exit(self) -> None:
        """Return once the worker has ended and been reaped."""
        assert self._exited is not None
        await self._exited.wait()

    async def start(self) -> None:
        """Spawn the worker and wait until it says it is ready."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._exited = asyncio.Event()
        self._ready = loop.create_future()
        self.death_reason = None
        self._reap_task = None
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        report_r, report_w = os.pipe()
        config = {
            "read_fd": to_worker_r,
            "write_fd": from_worker_w,
            "parent_pid": os.getpid(),
            "limits": self.limits.to_json(),
            "chunk_root": str(self.chunk_root) if self.chunk_root else None,
            "report_fd": report_w,
            **self.extra_config(),
        }
        try:
            self.process = self.spawn(
                [self.python, "-m", self.worker_module, json.dumps(config)],
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                pass_fds=(to_worker_r, from_worker_w, report_w),
                cwd=self.cwd,
                env=self.environ,
                start_new_session=True,
            )
        finally:
            for fd in (to_worker_r, from_worker_w, out_w, err_w, report_w):
                os.close(fd)
        self.started_at = self.clock()
        self.cells_run = 0
        self._to_worker = to_worker_w
        self._from_worker = from_worker_r
        self._decoder = protocol.FrameDecoder()
        self._place_in_cgroup()
        for fd in (from_worker_r, out_r, err_r, report_r):
            _nonblocking(fd)
        loop.add_reader(from_worker_r, self._on_frames_readable)
        # Snapshot reports outlive the worker: this pipe closes only when the
        # last snapshot child has written and exited.
        self._reports = _ReportPipe(report_r, protocol.FrameDecoder())
        loop.add_reader(report_r, self._on_reports_readable)
        self._pipes = [
            _Pipe(out_r, "stdout", codecs.getincrementaldecoder("utf-8")("replace")),
            _Pipe(err_r, "stderr", codecs.getincrementaldecoder("utf-8")("replace")),
        ]
        for pipe in self._pipes:
            loop.add_reader(pipe.fd, self._on_raw_output, pipe)
        ready = await self._await_or_death(self._ready, STARTUP_TIMEOUT_SECONDS)
        self.python_version = ready.get("python", self.python_version)
        self.enforcement.update(ready.get("enforcement", {}))
        if self._cgroup is not None:
            # The worker reports on RLIMIT_NPROC; the cgroup is what binds.
            self.enforcement["procs"] = "enforced: pids cgroup"

    def extra_config(self) -> dict[str, Any]:
        """What a subclass's worker needs beyond the pipes and limits."""
        return {}

    def _place_in_cgroup(self) -> None:
        assert self.process is not None
        self._cgroup = PidsCgroup.create(f"capsule-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        if self._cgroup is None:
            return
        try:
            self._cgroup.set_max(self.limits.procs)
            self._cgroup.add(self.process.pid)
            self.enforcement["procs"] = "enforced: pids cgroup"
        except OSError as err:
            self._cgroup.remove()
            self._cgroup = None
            self.enforcement["procs_cgroup"] = f"not available: {err}"

    async def shutdown(self, grace: float = 2.0) -> None:
        """Ask the worker to stop, then make sure it has."""
        if self.process is None:
            return
        if self.alive:
            with contextlib.suppress(OSError):
                self.send({"type": "shutdown"})
            deadline = self.clock() + grace
            while self.process.poll() is None and self.clock() < deadline:
                await asyncio.sleep(0.02)
        self.kill()
        await self._reaped()

    def kill(self) -> None:
        """SIGKILL the worker and everything it started."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    def interrupt(self) -> None:
        """KeyboardInterrupt in the running cell, as Ctrl-C would in a terminal."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGINT)

    # -- talking to the worker ----------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        if self._to_worker is None:
            raise SandboxDied(self.death_reason or "the sandbox is not running")
        try:
            protocol.write_frame(self._to_worker, message)
        except (BrokenPipeError, OSError) as err:
            raise SandboxDied(self.death_reason or f"the sandbox pipe closed ({err})") from None

    async def execute(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one cell; return the worker's reply content.

        Raises SandboxDied when the worker ends before replying (a crash, a
        kill, or the timeout kill after the grace period).
        """
        assert self._loop is not None
        self._done = self._loop.create_future()
        self._timed_out = False
        self._arm_cpu_limit()
        self.send({"type": "execute", **request, "limits": self.limits.to_json()})
        self.cells_run += 1
        try:
            return await self._await_or_death(self._done, self.limits.timeout, on_timeout=self._timeout_then_kill)
        finally:
            self._done = None

    async def request(self, kind: str, args: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Ask the idle worker something (completion, inspection, history)."""
        assert self._loop is not None
        self._next_request += 1
        request_id = self._next_request
        future = self._loop.create_future()
        self._replies[request_id] = future
        try:
            self.send({"type": "request", "id": request_id, "kind": kind, "args": args})
            return await self._await_or_death(future, timeout)
        finally:
            self._replies.pop(request_id, None)

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
            except (PermissionError, ValueError, OSError) as err:
                notes[name] = _not_applied(err)
        if old.procs != limits.procs:
            try:
                if self._cgroup is not None:
                    self._cgroup.set_max(limits.procs)
                value = resource.RLIM_INFINITY if limits.procs is None else limits.procs
                resource.prlimit(pid, resource.RLIMIT_NPROC, (value, value))
                notes["procs"] = "applied to the running sandbox"
            except (PermissionError, ValueError, OSError) as err:
                notes["procs"] = _not_applied(err)
        if old.network != limits.network:
            notes["network"] = "a running process cannot change networks: applies after %capsule restart"
        if old.cpu != limits.cpu:
            notes["cpu"] = "applies from the next cell"
        if old.timeout != limits.timeout:
            notes["timeout"] = "applies from the next cell"
        with contextlib.suppress(SandboxDied):
            self.send({"type": "limits", "limits": limits.to_json()})
        return notes

    def memory_in_use(self) -> int | None:
        """Resident memory of the worker in bytes, from /proc."""
        if self.pid is None:
            return None
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    # -- limits enforced from outside ------------------------------------------

    def _cpu_seconds_used(self) -> float | None:
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        except (OSError, ValueError, IndexError):
            return None

    def _arm_cpu_limit(self) -> None:
        """RLIMIT_CPU counts a process's whole life; re-arm it before each cell.

        The soft limit raises CPULimitExceeded in the cell. A hard limit a few
        seconds later kills a cell that ignores it, but only where the kernel
        may raise it again for the next cell (CAP_SYS_RESOURCE); elsewhere the
        hard limit stays open and the wall-clock timeout is the backstop.
        """
        pid = self.pid
        if pid is None:
            return
        hard_ok = can_raise_hard_limits()
        if self.limits.cpu is None:
            soft = resource.RLIM_INFINITY
        else:
            used = self._cpu_seconds_used() or 0.0
            soft = int(used + self.limits.cpu + 0.999)
        hard = soft + CPU_HARD_GRACE_SECONDS if hard_ok and soft != resource.RLIM_INFINITY else resource.RLIM_INFINITY
        if not hard_ok:
            hard = resource.prlimit(pid, resource.RLIMIT_CPU)[1]
            soft = min(soft, hard) if hard != resource.RLIM_INFINITY else soft
        try:
            resource.prlimit(pid, resource.RLIMIT_CPU, (soft, hard))
        except (ProcessLookupError, PermissionError, OSError, ValueError) as err:
            self.enforcement["cpu"] = f"not enforced: {err}"
            return
        if hard_ok:
            self.enforcement["cpu"] = "enforced: RLIMIT_CPU per cell (exception, then kill)"
        else:
            self.enforcement["cpu"] = (
                "enforced: RLIMIT_CPU soft limit per cell (exception; the timeout is the hard stop)"
            )

    async def _timeout_then_kill(self) -> None:
        self._timed_out = True
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGUSR2)
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

    # -- waiting --------------------------------------------------------------------

    async def _await_or_death(
        self,
        future: asyncio.Future,
        timeout: float | None,
        on_timeout: Callable[[], Any] | None = None,
    ) -> Any:
        assert self._exited is not None
        exited = asyncio.ensure_future(self._exited.wait())
        try:
            finished, _ = await asyncio.wait([future, exited], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not finished and on_timeout is not None:
                await on_timeout()
                finished, _ = await asyncio.wait([future, exited], return_when=asyncio.FIRST_COMPLETED)
            elif not finished:
                raise TimeoutError(f"the sandbox did not answer within {timeout:g} s")
            if future.done():
                return future.result()
            raise SandboxDied(self.death_reason or "the sandbox ended", timed_out=self._timed_out)
        finally:
            exited.cancel()

    # -- reading --------------------------------------------------------------------

    def _on_frames_readable(self) -> None:
        assert self._from_worker is not None
        data = _read_available(self._from_worker)
        if data is None:
            return
        if not data:
            self._on_eof()
            return
        try:
            messages = self._decoder.feed(data)
        except protocol.ProtocolError as err:
            self.death_reason = f"broke the frame protocol ({err}) and was stopped"
            self.kill()
            self._on_eof()
            return
        for message in messages:
            self._dispatch(message)

    def _on_reports_readable(self) -> None:
        reports = self._reports
        assert reports is not None and self._loop is not None
        data = _read_available(reports.fd)
        if data is None:
            return
        if not data:
            self._loop.remove_reader(reports.fd)
            os.close(reports.fd)
            self._reports = None
            return
        try:
            messages = reports.decoder.feed(data)
        except protocol.ProtocolError as err:
            self.on_event({"type": "snapshot_failed", "execution_count": -1, "reason": f"bad report: {err}"})
            return
        for message in messages:
            self.snapshots_in_flight.pop(message.get("execution_count"), None)
            self.on_event(message)

    async def snapshots_settled(self, timeout: float) -> None:
        """Wait until every snapshot this worker started has reported or died."""
        deadline = self.clock() + timeout
        while self.snapshots_in_flight and self.clock() < deadline:
            if self._reports is None:
                # Every writer has gone: whatever was written has been read.
                self.snapshots_in_flight.clear()
                break
            for count, pid in list(self.snapshots_in_flight.items()):
                if pid == 0 and not self.process_ended:
                    continue  # the worker has not forked it yet
                if not process_exists(pid):
                    # Gone: its report, if it wrote one, is in the pipe now.
                    self._on_reports_readable()
                    self.snapshots_in_flight.pop(count, None)
            await asyncio.sleep(0.01)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "ready":
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(message)
        elif kind == "done":
            # Everything the cell wrote to its raw descriptors is already in the
            # pipes: forward it now, so that it precedes the execute_reply.
            self.drain_raw_output()
            if isinstance(message.get("notebook_path"), str):
                self.notebook_path = message["notebook_path"]
            self.last_done_snapshot = message.get("snapshot")
            if message.get("snapshot") is not None:
                self.snapshots_in_flight[message["snapshot"]] = 0  # its pid follows
            if self._done is not None and not self._done.done():
                self._done.set_result(message["reply"])
        elif kind == "snapshot_started":
            count = message.get("execution_count")
            if count in self.snapshots_in_flight:
                self.snapshots_in_flight[count] = int(message.get("pid", 0))
        elif kind == "reply":
            future = self._replies.get(message.get("id"))
            if future is not None and not future.done():
                future.set_result(message.get("content", {}))
        else:
            self.on_event(message)

    def _on_raw_output(self, pipe: _Pipe) -> None:
        data = _read_available(pipe.fd)
        if data is None:
            return
        if not data:
            assert self._loop is not None
            self._loop.remove_reader(pipe.fd)
            return
        text = pipe.decoder.decode(data)
        if text:
            self.on_event({"type": "stream", "name": pipe.name, "text": text})

    def drain_raw_output(self) -> None:
        for pipe in self._pipes:
            chunks = []
            while data := _read_available(pipe.fd):
                chunks.append(data)
            text = pipe.decoder.decode(b"".join(chunks))
            if text:
                self.on_event({"type": "stream", "name": pipe.name, "text": text})

    def _on_eof(self) -> None:
        assert self._loop is not None
        if self._from_worker is not None:
            self._loop.remove_reader(self._from_worker)
        self._reaped()

    def _reaped(self) -> asyncio.Future:
        """The one task that buries this worker; every caller shares it."""
        if self._reap_task is None:
            assert self._loop is not None
            self._reap_task = self._loop.create_task(self._reap())
        return self._reap_task

    async def _reap(self) -> None:
        """Collect the exit status, forward last words, release everything."""
        if self.process is None or self._exited is None:
            return
        deadline = self.clock() + 5.0
        while self.process.poll() is None and self.clock() < deadline:
            await asyncio.sleep(0.01)
        if self.process.poll() is None:
            self.kill()
            self.process.wait()
        self.drain_raw_output()
        if self.death_reason is None:
            self.death_reason = describe_exit(self.process.returncode, self.limits)
        assert self._loop is not None
        for pipe in self._pipes:
            self._loop.remove_reader(pipe.fd)
            os.close(pipe.fd)
        self._pipes = []
        for fd in (self._to_worker, self._from_worker):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._to_worker = self._from_worker = None
        if self._cgroup is not None:
            self._cgroup.remove()
            self._cgroup = None
        self._exited.set()
