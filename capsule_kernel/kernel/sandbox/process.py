"""What both sandboxes share, seen from the kernel: a child process that speaks frames.

Runs in the KERNEL. The subprocess sandbox (``subprocess.py``, a confined
CPython worker) and the Wasm sandbox (``wasm.py``, a trusted wasmtime host
with the guest inside) are siblings over ``SandboxProcess``: the kernel talks
to either over two pipes of length-prefixed JSON frames (``frames.py``,
checked against what that sender may send, with bounded decoders), reads
snapshot reports on a third pipe, and forwards the raw stdout/stderr
descriptors (C extensions and shell commands write there). It never runs,
evals or unpickles anything a sandbox sends. A sandbox can die at any
instant; every wait here also watches for that, so the kernel survives and
can say why. What differs between the two (how the process is launched and
found, interrupts, who enforces time and CPU, moving limits) is what each
sibling implements.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from capsule_kernel.kernel.sandbox import chunk_server
from capsule_kernel.kernel.sandbox.channel import FrameChannel
from capsule_kernel.kernel.sandbox.interrupts import InterruptEscalation
from capsule_kernel.kernel.sandbox.launch import ConfinementRequired, Launch, memory_enforcement
from capsule_kernel.kernel.sandbox.pipes import (
    STARTUP_TIMEOUT_SECONDS,
    SUBSHELL_GRACE_SECONDS,
    EventHandler,
    PreviousCellOverran,
    SandboxDied,
    _nonblocking,
    _Pipe,
    _ReportPipe,
)
from capsule_kernel.kernel.sandbox.reaping import SandboxReaping
from capsule_kernel.kernel.settings import DEFAULT_COALESCE_CELLS, DEFAULT_COALESCE_SECONDS, SandboxSettings
from capsule_kernel.protocol import frames
from capsule_kernel.protocol.chunks import entry_chunks
from capsule_kernel.protocol.limits import Limits, format_duration


class SandboxProcess(FrameChannel, SandboxReaping, ABC):
    """One sandbox process: start it, run cells in it, bury it.

    ``on_event`` receives every output frame (stream, display, error, comm,
    input_request, magic...) the moment it arrives, so the kernel can publish
    it at once. ``spawn`` and ``clock`` exist so tests and benchmarks can look
    inside without patching globals.
    """

    # "subprocess" or "wasm": the pool's key and what %capsule status shows.
    kind: str
    # The program launched: ``python -P -m <worker_module> CONFIG``.
    worker_module: str
    # Who writes the frame pipe and the report pipe (frames.FRAMES: what each may send).
    sender: str
    report_sender: str

    def __init__(
        self,
        limits: Limits,
        on_event: EventHandler,
        *,
        cwd: Path | None = None,
        environ: Mapping[str, str] | None = None,
        python: str = sys.executable,
        chunk_root: Path | None = None,
        mounts: list[dict[str, Any]] | None = None,
        sandbox_settings: SandboxSettings | None = None,
        state_dir: Path | None = None,
        ipython_config: Mapping[str, Any] | None = None,
        coalesce: tuple[float, int] = (DEFAULT_COALESCE_SECONDS, DEFAULT_COALESCE_CELLS),
        spawn: Callable[..., subprocess.Popen] = subprocess.Popen,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.on_event = on_event
        self.cwd = cwd or Path.cwd()
        # The kernel's environment: the confinement passes on only its allowlisted part.
        self.environ = dict(os.environ if environ is None else environ)
        self.python = python
        self.chunk_root = chunk_root
        self.mounts = list(mounts or [])
        self.sandbox_settings = sandbox_settings or SandboxSettings()
        # How long and how many short cells a coalesced snapshot may wait for (settings: [checkpoints] coalesce).
        self.coalesce = coalesce
        # The notebook's own persistent IPython directory (history), writable by its sandboxes only.
        self.state_dir = state_dir
        # The client's IPython configuration (settings.sandbox_ipython_config): the worker's shell takes it.
        self.ipython_config = dict(ipython_config or {})
        self.spawn = spawn
        self.clock = clock
        self.process: subprocess.Popen | None = None
        self.started_at: float | None = None
        self.cells_run = 0
        self.enforcement: dict[str, str] = {}
        self.python_version = sys.version.split()[0]
        self.death_reason: str | None = None
        self.worker_pid: int | None = None  # the worker's pid on the host (it is pid 3 inside)
        self._init_pid: int | None = None  # bubblewrap's pid 1 of the sandbox, on the host
        self._launched: Launch | None = None
        self.name: str | None = None  # capsule-<kernel pid>-<random>: its cgroup, spool and ledger row
        self._lifeline: int | None = None  # write end of the keeper's lifeline (keeper.py)
        self._chunks: chunk_server.ChunkServer | None = None
        self._started_with = limits  # the hard rlimits of the running worker
        self._to_worker: int | None = None
        self._from_worker: int | None = None
        self._pipes: list[_Pipe] = []
        self._decoder = frames.FrameDecoder(self.sender)
        self._handlers = self._frame_handlers()
        self._ready: asyncio.Future | None = None
        self._started: asyncio.Future | None = None
        self._cell_count: int | None = None
        # The cell whose budget runs now (until the next cell starts), and its wall-clock deadline.
        self._holder: int | None = None
        self._busy_until: float | None = None
        self._done: asyncio.Future | None = None
        self._replies: dict[int, asyncio.Future] = {}
        self._exited: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_request = 0
        self._timed_out = False
        self._reap_task: asyncio.Task | None = None
        # Set by whoever stops the sandbox on purpose, so its end is not news.
        self.stopping = False
        # Set when the sandbox broke the protocol (the user reads "broke the protocol").
        self.violated = False
        # Set once the kernel has told the user about this sandbox's death.
        self.death_noted = False
        self._reports: _ReportPipe | None = None
        # What the worker's faulthandler wrote as it crashed (crash_dump.py), read when it is reaped.
        self.crash_dump: str | None = None
        self.snapshots_in_flight: dict[int, int] = {}
        # Where the network limit came from ("capsule.toml (...)", "%capsule limits"): a refusal names it.
        self.network_source = "default"
        # The stop button always works: an interrupt the cell ignores ends the sandbox (interrupts.py).
        self._interrupts = InterruptEscalation(
            lambda: self.sandbox_settings.interrupt_grace, self._stop_ignored_interrupt
        )
        self._reported_early: set[int] = set()
        # Cells whose snapshot this sandbox reported (the latest 256): what a later one may build on.
        self._snapshotted: set[int] = set()
        self._reports_seen: dict[int, str] = {}  # count -> hash of its last report (one said twice is once)
        # Coalescing (worker_snapshots): cells whose snapshot is deferred, the cells each
        # coalesced snapshot in flight covers, and cells whose snapshot will never come.
        self.deferred: list[int] = []
        self._covers: dict[int, list[int]] = {}
        self._lost: list[int] = []
        # What the frontend's start-up code said the notebook is (VS Code).
        self.notebook_path: str | None = None
        self.startup_problems: list[str] = []  # what of the IPython profile failed in it
        # The comm ids the frontend has open (the session controller sets it from the relay's registry).
        self.frontend_comms: Callable[[], Iterable[str]] = tuple
        # The execution count whose checkpoint the last "done" announced, if any; whether it deferred one.
        self.last_done_snapshot: int | None = None
        self.last_done_deferred = False
        # Kernel subshells (worker_subshells): the numbers this sandbox was given, those still open,
        # and each subshell's cell in flight.
        self._subshells_given: set[int] = set()
        self.subshells_open: set[int] = set()
        self._subshell_cells: dict[int, asyncio.Future] = {}

    # -- life cycle -------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The worker's host pid (what %capsule status and error messages show); None until it is ready."""
        return self.worker_pid

    @property
    def _cgroup(self) -> Any:
        return self._launched.cgroup if self._launched else None

    @property
    def keeper_pid(self) -> int | None:
        """The keeper's pid (keeper.py): the process the kernel started, when it is one."""
        return self.process.pid if self.process is not None and self._lifeline is not None else None

    @property
    def spool(self) -> Path | None:
        """Where this sandbox's snapshots put new chunks for the kernel to adopt."""
        return self._launched.spool if self._launched else None

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
        """Spawn the worker, already confined, and wait until it says it is ready."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._exited = asyncio.Event()
        self._ready = loop.create_future()
        self.death_reason = None
        self.violated = False
        self._reap_task = None
        self.worker_pid = None
        self._init_pid = None
        name = self.name = f"capsule-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            launch = self._launch(name)
        except ConfinementRequired as err:
            self.death_reason = str(err)
            self._exited.set()
            raise SandboxDied(str(err)) from None
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        report_r, report_w = os.pipe()
        chunk_kernel, chunk_worker = chunk_server.socket_pair()
        # Only this process holds the write end: its end of file tells the keeper the kernel is gone.
        lifeline_r, lifeline_w = os.pipe() if launch.kept else (None, None)
        config = {
            "read_fd": to_worker_r,
            "write_fd": from_worker_w,
            "report_fd": report_w,
            "chunk_fd": chunk_worker.fileno(),
            "limits": self.limits.to_json(),
            "spool": launch.spool_inside,
            "coalesce": list(self.coalesce),
            **self.extra_config(),
        }
        command = [self.python, "-P", "-m", self.worker_module, json.dumps(config)]
        try:
            lifeline = () if lifeline_r is None else (lifeline_r,)
            self.process = self.spawn(
                launch.argv(command, lifeline_r),
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                pass_fds=(to_worker_r, from_worker_w, report_w, chunk_worker.fileno(), *launch.fds.all(), *lifeline),
                cwd=launch.cwd,
                env=launch.env,
                start_new_session=True,
            )
        except OSError:
            chunk_kernel.close()
            launch.discard()
            if lifeline_w is not None:
                os.close(lifeline_w)
            raise
        finally:
            for fd in (to_worker_r, from_worker_w, out_w, err_w, report_w, *launch.fds.all(), *lifeline):
                with contextlib.suppress(OSError):
                    os.close(fd)
            chunk_worker.close()
            if launch.info_read is not None:
                _nonblocking(launch.info_read)
        self._launched = launch
        self._lifeline = lifeline_w
        self._started_with = self.limits
        self.started_at = self.clock()
        self.cells_run = 0
        self._to_worker = to_worker_w
        self._from_worker = from_worker_r
        self._decoder = frames.FrameDecoder(self.sender)
        self._holder = self._busy_until = None
        self._chunks = chunk_server.ChunkServer(
            chunk_kernel, self.chunk_root, copy=launch.copy_chunks, on_violation=self._on_violation
        )
        self._chunks.start(loop)
        for fd in (from_worker_r, out_r, err_r, report_r):
            _nonblocking(fd)
        loop.add_reader(from_worker_r, self._on_frames_readable)
        # Snapshot reports outlive the worker: this pipe closes only when the
        # last snapshot child has written and exited.
        self._reports = _ReportPipe(report_r, frames.FrameDecoder(self.report_sender))
        loop.add_reader(report_r, self._on_reports_readable)
        self._pipes = [
            _Pipe(out_r, "stdout", codecs.getincrementaldecoder("utf-8")("replace")),
            _Pipe(err_r, "stderr", codecs.getincrementaldecoder("utf-8")("replace")),
        ]
        for pipe in self._pipes:
            loop.add_reader(pipe.fd, self._on_raw_output, pipe)
        ready = await self._await_or_death(self._ready, STARTUP_TIMEOUT_SECONDS)
        self.python_version = ready.get("python", self.python_version)
        # The worker's account of the user's profile: text for the notebook, bounded.
        said = ready.get("problems", [])
        self.startup_problems = [str(problem)[:300] for problem in said[:10] if isinstance(problem, str)]
        self._find_worker(launch)
        self.enforcement = {**launch.enforcement, **self.trusted_enforcement(ready)}
        if launch.cgroup is not None and self.limits != self._started_with:
            # Changed while it was starting: the cgroup follows now, rlimits with the first cell.
            self.enforcement["memory"] = memory_enforcement(launch.cgroup, self.limits.memory)
            self.enforcement["procs"] = launch.cgroup.set_pids(self.limits.procs)

    def extra_config(self) -> dict[str, Any]:
        """What a subclass's worker needs beyond the pipes and limits."""
        return {}

    def trusted_enforcement(self, ready: dict[str, Any]) -> dict[str, str]:  # noqa: ARG002 - the Wasm host's hook
        """What the kernel itself knows to be enforced; a worker's own claims are not believed."""
        return {}

    # -- what each sibling does its own way -------------------------------------------

    @abstractmethod
    def _launch(self, name: str) -> Launch:
        """Everything outside the process that confines it (the subprocess sandbox) or nothing (the Wasm host)."""

    @abstractmethod
    def _find_worker(self, launch: Launch) -> None:
        """Set ``worker_pid``: the process that runs the cells, as the host sees it."""

    def interrupt(self, *, by_user: bool = True) -> None:
        """KeyboardInterrupt in the running cell; one it does not heed stops the sandbox (interrupts.py).

        `by_user`: the frontend's stop, not the kernel saying it again.
        """
        if self._send_interrupt():
            self._interrupts.interrupted(self._done, self._loop, by_user=by_user)

    def _stop_ignored_interrupt(self, done: asyncio.Future, reason: str) -> None:
        """The cell `done` belongs to ignored its interrupt: kill the sandbox, if it still runs that cell."""
        if done is self._done and self.alive:
            self.death_reason = reason
            self.kill()

    @abstractmethod
    def _send_interrupt(self) -> bool:
        """Send the running cell its SIGINT; False if the sandbox is not running."""

    @abstractmethod
    def update_limits(self, limits: Limits) -> dict[str, str]:
        """Apply new limits to the running sandbox; say, per limit, what took effect."""

    @abstractmethod
    def cell_wait(self) -> float | None:
        """How long the kernel waits for a started cell's reply before it acts (None: forever)."""

    @abstractmethod
    async def cell_overdue(self) -> None:
        """The started cell ran past ``cell_wait``: stop it."""

    @abstractmethod
    def start_patience(self) -> float:
        """How long past the previous cell's deadline the sandbox may take to pick the next cell up."""

    def _cell_taken(self) -> None:
        """The sandbox said ``started``: the cell before has given it up."""

    def _cell_running(self) -> None:
        """The cell's budget starts now (after its ``started``)."""

    def _on_violation(self, reason: str) -> None:
        """The sandbox sent something outside the vocabulary: stop it; nothing after it is believed."""
        if self.death_reason is None or not self.violated:
            self.death_reason = reason
        self.violated = True
        self.kill()

    async def shutdown(self, grace: float = 2.0) -> None:
        """Ask the worker to stop, then make sure it has."""
        if self.process is None:
            return
        if self.alive:
            with contextlib.suppress(OSError):
                self.send({"type": "shutdown"})
            deadline = self.clock() + grace
            while self.process.poll() is None and self.clock() < deadline:
                if self._reap_task is not None and not self.snapshots_in_flight:
                    # The worker has gone and its snapshots have reported: what is left
                    # (a daemon a cell started, which the supervisor would wait for) is killed.
                    break
                await asyncio.sleep(0.02)
        self.kill()
        await self._reaped()

    def kill(self) -> None:
        """SIGKILL the worker and everything it started (its whole PID namespace and cgroup)."""
        if self.process is None:
            return
        for pid in (self._init_pid, self.worker_pid):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if self._cgroup is not None:
            self._cgroup.kill_all()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    # -- talking to the worker ----------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        if self._to_worker is None:
            raise SandboxDied(self.death_reason or "the sandbox is not running")
        try:
            frames.write_frame(self._to_worker, message)
        except (BrokenPipeError, OSError) as err:
            raise SandboxDied(self.death_reason or f"the sandbox pipe closed ({err})") from None

    async def execute(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one cell; return the worker's reply content.

        The cell's budget (its wall clock and CPU) starts when the worker takes
        the cell (its ``started`` frame), not when the kernel sends it: until
        then the sandbox still belongs to the cell before, and if that cell
        keeps it past its own limit (a forged ``done``, then more work), the
        sandbox is stopped and PreviousCellOverran names that cell. Raises
        SandboxDied when the worker ends before replying (a crash, a kill, the
        timeout kill after the grace period, or a broken protocol).
        """
        assert self._loop is not None
        self._done = self._loop.create_future()
        self._started = self._loop.create_future()
        self._cell_count = int(request["execution_count"])
        self._timed_out = False
        previous, busy_until = self._holder, self._busy_until
        self.send({"type": "execute", **request, "limits": self.limits.to_json()})
        self.cells_run += 1
        try:
            await self._wait_started(previous, busy_until)
            self._holder = self._cell_count
            started_at = self.clock()
            self._busy_until = started_at + self.limits.timeout if self.limits.timeout else None
            self._cell_running()
            return await self._await_or_death(self._done, self.cell_wait(), on_timeout=self.cell_overdue)
        finally:
            self._done = self._started = None

    async def _wait_started(self, previous: int | None, busy_until: float | None) -> None:
        """Wait for the worker to take the cell, for as long as the cell before may still hold it."""
        assert self._started is not None
        if busy_until is None:
            await self._await_or_death(self._started, None)
            return
        patience = max(0.0, busy_until - self.clock()) + self.start_patience()
        try:
            await self._await_or_death(self._started, patience)
        except PreviousCellOverran:
            raise
        except SandboxDied as death:
            # It died holding the cell before (the Wasm host stops such a cell itself).
            raise PreviousCellOverran(death.reason, previous) from None
        except TimeoutError:
            limit = format_duration(self.limits.timeout)
            self.death_reason = (
                f"was still busy with cell [{previous}] after that cell's reply, past its wall-clock limit of "
                f"{limit} (timeout), so the sandbox was stopped"
            )
            self.kill()
            await self._reaped()
            raise PreviousCellOverran(self.death_reason, previous) from None

    async def request(
        self, kind: str, args: dict[str, Any], timeout: float = 30.0, *, subshell: int | None = None
    ) -> dict[str, Any]:
        """Ask the idle worker something (completion, inspection, history); on a subshell, at once."""
        assert self._loop is not None
        self._next_request += 1
        request_id = self._next_request
        future = self._loop.create_future()
        self._replies[request_id] = future
        frame: dict[str, Any] = {"type": "request", "id": request_id, "kind": kind, "args": args}
        if subshell is not None:
            self.open_subshell(subshell)
            frame["subshell"] = subshell
        try:
            self.send(frame)
            return await self._await_or_death(future, timeout)
        finally:
            self._replies.pop(request_id, None)

    # -- kernel subshells ---------------------------------------------------------------

    def open_subshell(self, tag: int, name: str = "") -> None:
        """Give the sandbox subshell `tag` (a thread of its own); once per sandbox."""
        if tag in self.subshells_open:
            return
        self.send({"type": "subshell", "action": "open", "subshell": tag, "name": name or str(tag)})
        self._subshells_given.add(tag)
        self.subshells_open.add(tag)

    def close_subshell(self, tag: int) -> None:
        """The subshell was deleted: its running cell is interrupted and its thread ends."""
        if tag in self.subshells_open and self.alive:
            with contextlib.suppress(SandboxDied):
                self.send({"type": "subshell", "action": "close", "subshell": tag})
        self.subshells_open.discard(tag)

    def interrupt_subshells(self) -> None:
        """KeyboardInterrupt in every subshell's running cell (signals reach only the main shell's)."""
        for tag in list(self._subshell_cells):
            with contextlib.suppress(SandboxDied):
                self.send({"type": "subshell", "action": "interrupt", "subshell": tag})

    async def subshell_execute(self, tag: int, request: dict[str, Any], wall: float | None) -> dict[str, Any]:
        """Run a cell on subshell `tag`, beside the main shell's; return the worker's reply content.

        wall: how long it may run. Past it the worker raises CellTimeout in the
        subshell's thread; a thread that does not stop within the grace (it is
        blocked in C code) takes the sandbox down with it, as a main shell's
        cell that ignores its timeout does.
        """
        assert self._loop is not None
        if tag in self._subshell_cells:
            raise SandboxDied(f"subshell {tag} already runs a cell")  # the kernel runs one at a time per subshell
        future = self._subshell_cells[tag] = self._loop.create_future()
        try:
            self.open_subshell(tag)
            self.send({"type": "subshell_execute", "subshell": tag, **request, "limits": self.limits.to_json()})

            async def overdue() -> None:
                with contextlib.suppress(SandboxDied):
                    self.send({"type": "subshell", "action": "timeout", "subshell": tag})
                try:
                    await self._await_or_death(future, SUBSHELL_GRACE_SECONDS)
                except TimeoutError:
                    self.death_reason = (
                        f"ran a subshell's cell past its wall-clock limit of {format_duration(wall or 0)}, and the "
                        "cell did not stop (it was blocked outside Python), so the sandbox was stopped"
                    )
                    self.kill()

            return await self._await_or_death(future, wall, on_timeout=overdue)
        finally:
            self._subshell_cells.pop(tag, None)

    async def restore(self, entries: dict[str, Any], *, replace: bool, timeout: float = 600) -> dict[str, Any]:
        """Load checkpoint entries into the namespace; the worker may open their chunks (and only those) meanwhile."""
        serving = self._chunks.serving(entry_chunks(entries)) if self._chunks else contextlib.nullcontext()
        with serving:
            # The comms the frontend has open: a restored widget among them is reconnected, not reopened.
            args = {"entries": entries, "replace": replace, "open_comms": sorted(self.frontend_comms())}
            return await self.request("restore", args, timeout=timeout)

    def memory_in_use(self) -> int | None:
        """Memory of the whole sandbox (its cgroup), else the worker's resident memory."""
        if self._cgroup is not None and self.alive:
            in_use = self._cgroup.memory_bytes()
            if in_use is not None:
                return in_use
        return self._status_bytes("VmRSS")

    def peak_memory(self) -> int | None:
        """The most memory the sandbox has held: its cgroup's peak, else the process's high-water mark."""
        if self._cgroup is not None:
            peak = self._cgroup.peak_memory_bytes()
            if peak is not None:
                return peak
        return self._status_bytes("VmHWM")

    def _status_bytes(self, field: str) -> int | None:
        """One memory figure of the worker's /proc/PID/status (given there in KiB)."""
        if self.pid is None:
            return None
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

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
            raise SandboxDied(
                self.death_reason or "the sandbox ended", timed_out=self._timed_out, violation=self.violated
            )
        finally:
            exited.cancel()

    # -- reading --------------------------------------------------------------------
