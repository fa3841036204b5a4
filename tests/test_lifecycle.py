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


def _settled(kernel) -> None:
    """The last cell's checkpoint is recorded (log waits for it)."""
    kernel.execute("%capsule log -n 1")


def test_a_death_after_restart_never_brings_back_the_earlier_kernels_names(fresh_kernel, tmp_path):
    """A restart is the user's choice: a crash in the new kernel restores only the new kernel's state.

    The notebook is one session across the restart (as under jupyter_server,
    which names it by path), so the earlier kernel's checkpoints are the
    session's newest until the new kernel records one of its own.
    """
    kernel = fresh_kernel(env={"CAPSULE_SESSION": f"restarted-{tmp_path.name}"})
    kernel.execute("from_before = 'the earlier kernel'")
    _settled(kernel)
    kernel.km.restart_kernel(now=False)
    kernel.kc.wait_for_ready(timeout=60)
    kernel.drain_iopub()
    # The user chose to leave that state: no offer to resume it (a kernel that died would offer it).
    assert "earlier kernel" not in kernel.execute("1 + 1").texts()
    # A crash before the new kernel saved anything: empty, not the earlier kernel's namespace.
    died = kernel.execute("import os; os._exit(3)")
    assert died.error is not None and died.error["ename"] == "SandboxDied"
    assert "from_before" not in died.texts()
    assert kernel.execute("'from_before' in dir()").result_text == "False"
    # A crash after it saved something: exactly its own names come back.
    kernel.execute("from_after = 'the new kernel'")
    _settled(kernel)
    kernel.execute("import os; os._exit(3)")
    assert kernel.execute("('from_before' in dir(), from_after)").result_text == "(False, 'the new kernel')"


def test_a_death_after_capsule_restart_brings_back_only_what_came_after(fresh_kernel):
    kernel = fresh_kernel()
    kernel.execute("before = 1")
    _settled(kernel)
    kernel.execute("%capsule restart")
    kernel.execute("import os; os._exit(3)")
    assert kernel.execute("'before' in dir()").result_text == "False"
    kernel.execute("after = 2")
    _settled(kernel)
    kernel.execute("import os; os._exit(3)")
    assert kernel.execute("('before' in dir(), after)").result_text == "(False, 2)"
