"""A kill -9 of the kernel at any instant after a reply: the next kernel restores that cell, or names it.

The reply comes while the cell's snapshot may still be running. The sandbox's
keeper lets that snapshot finish after the kernel has died, the snapshot
child journals its report in the spool, and the next kernel adopts it
(checkpoint/adoption.py) when `%capsule resume` runs. These tests kill the
kernel at random instants right after a reply, many times over, through real
kernels.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time

import psutil
import pytest

from tests.harness import start_kernel, wait_until

pytestmark = pytest.mark.slow

RUNS = 50
BIG_EVERY = 5  # every fifth cell also makes a 64 MiB value: a snapshot that takes a while


def kill_at(kernel, instant: float) -> None:
    """SIGKILL the kernel process at `instant` (time.perf_counter), as precisely as the clock allows."""
    while time.perf_counter() < instant:
        pass  # a busy wait: a sleep's wake-up can be late by more than the window under test
    os.kill(kernel.km.provisioner.process.pid, signal.SIGKILL)
    kernel.kc.stop_channels()
    wait_until(lambda: not kernel.km.is_alive(), what="the kernel to die")


def test_a_kill_at_any_instant_after_a_reply_never_loses_that_cell(tmp_path):
    """50 kernels in a row, each killed 0-250 ms after its cell's reply (a third within 10 ms)."""
    env = {"CAPSULE_HOME": str(tmp_path / "home"), "CAPSULE_SESSION": "kill-after-reply"}
    chooser = random.Random(1215)
    delays = []
    for run in range(RUNS):
        kernel = start_kernel(env=env, cwd=tmp_path)
        try:
            if run:
                resumed = kernel.execute("%capsule resume", timeout=120)
                assert resumed.status == "ok", resumed.texts()
                assert "Not in it" not in resumed.texts(), resumed.texts()
                state = kernel.execute("x, len(blob) if 'blob' in dir() else 0").result_text
                big = (run - 1) % BIG_EVERY == 0
                assert state == f"({run - 1}, {64 * 2**20 if big else 0})", (run, delays[-1], resumed.texts())
                kernel.execute("blob = None\ndel blob")
            code = f"x = {run}" + ("\nblob = bytearray(os.urandom(64 * 2**20))" if run % BIG_EVERY == 0 else "")
            reply = kernel.execute("import os\n" + code, timeout=120)
            assert reply.status == "ok", reply.texts()
            delay = chooser.uniform(0, 0.01) if run % 3 == 0 else chooser.uniform(0, 0.25)
            delays.append(delay)
            kill_at(kernel, time.perf_counter() + delay)
        finally:
            kernel.close()


def test_a_kill_after_a_burst_restores_the_saved_cells_and_names_exactly_the_lost_ones(tmp_path):
    """Back to back, every cell is its own checkpoint: a kill right after the last reply loses none of them."""
    env = {"CAPSULE_HOME": str(tmp_path / "home"), "CAPSULE_SESSION": "kill-after-burst"}
    first = start_kernel(env=env, cwd=tmp_path)
    try:
        first.execute("import os\nbase = bytearray(os.urandom(32 * 2**20))\nx = 0")
        assert first.execute("%capsule log -n 1").status == "ok"  # the base is saved
        counts = {}
        for value in range(1, 31):
            msg_id = first.kc.execute(f"x = {value}\nbase[0] = {value}")
            counts[value] = msg_id
        last = first.shell_reply(counts[30], timeout=120)
        assert last["content"]["status"] == "ok"
        count_of = {value: last["content"]["execution_count"] - 30 + value for value in counts}
        kill_at(first, time.perf_counter())
    finally:
        first.close()
    shown, x, named = resume_in_a_new_kernel(env, tmp_path)
    # The snapshots in flight at the kill finished in the sandbox the kernel left behind.
    assert x == 30 and not named, (x, shown)
    assert count_of  # (the counts would name the lost cells)


