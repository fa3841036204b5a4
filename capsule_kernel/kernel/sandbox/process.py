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
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsule_kernel.kernel.sandbox import chunk_server, crash_dump
from capsule_kernel.kernel.sandbox.launch import ConfinementRequired, Launch, memory_enforcement
from capsule_kernel.kernel.settings import DEFAULT_COALESCE_CELLS, DEFAULT_COALESCE_SECONDS, SandboxSettings
from capsule_kernel.protocol import frames
from capsule_kernel.protocol.chunks import entry_chunks
from capsule_kernel.protocol.deaths import describe_exit, process_exists
from capsule_kernel.protocol.limits import Limits, format_duration, format_size

EventHandler = Callable[[dict[str, Any]], None]

STARTUP_TIMEOUT_SECONDS = 60.0
# How long a subshell's cell has to stop after its CellTimeout is raised (it may be blocked in C).
SUBSHELL_GRACE_SECONDS = 5.0
# How long a dying sandbox may take to let its snapshot children finish.
SNAPSHOT_PATIENCE_SECONDS = 60.0


class SandboxDied(Exception):
    """The worker process ended while the kernel was waiting on it."""

    def __init__(self, reason: str, *, timed_out: bool = False, violation: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out
        self.violation = violation


class PreviousCellOverran(SandboxDied):
    """The sandbox never took the new cell: the cell before it kept it busy past its own limit.

    The time is charged to that earlier cell (``previous``), not to the cell
    that was waiting; the sandbox was stopped, and the waiting cell may run
    in a fresh one.
    """

    def __init__(self, reason: str, previous: int | None) -> None:
        super().__init__(reason)
        self.previous = previous


# What the user reads when a sandbox sent something outside the frame vocabulary.
VIOLATION = "broke the protocol (it sent {what}), so it was stopped"


@dataclass
class _ReportPipe:
    fd: int
    decoder: frames.FrameDecoder


@dataclass
class _Pipe:
    """A raw output pipe of the sandbox (fd-level writes: C code, faulthandler, shell commands)."""

    fd: int
    name: str
    decoder: codecs.IncrementalDecoder
    # Text after the last line end: held back until its line ends, or RAW_LINE_WAIT_SECONDS pass.
    pending: str = ""
    timer: asyncio.TimerHandle | None = None


# A writer that emits a line in pieces (faulthandler writes a frame's line in several
# writes) is read in pieces; holding a partial line this long keeps each line in one
# stream message, while a prompt or a progress bar without a line end still shows.
RAW_LINE_WAIT_SECONDS = 0.1


def read_available(fd: int) -> bytes | None:
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


class SandboxProcess(ABC):
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
        self._reported_early: set[int] = set()
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

    @abstractmethod
    def interrupt(self) -> None:
        """KeyboardInterrupt in the running cell."""

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

    def _cell_taken(self) -> None:  # noqa: B027 - an optional hook: the Wasm host needs nothing here
        """The sandbox said ``started``: the cell before has given it up."""

    def _cell_running(self) -> None:  # noqa: B027 - an optional hook
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

    def _on_subshell_done(self, message: dict[str, Any]) -> None:
        future = self._subshell_cells.get(message["subshell"])
        if future is None or future.done():
            self._out_of_sequence(f"a 'subshell_done' for subshell {message['subshell']}, which ran no cell")
            return
        future.set_result(message["reply"])

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

    def _on_frames_readable(self) -> None:
        assert self._from_worker is not None
        data = read_available(self._from_worker)
        if data is None:
            return
        if not data:
            self._on_eof()
            return
        try:
            messages = self._decoder.feed(data)
        except frames.ProtocolError as err:
            self._on_violation(VIOLATION.format(what=err))
            self._on_eof()
            return
        for message in messages:
            if self.death_reason is not None and self.process_ended:
                break  # stopped for an earlier frame of this read: believe nothing after it
            self._dispatch(message)

    def _on_reports_readable(self) -> None:
        reports = self._reports
        assert reports is not None and self._loop is not None
        data = read_available(reports.fd)
        if data is None:
            return
        if not data:
            self._forget_fd(reports.fd)
            self._reports = None
            return
        try:
            messages = reports.decoder.feed(data)
        except frames.ProtocolError as err:
            # Written by the sandbox's snapshot children: a broken report is the sandbox breaking the protocol.
            self._forget_fd(reports.fd)
            self._reports = None
            self._give_up_in_flight()
            self._on_violation(VIOLATION.format(what=f"{err} on its snapshot report pipe"))
            return
        for message in messages:
            count = message["execution_count"]
            announced = self.snapshots_in_flight.pop(count, None) is not None
            if not announced:
                self._reported_early.add(count)  # read before the frame that announces it
            # Which cells this snapshot holds, reckoned here from the kernel's own bookkeeping: a
            # coalesced one its deferred cells; one a "done" announced only its cell (a cell that
            # is not stored in history shares its count with the next, which may be deferred).
            if count in self._covers:
                message["covers"] = self._covers.pop(count)
            else:
                message["covers"] = [count] if announced else self._take_covers(count)
            # Where the report's new chunks are, and whose it is: set here, on the
            # trusted side, over anything the report itself says.
            message["spool"] = self.spool
            message["sandbox"] = self.name
            self.on_event(message)

    async def snapshots_settled(self, timeout: float) -> None:
        """Wait until every snapshot this worker started has reported or died, and deferred ones were taken.

        A live worker takes the coalesced snapshot of deferred cells once it
        is idle; a dead one never will: those cells are lost (lost_cells).
        """
        deadline = self.clock() + timeout
        while (self.snapshots_in_flight or self.deferred) and self.clock() < deadline:
            if self.deferred and not self.snapshots_in_flight and self.process_ended:
                self._lost.extend(self.deferred)
                self.deferred = []
                break
            if self.snapshots_in_flight and self._reports is None:
                # Every writer has gone: whatever was written has been read.
                self._give_up_in_flight()
                continue
            for count, pid in list(self.snapshots_in_flight.items()):
                if pid == 0 and not self.process_ended:
                    continue  # the worker has not forked it yet
                if not process_exists(pid):
                    # Gone: its report, if it wrote one, is in the pipe now.
                    self._on_reports_readable()
                    if self.snapshots_in_flight.pop(count, None) is not None:
                        self._lost.extend(self._covers.pop(count, [count]))
            await asyncio.sleep(0.01)

    def lost_cells(self) -> list[int]:
        """Cells that ended well but whose state no snapshot of this sandbox will ever hold (it died first)."""
        return sorted(set(self._lost))

    def _give_up_in_flight(self) -> None:
        for count in self.snapshots_in_flight:
            self._lost.extend(self._covers.pop(count, [count]))
        self.snapshots_in_flight.clear()

    def _take_covers(self, count: int) -> list[int]:
        """The cells a snapshot named after `count` holds: it, and all deferred up to it."""
        covers = [cell for cell in self.deferred if cell < count] + [count]
        self.deferred = [cell for cell in self.deferred if cell > count]
        return covers

    def _frame_handlers(self) -> dict[str, Callable[[dict[str, Any]], None]]:
        """What the kernel does with each frame a sandbox may send it (frames.FRAMES says which)."""
        forward = self.on_event
        return {
            "ready": self._on_ready,
            "started": self._on_started,
            "done": self._on_done,
            "reply": self._on_reply,
            "snapshot_started": self._on_snapshot_started,
            "snapshot_unchanged": self._on_snapshot_unchanged,
            "stream": forward,
            "display": forward,
            "clear_output": forward,
            "execute_result": forward,
            "error": forward,
            "comm": forward,
            "input_request": forward,
            "magic": forward,
            "task": forward,
            "subshell_done": self._on_subshell_done,
        }

    def _dispatch(self, message: dict[str, Any]) -> None:
        handler = self._handlers.get(message["type"])
        if handler is None:
            self._on_violation(VIOLATION.format(what=f"a {message['type']!r} frame on its frame pipe"))
            return
        tag = message.get("subshell")
        if tag is not None and tag not in self._subshells_given:
            self._out_of_sequence(f"output for subshell {tag}, which it was never given")
            return
        if tag is not None and tag not in self.subshells_open and message["type"] != "subshell_done":
            return  # what a deleted subshell's thread still said: nobody asked for it any more
        handler(message)

    def _out_of_sequence(self, what: str) -> None:
        self._on_violation(VIOLATION.format(what=f"{what}, out of sequence"))

    def _on_ready(self, message: dict[str, Any]) -> None:
        if self._ready is None or self._ready.done():
            self._out_of_sequence("a second 'ready'")
            return
        self._ready.set_result(message)

    def _on_started(self, message: dict[str, Any]) -> None:
        if self._started is None or self._started.done() or message["execution_count"] != self._cell_count:
            self._out_of_sequence("a 'started' for no cell it was given")
            return
        self._cell_taken()
        self._started.set_result(True)

    def _on_done(self, message: dict[str, Any]) -> None:
        if self._done is None or self._done.done() or self._started is None or not self._started.done():
            self._out_of_sequence("a 'done' while no cell of its ran")
            return
        snapshot = message.get("snapshot")
        if snapshot is not None and snapshot != self._cell_count:
            self._out_of_sequence(f"a 'done' announcing a snapshot of cell [{snapshot}]")
            return
        # Everything the cell wrote to its raw descriptors is already in the
        # pipes: forward it now, so that it precedes the execute_reply.
        self.drain_raw_output()
        if message.get("deferred"):
            if snapshot is not None:
                self._out_of_sequence("a 'done' both announcing and deferring a snapshot")
                return
            self.deferred.append(self._cell_count)
        self.last_done_deferred = bool(message.get("deferred"))
        self.last_done_snapshot = snapshot
        if snapshot is not None and snapshot not in self._reported_early:
            self.snapshots_in_flight[snapshot] = 0  # its pid follows
        self._reported_early.discard(snapshot)
        self._done.set_result(message["reply"])

    def _on_reply(self, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        if not isinstance(request_id, int) or not 0 < request_id <= self._next_request:
            self._out_of_sequence("a 'reply' to a request the kernel never made")
            return
        future = self._replies.get(request_id)
        if future is not None and not future.done():
            future.set_result(message["content"])

    def _on_snapshot_started(self, message: dict[str, Any]) -> None:
        count = message["execution_count"]
        pid = self.host_pid_of_child(message["pid"])
        if count in self.deferred:
            # A coalesced snapshot: it holds every deferred cell up to this one.
            self._covers[count] = self._take_covers(count)
            self.snapshots_in_flight[count] = pid
            return
        if count in self._reported_early and count != self.last_done_snapshot:
            self._reported_early.discard(count)  # a coalesced snapshot whose report was read first
            return
        if count != self.last_done_snapshot:
            self._out_of_sequence(f"a 'snapshot_started' for cell [{count}], which announced none")
            return
        if count in self.snapshots_in_flight:  # else its report was read already
            self.snapshots_in_flight[count] = pid

    def host_pid_of_child(self, pid: int) -> int:
        """The host pid of a process the worker forked, from the pid it reported (its own view).

        The kernel checks whether a snapshot child still lives by its pid; a
        sandbox in a PID namespace names it by a number that means another
        process (or none) on the host. -1 when it cannot be found (gone already).
        """
        return pid

    def _on_snapshot_unchanged(self, message: dict[str, Any]) -> None:
        """The deferred cells up to this one changed nothing: recorded as an empty snapshot of it."""
        count = message["execution_count"]
        if count not in self.deferred:
            self._out_of_sequence(f"a 'snapshot_unchanged' for cell [{count}], which was not deferred")
            return
        covers = self._take_covers(count)
        self.on_event(
            {"type": "snapshot", "execution_count": count, "entries": {}, "removed": [], "written": 0,
             "covers": covers, "spool": self.spool, "sandbox": self.name}
        )  # fmt: skip

    def _on_raw_output(self, pipe: _Pipe) -> None:
        data = read_available(pipe.fd)
        if data is None:
            return
        assert self._loop is not None
        if not data:
            self._loop.remove_reader(pipe.fd)
            self._emit_raw(pipe, everything=True)
            return
        pipe.pending += pipe.decoder.decode(data)
        self._emit_raw(pipe)

    def _emit_raw(self, pipe: _Pipe, *, everything: bool = False) -> None:
        """Send the whole lines read so far (all of it with everything); hold a partial line back a moment."""
        if pipe.timer is not None:
            pipe.timer.cancel()
            pipe.timer = None
        text = pipe.pending
        cut = len(text) if everything else max(text.rfind("\n"), text.rfind("\r")) + 1
        pipe.pending = text[cut:]
        if cut:
            self.on_event({"type": "stream", "name": pipe.name, "text": text[:cut]})
        if pipe.pending and self._loop is not None:
            pipe.timer = self._loop.call_later(RAW_LINE_WAIT_SECONDS, self._flush_raw, pipe)

    def _flush_raw(self, pipe: _Pipe) -> None:
        pipe.timer = None
        self._emit_raw(pipe, everything=True)

    def drain_raw_output(self) -> None:
        for pipe in self._pipes:
            chunks = []
            while data := read_available(pipe.fd):
                chunks.append(data)
            pipe.pending += pipe.decoder.decode(b"".join(chunks))
            self._emit_raw(pipe, everything=True)

    def _on_eof(self) -> None:
        assert self._loop is not None
        if self._from_worker is not None:
            self._loop.remove_reader(self._from_worker)
        self._reaped()

    def _forget_fd(self, fd: int) -> None:
        """Stop watching fd, then close it (in that order: never close a watched fd).

        Closing first leaves the loop's selector holding a key for a number
        the next pipe reuses; add_reader on that pipe then only swaps the
        key's callback and never arms epoll for it, so the next sandbox's
        frames go unread (its ``ready`` never arrives). The worker's frame
        pipe is still watched whenever the sandbox is killed before its end
        of file has been read.
        """
        assert self._loop is not None
        self._loop.remove_reader(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

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
        # The sandbox's supervisor lets snapshot children finish before the
        # sandbox ends (they report on their own pipe): wait for them too.
        patience = SNAPSHOT_PATIENCE_SECONDS if self.snapshots_in_flight else 5.0
        deadline = self.clock() + patience
        while self.process.poll() is None and self.clock() < deadline:
            await asyncio.sleep(0.01)
        if self.process.poll() is None:
            self.kill()
            self.process.wait()
        self.drain_raw_output()
        self.crash_dump = crash_dump.read_dump(self.spool)
        if self.death_reason is None:
            self.death_reason = self._cause_of_death()
        assert self._loop is not None
        for pipe in self._pipes:
            self._forget_fd(pipe.fd)
        self._pipes = []
        for fd in (self._to_worker, self._from_worker):
            if fd is not None:
                self._forget_fd(fd)
        self._to_worker = self._from_worker = None
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self._chunks is not None:
            self._chunks.close()
            self._chunks = None
        self._exited.set()
        if self._launched is not None:
            launch = self._launched
            # The cgroup can go once its last process has fully exited (a moment after the kill).
            deadline = self.clock() + 2.0
            launch.discard(keep_spool=True)
            while launch.cgroup is not None and self.clock() < deadline:
                await asyncio.sleep(0.02)
                launch.discard(keep_spool=True)
            # The last reports may still be being adopted from the spool.
            self._loop.call_later(SNAPSHOT_PATIENCE_SECONDS, launch.remove_spool)

    def _cause_of_death(self) -> str:
        assert self.process is not None
        code = self.process.returncode
        if self._launched is not None and self._launched.confined and code is not None and 128 < code <= 128 + 64:
            code = -(code - 128)  # bubblewrap's init reports a signal as 128 + its number
        cgroup = self._cgroup
        if cgroup is not None and cgroup.oom_kills() > 0 and self.limits.memory:  # its own cgroup: counts from 0
            return (
                f"was killed for exceeding the sandbox memory limit of {format_size(self.limits.memory)} "
                "(memory: every process of the sandbox and its /tmp files together); "
                "raise it with %capsule limits --memory SIZE"
            )
        return describe_exit(code, self.limits)
