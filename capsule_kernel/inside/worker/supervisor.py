"""Runs IN the sandbox, first: keep the sandbox up until the worker's snapshots have landed.

Everything a sandbox starts lives in its PID namespace and dies when the
namespace's first process ends, which is what stops a double-forked daemon
from outliving the sandbox. But a snapshot child that is still saving the
previous cell must not die with a worker that crashed meanwhile: its
checkpoint is the state the user gets back. So the worker's process forks
first thing; the parent (this supervisor) becomes the subreaper of the
sandbox, waits for the worker, then waits a bounded time for the processes
left behind (snapshot children report on their own pipe), kills the rest,
and ends the way the worker ended, so that the kernel reads the same exit
status as if there were no supervisor. It holds no pipe to the kernel and
runs no user code; being inside the sandbox, it is trusted by nobody.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time

_PR_SET_CHILD_SUBREAPER = 36
# How long orphans (snapshot children) may run on after the worker has ended.
LINGER_SECONDS = 60.0
_STOP_SIGNALS = (signal.SIGINT, signal.SIGUSR2, signal.SIGXCPU, signal.SIGTERM, signal.SIGHUP)


def supervise(close_fds: tuple[int, ...]) -> None:
    """Fork; return in the child (the worker); never return in the supervisor."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    worker = os.fork()
    if worker == 0:
        return
    for signum in _STOP_SIGNALS:
        # Interrupts are for the cell; the kernel stops the sandbox with SIGKILL.
        signal.signal(signum, signal.SIG_IGN)
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    status = _wait_for(worker)
    _reap_orphans(time.monotonic() + LINGER_SECONDS)
    _end_like(status)


def _wait_for(worker: int) -> int:
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        if pid == worker:
            return status


def _reap_orphans(deadline: float) -> None:
    """Reap what the worker left behind until none is left or the deadline passes; then kill the rest."""
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)
    with contextlib.suppress(OSError):
        os.kill(-1, signal.SIGKILL)  # every process of the sandbox but pid 1 and this one


def _end_like(status: int) -> None:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP keep their default anyway
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)
