"""Shutdown, restart and kernel death never leave a sandbox behind."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.harness import wait_until


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def test_shutdown_stops_the_sandbox(fresh_kernel):
    kernel = fresh_kernel()
    pid = kernel.sandbox_pid()
    kernel.km.shutdown_kernel(now=False)
    assert not kernel.km.is_alive()
    wait_until(lambda: process_gone(pid), what="the sandbox to stop with the kernel")


def test_restart_gives_a_new_kernel_and_sandbox(fresh_kernel):
    kernel = fresh_kernel()
    kernel.execute("before_restart = 1")
    old_pid = kernel.sandbox_pid()
    kernel.km.restart_kernel(now=False)
    kernel.kc.wait_for_ready(timeout=60)
    wait_until(lambda: process_gone(old_pid), what="the old sandbox to stop")
    kernel.drain_iopub()
    assert kernel.execute("'before_restart' in dir()").result_text == "False"
    assert kernel.sandbox_pid() != old_pid


def test_sandbox_dies_with_a_killed_kernel(fresh_kernel):
    kernel = fresh_kernel()
    pid = kernel.sandbox_pid()
    os.kill(kernel.km.provisioner.process.pid, signal.SIGKILL)
    wait_until(lambda: process_gone(pid), what="the orphaned sandbox to die")
