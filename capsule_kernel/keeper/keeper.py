"""The sandbox's keeper: a trusted process between the kernel and the sandbox, for the kernel's last moments.

Runs OUTSIDE the sandbox, as the kernel's user, started as
``python -I -S keeper.py LIFELINE LINGER PROCS... -- COMMAND...`` (stdlib only,
isolated mode: nothing a cell can write is on its import path). It starts the
sandbox's launch command and waits for it, ending the way it ended.

Why it exists: a cell's reply is sent while its snapshot child may still be
writing the checkpoint (snapshots are off the critical path). Bubblewrap's
``--die-with-parent`` kills the whole sandbox when its parent dies; with the
kernel as that parent, a ``kill -9`` of the kernel right after a reply would
take the snapshot down with it, and the state the user saw "ok" for. The
keeper is that parent instead. It holds the read end of a lifeline pipe whose
write end only the kernel has: end of file means the kernel is gone. The
keeper then gives the sandbox at most LINGER seconds to end by itself (an idle
worker sees the kernel's pipe close, takes its deferred snapshot and exits;
the sandbox's supervisor waits for snapshot children, which journal their
reports in the spool for the next kernel to adopt), and then kills it: every
process in the sandbox's cgroup (PROCS are its ``cgroup.procs`` files), and its
own child, whose death ends the sandbox's PID namespace (bubblewrap's
``--die-with-parent``). A sandbox cannot reach the keeper: it runs as another
user or in another PID namespace, and holds none of its descriptors.

The keeper starts in a session of its own, so the frontend's signals to the
kernel's process group (a Jupyter server's kill of a kernel) do not end it
before its time.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> None:
    lifeline, linger = int(argv[0]), float(argv[1])
    split = argv.index("--")
    procs_files, command = argv[2:split], argv[split + 1 :]
    # Everything the kernel passed (pipes, bubblewrap's descriptors) goes to the launch command.
    child = subprocess.Popen(command, close_fds=False)
    _keep_only(lifeline)
    watch = os.pidfd_open(child.pid)
    ready, _, _ = select.select([watch, lifeline], [], [])
    if watch not in ready:
        # The kernel is gone: a bounded time for the sandbox's last snapshots, then the end.
        deadline = time.monotonic() + linger
        while time.monotonic() < deadline and not select.select([watch], [], [], deadline - time.monotonic())[0]:
            pass
        if child.poll() is None:
            _kill_all(procs_files)
            child.kill()
    returncode = child.wait()
    # Nothing of the sandbox outlives its bubblewrap: not even a namespace child that
    # bubblewrap had cloned but not yet released when it died (it would wait forever).
    _kill_all(procs_files)
    _end_like(returncode)


def _keep_only(lifeline: int) -> None:
    """Hold no descriptor of the sandbox's: its pipes must close when the sandbox's processes end."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.closerange(3, lifeline)
    os.closerange(lifeline + 1, os.sysconf("SC_OPEN_MAX"))


def _kill_all(procs_files: list[str]) -> None:
    for path in procs_files:
        try:
            with open(path) as procs:
                pids = [int(line) for line in procs if line.strip()]
        except (OSError, ValueError):
            continue
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _end_like(returncode: int) -> None:
    """Exit as the launch command did, so the kernel reads the same status as without a keeper."""
    if returncode < 0:
        try:
            signal.signal(-returncode, signal.SIG_DFL)  # SIGKILL and SIGSTOP keep their default anyway
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), -returncode)
    os._exit(returncode if returncode >= 0 else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