@pytest.mark.parametrize("victim", ["kernel", "sandbox"])
def test_cells_before_a_running_cell_survive_a_kill(tmp_path, victim):
    """Short cells sent back to back, then a long one: a kill during it loses only the long cell.

    The shape of most notebooks (set-up cells, then a training loop): the
    durability point of each short cell is its own fork, not an idle worker.
    A killed worker cannot take a snapshot it put off; one that was forked
    at each cell's end lands anyway.
    """
    env = {"CAPSULE_HOME": str(tmp_path / "home"), "CAPSULE_SESSION": f"kill-behind-long-{victim}"}
    first = start_kernel(env=env, cwd=tmp_path)
    try:
        worker = first.sandbox_pid()
        first.execute("import os\nbase = bytearray(os.urandom(32 * 2**20))\nx = 0")
        ids = [first.kc.execute(f"x = {value}\nbase[0] = {value}") for value in range(1, 11)]
        long_id = first.kc.execute("import time\nx = 99\nprint('running', flush=True)\ntime.sleep(60)")
        replies = [first.shell_reply(msg_id, timeout=60) for msg_id in ids]
        assert all(reply["content"]["status"] == "ok" for reply in replies)
        wait_until(lambda: first.printed(long_id, "running"), what="the long cell to start")
        if victim == "kernel":
            kill_at(first, time.perf_counter())
        else:
            os.kill(worker, signal.SIGKILL)
            died = first.shell_reply(long_id, timeout=120)["content"]
            assert died["status"] == "error" and "run them again" not in died["evalue"], died
            assert first.execute("x, base[0]").result_text == "(10, 10)"
    finally:
        first.close()
    if victim == "kernel":
        shown, x, named = resume_in_a_new_kernel(env, tmp_path)
        assert x == 10 and not named, (x, shown)
        assert "'import time'" in shown  # only the cell that was running is lost, and named


@pytest.mark.parametrize("victim", ["kernel", "sandbox"])
def test_small_cells_taken_behind_a_large_snapshot_survive_a_kill(tmp_path, victim):
    """Small cells whose snapshot the worker took itself, queued behind a large one still being written.

    Each is in the journal before its reply, with the cell it builds on
    (`after`); the worker reports it only after the large one. Killed
    before that, the worker cannot: the live kernel reads them from the
    journal once the large one has reported (sandbox), the next kernel
    adopts them (kernel). Fails without reading the journal when the worker
    dies (checked: the three small cells were named lost, x came back 1),
    and without a child's broken report pipe being harmless (checked: the
    small cells were dropped as built on a failed snapshot).
    """
    env = {"CAPSULE_HOME": str(tmp_path / "home"), "CAPSULE_SESSION": f"behind-large-{victim}"}
    first = start_kernel(env=env, cwd=tmp_path)
    try:
        worker = first.sandbox_pid()
        first.execute("import os\nbase = bytearray(os.urandom(256 * 2**20))\nx = 0")
        assert first.execute("%capsule log -n 1").status == "ok"  # the base is saved
        ids = [first.kc.execute("base[0] = 7\nx = 1")]  # 256 MiB hashed again: a snapshot child for a while
        ids += [first.kc.execute(f"x = {value}\nname{value} = 'small'") for value in (2, 3, 4)]
        replies = [first.shell_reply(msg_id, timeout=60) for msg_id in ids]
        assert all(reply["content"]["status"] == "ok" for reply in replies)
        children = psutil.Process(worker).children()
        assert children, "the large snapshot was over before the kill: the window was missed"
        if victim == "kernel":
            kill_at(first, time.perf_counter())
        else:
            os.kill(worker, signal.SIGKILL)
            died = first.execute("x")  # told of the death, and of what was restored
            assert died.status == "error" and "run them again" not in died.texts(), died.texts()
            state = first.execute("x, base[0], name2, name3, name4")
            assert state.result_text == "(4, 7, 'small', 'small', 'small')", state.texts()
            log = first.execute("%capsule log").texts()
            assert all(f"name{value}" in log for value in (2, 3, 4)), log
    finally:
        first.close()
    if victim == "kernel":
        second = start_kernel(env=env, cwd=tmp_path)
        try:
            resumed = second.execute("%capsule resume", timeout=120)
            assert resumed.status == "ok" and "Not in it" not in resumed.texts(), resumed.texts()
            state = second.execute("x, base[0], name2, name3, name4")
            assert state.result_text == "(4, 7, 'small', 'small', 'small')", (state.texts(), resumed.texts())
        finally:
            second.close()


