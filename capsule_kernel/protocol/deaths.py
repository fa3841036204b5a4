"""Words for why a sandbox process ended, for people rather than for logs."""

from __future__ import annotations

import signal
from pathlib import Path

from capsule_kernel.protocol.limits import Limits, format_duration, format_size

_SIGNAL_CAUSES = {
    signal.SIGKILL: (
        "was killed by SIGKILL: most likely the operating system's out-of-memory killer "
        "(the machine or its container ran out of memory), or a kill -9 from outside"
    ),
    signal.SIGSEGV: (
        "crashed with a segmentation fault (SIGSEGV): usually a bug in a C extension, "
        "or native code that could not allocate memory under the sandbox memory limit"
    ),
    signal.SIGABRT: (
        "aborted (SIGABRT): a native library gave up, often after a failed memory allocation or an assertion"
    ),
    signal.SIGBUS: "crashed with a bus error (SIGBUS): bad memory access in native code, or a truncated mapped file",
    signal.SIGFPE: "crashed with a floating-point exception (SIGFPE) in native code",
    signal.SIGILL: "crashed with an illegal instruction (SIGILL) in native code",
    signal.SIGXCPU: "was stopped by the CPU-time hard limit (SIGXCPU)",
    signal.SIGTERM: "was terminated (SIGTERM) from outside",
}


def describe_exit(returncode: int | None, limits: Limits) -> str:
    """One sentence on how the worker process ended, with the likely cause."""
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        signum = -returncode
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        text = _SIGNAL_CAUSES.get(signum, f"was killed by {name}")
        if signum in (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT) and limits.memory:
            text += f" (sandbox memory limit: {format_size(limits.memory)})"
        if signum == signal.SIGXCPU and limits.cpu:
            text += f" (cpu limit: {format_duration(limits.cpu)})"
        return text
    return (
        f"exited with code {returncode}: the cell (or a thread it started) ended the process, "
        "for example with os._exit() or a fatal interpreter error"
    )


def process_exists(pid: int) -> bool:
    """Running, as opposed to gone or a zombie (it exited; nobody has reaped it yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def process_start(pid: int) -> str | None:
    """When a process started (clock ticks since boot): with its pid, it names one process, never a later one."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
