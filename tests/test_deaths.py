"""A sandbox can die at any instant; the kernel survives and says why."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.harness import wait_until


def assert_survived(kernel, result, *phrases: str) -> None:
    assert result.status == "error"
    assert result.content["ename"] == "SandboxDied"
    evalue = result.content["evalue"]
    for phrase in phrases:
        assert phrase in evalue, evalue
    assert "A fresh sandbox (pid" in evalue
    assert "was restored" in evalue
    # The kernel is alive, a new sandbox runs, and the state after the last
    # successful cell is back.
    assert kernel.km.is_alive()
    assert kernel.execute("before_death").result_text == "'kept'"
    assert kernel.execute("21 * 2").result_text == "42"


def test_os_exit(fresh_kernel):
    kernel = fresh_kernel()
    kernel.execute("before_death = 'kept'")
    result = kernel.execute("import os\nos._exit(3)")
    assert_survived(kernel, result, "exited with code 3", "os._exit")


def test_segfault(fresh_kernel):
    kernel = fresh_kernel()
    kernel.execute("before_death = 'kept'")
    result = kernel.execute("import ctypes\ndef inner():\n    ctypes.string_at(0)\ninner()")
    assert_survived(kernel, result, "segmentation fault (SIGSEGV)", "C extension")
    # The cause in a few lines: faulthandler's first line, the call that crashed and the user's frames.
    stderr = result.stderr
    assert "Fatal Python error: Segmentation fault" in stderr
    assert "in string_at" in stderr and "in inner" in stderr
    assert "interactiveshell.py" not in stderr and "capsule_kernel" not in stderr, stderr
    assert len(stderr.splitlines()) <= 8, stderr
    assert "%capsule status --last-crash" in stderr
    # The whole native dump on request.
    dump = kernel.execute("%capsule status --last-crash").texts()
    assert "in string_at" in dump and "interactiveshell.py" in dump and "worker.py" in dump


def test_killed_by_a_signal_from_inside(fresh_kernel):
    kernel = fresh_kernel()
    kernel.execute("before_death = 'kept'")
    result = kernel.execute("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert_survived(kernel, result, "SIGKILL", "out-of-memory killer")


def test_killed_from_outside_while_running(fresh_kernel):
    kernel = fresh_kernel()
    kernel.execute("before_death = 'kept'")
    pid = kernel.sandbox_pid()
    started: list[bool] = []

    def on_message(message) -> None:
        if message.msg_type == "stream" and "running" in message.content["text"] and not started:
            started.append(True)
            os.kill(pid, signal.SIGTERM)

    result = kernel.execute("import time\nprint('running', flush=True)\ntime.sleep(60)", on_message=on_message)
    assert_survived(kernel, result, "terminated (SIGTERM)")


def test_death_between_cells_is_reported_on_the_next_cell(fresh_kernel):
    kernel = fresh_kernel()
    kernel.execute("before_death = 'kept'")
    pid = kernel.sandbox_pid()
    os.kill(pid, signal.SIGKILL)
    # Gone from /proc once the kernel has reaped it: the kernel has noticed.
    # (A zombie main thread is not enough: the rest of the process may still
    # be exiting, and a cell sent then fails with SandboxDied, rightly.)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), what="the kernel to reap the killed sandbox")
    result = kernel.execute("before_death")
    assert result.result_text == "'kept'", result.texts()
    assert "while no cell was running" in result.stderr
    assert "was restored" in result.stderr
    assert kernel.sandbox_pid() != pid


def _memory_cgroup() -> Path | None:
    """A v1 memory cgroup below ours that this test may create, or None."""
    try:
        line = next(row for row in Path("/proc/self/cgroup").read_text().splitlines() if ":memory:" in row)
    except (OSError, StopIteration):
        return None
    parent = Path("/sys/fs/cgroup/memory") / line.split(":", 2)[2].lstrip("/")
    if not os.access(parent, os.W_OK):
        return None
    return parent


@pytest.mark.skipif(_memory_cgroup() is None, reason="no writable memory cgroup to provoke a real OOM kill")
def test_out_of_memory_killer(fresh_kernel):
    """The real OOM killer, confined to a memory cgroup so the machine is safe."""
    kernel = fresh_kernel()
    kernel.execute("before_death = 'kept'")
    pid = kernel.sandbox_pid()
    group = _memory_cgroup() / f"capsule-oom-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(200 * 1024 * 1024))
        (group / "cgroup.procs").write_text(str(pid))
        result = kernel.execute("hog = b'x' * (600 * 1024 * 1024)")
        assert_survived(kernel, result, "SIGKILL", "out-of-memory killer")
        control = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
        assert int(control.get("oom_kill", "1")) >= 1
    finally:
        wait_until(lambda: (group / "cgroup.procs").read_text().strip() == "", what="the cgroup to empty")
        group.rmdir()