def test_deferred_cells_behind_a_running_cell_are_named_when_the_kernel_dies(tmp_path):
    """Cells deferred into a coalesced snapshot that a kill pre-empts: resume names each of them, and the rest holds."""
    (tmp_path / "capsule.toml").write_text('[checkpoints]\ncoalesce = "60s"\n')  # deferred until idle
    env = {"CAPSULE_HOME": str(tmp_path / "home"), "CAPSULE_SESSION": "kill-deferred"}
    first = start_kernel(env=env, cwd=tmp_path)
    try:
        first.execute("import os\nbase = bytearray(os.urandom(32 * 2**20))\nx = 0")
        assert first.execute("%capsule log -n 1").status == "ok"  # the base is saved
        ids = [first.kc.execute(f"x = {value}\nbase[0] = {value}") for value in range(1, 11)]
        long_id = first.kc.execute("import time\nx = 99\nprint('running', flush=True)\ntime.sleep(60)")
        replies = [first.shell_reply(msg_id, timeout=60) for msg_id in ids]
        assert all(reply["content"]["status"] == "ok" for reply in replies)
        wait_until(lambda: first.printed(long_id, "running"), what="the long cell to start")
        count_of = {value: reply["content"]["execution_count"] for value, reply in enumerate(replies, start=1)}
        kill_at(first, time.perf_counter())
    finally:
        first.close()
    shown, x, named = resume_in_a_new_kernel(env, tmp_path)
    assert x < 10, shown  # the long cell kept the deferred ones from their snapshot
    assert named == {count_of[value] for value in range(x + 1, 11)}, (x, shown)
    assert "'import time'" in shown  # the cell that was running is named too


def resume_in_a_new_kernel(env: dict[str, str], cwd) -> tuple[str, int, set[int]]:
    """%capsule resume in a fresh kernel: what it showed, the restored x (base[0] agrees), the cells it named."""
    kernel = start_kernel(env=env, cwd=cwd)
    try:
        resumed = kernel.execute("%capsule resume", timeout=120)
        assert resumed.status == "ok", resumed.texts()
        x = int(kernel.execute("x").result_text)
        assert kernel.execute("base[0]").result_text == str(x)
        named = {int(n) for n in re.findall(r"\[(\d+)\] 'x = \d", resumed.texts())}
        return resumed.texts(), x, named
    finally:
        kernel.close()


def test_cells_deferred_when_the_kernel_dies_get_their_snapshot_in_spite_of_the_broken_pipe(tmp_path):
    """Coalescing on: the worker takes the deferred cells' snapshot at its kernel's end of file.

    Its frames to the dead kernel then meet a broken pipe; that must not cut
    the snapshot short (it once raised before the collector thread started,
    and the deferred cells were lost).
    """
    from tests.test_checkpoints import GATE

    project = tmp_path / "project"
    project.mkdir()
    release = project / "release"  # inside the working directory: the sandbox sees it
    (project / "capsule.toml").write_text('[checkpoints]\ncoalesce = "60s"\n')
    env = {"CAPSULE_HOME": str(tmp_path / "home"), "CAPSULE_SESSION": "epipe"}
    first = start_kernel(env=env, cwd=project)
    try:
        first.execute(f"GATE_PATH = {str(release)!r}\nx = 0\nimport os\nbase = bytearray(16)")
        assert first.execute("%capsule log -n 1").status == "ok"
        assert first.execute(GATE).status == "ok"  # its snapshot waits for `release`
        for value in (1, 2, 3):  # deferred behind it
            assert first.execute(f"x = {value}\nbase[0] = {value}").status == "ok"
        kill_at(first, time.perf_counter())
        release.touch()
    finally:
        release.touch()
        first.close()
    shown, x, named = resume_in_a_new_kernel(env, project)
    assert x == 3 and not named, (x, shown)
