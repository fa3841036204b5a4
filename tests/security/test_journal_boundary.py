"""Attacks on the snapshot journal from inside the sandbox.

The journal (frames.journal) lives in the sandbox's spool, which the sandbox
can write: after a kernel dies, the next kernel adopts what is there
(checkpoint/adoption.py). A cell plants entries before the kernel is killed;
the next kernel must believe none of them beyond what a live report pipe
would carry: no checkpoint for a cell its kernel never ran, no link followed,
no FIFO waited on, no oversized file read into memory.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import pytest

from tests.harness import start_kernel, wait_until
from tests.security.helpers import kernel_pid, status_field

pytestmark = pytest.mark.slow

PLANT = r"""
import os, stat
from pathlib import Path
from capsule_kernel.inside import snapshot
from capsule_kernel.protocol import frames
spool = Path("/run/capsule/spool")
journal = spool / frames.JOURNAL_DIR
journal.mkdir(exist_ok=True)
# A well-formed snapshot of a cell the kernel never ran, with chunks of its own: x = 'forged'.
made = snapshot.take({"x": "forged", "planted": True}, ["x", "planted"], {}, spool, durable=False)
frames.journal(spool, {"type": "snapshot", "execution_count": 999, "entries": made["entries"],
                       "removed": [], "written": made["written"]})
# A link out of the spool, a FIFO nobody writes, and a file of 1 GiB (sparse) where reports go.
os.symlink("/etc/hostname", journal / "997.frame")
os.mkfifo(journal / "996.frame")
with open(journal / "995.frame", "wb") as big:
    big.truncate(2**30)
sorted(os.listdir(journal))
"""


def test_planted_journal_entries_are_not_believed_by_the_next_kernel(tmp_path):
    home = tmp_path / "home"
    env = {"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "planted"}
    first = start_kernel(env=env, cwd=tmp_path)
    try:
        assert first.execute("x = 'genuine'").status == "ok"
        assert first.execute("%capsule log -n 1").status == "ok"  # recorded
        planted = first.execute(PLANT)
        assert planted.status == "ok", planted.texts()
        assert "999.frame" in planted.result_text
        first.kc.stop_channels()
        os.kill(kernel_pid(first), signal.SIGKILL)
        wait_until(lambda: not first.km.is_alive(), what="the kernel to die")
    finally:
        first.close()
    second = start_kernel(env=env, cwd=tmp_path)
    try:
        resumed = second.execute("%capsule resume", timeout=120)  # returns: no FIFO held it
        assert resumed.status == "ok", resumed.texts()
        state = second.execute("x, 'planted' in dir()")
        assert state.result_text == "('genuine', False)"
        # Nothing of the planted entries became a checkpoint row.
        with sqlite3.connect(home / "capsule.sqlite") as db:
            counts = {row[0] for row in db.execute("SELECT execution_count FROM checkpoints WHERE session = 'planted'")}
        assert not counts & {995, 996, 997, 999}, counts
        # The 1 GiB file was refused by its size, not read: the kernel's memory stayed small.
        rss_kib = int(status_field(kernel_pid(second), "VmHWM").split()[0])
        assert rss_kib < 400 * 1024, rss_kib
        # The refusals are said in the notebook, with the first cell that runs code.
        shown = state.texts()
        assert "not believed" in shown and "never ran" in shown and "999" in shown, shown
        # The dead kernel's spool is gone: nothing planted lingers for a later kernel.
        # (The second kernel's own spool may hold a journal of its own cells meanwhile.)
        own = f"capsule-{kernel_pid(second)}-"
        assert not [
            p for p in (home / "spool").glob("capsule-*") if (p / "journal").exists() and not p.name.startswith(own)
        ]
    finally:
        second.close()


LINK_JOURNAL = r"""
import os, shutil
from pathlib import Path
from capsule_kernel.inside import snapshot
from capsule_kernel.protocol import frames
spool = Path("/run/capsule/spool")
elsewhere = Path({elsewhere!r})  # stands for another notebook's journal: a directory outside this spool
elsewhere.mkdir()
# Well-formed snapshots of the cells to come (the one after next runs when the kernel dies), chunks in the spool.
made = snapshot.take({{"leaked": "through the link"}}, ["leaked"], {{}}, spool, durable=False)
for count in range(get_ipython().execution_count, get_ipython().execution_count + 4):
    (elsewhere / f"{{count}}.frame").write_bytes(frames.encode(
        {{"type": "snapshot", "execution_count": count, "entries": made["entries"], "removed": [], "written": 0}}))
(elsewhere / "1.frame").write_bytes(b"an entry of someone else's, to be left alone")
shutil.rmtree(spool / frames.JOURNAL_DIR, ignore_errors=True)
os.symlink(elsewhere, spool / frames.JOURNAL_DIR)
"""


def test_a_journal_directory_swapped_for_a_link_is_never_followed(tmp_path):
    """The kernel lists, reads and prunes the journal through a descriptor opened without following links.

    A cell replaces the journal directory by a link to a directory outside
    its spool, holding a snapshot of a cell that will be pending when the
    kernel dies and an entry the live kernel's pruning would delete. Fails
    when the journal is reached by path (checked: the live kernel deleted
    the other directory's 1.frame as it recorded the cell).
    """
    home = tmp_path / "home"
    env = {"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "linked-journal"}
    elsewhere = tmp_path / "elsewhere"
    first = start_kernel(env=env, cwd=tmp_path)
    try:
        assert first.execute("x = 'genuine'").status == "ok"
        planted = first.execute(LINK_JOURNAL.format(elsewhere=str(elsewhere)))
        assert planted.status == "ok", planted.texts()
        assert first.execute("%capsule log -n 1").status == "ok"  # the planting cell is recorded (and pruned)
        long_id = first.kc.execute("import time\nprint('running', flush=True)\ntime.sleep(60)")
        wait_until(lambda: first.printed(long_id, "running"), what="the long cell to run")
        first.kc.stop_channels()
        os.kill(kernel_pid(first), signal.SIGKILL)
        wait_until(lambda: not first.km.is_alive(), what="the kernel to die")
    finally:
        first.close()
    assert (elsewhere / "1.frame").exists(), "the live kernel pruned a journal it reached through a link"
    second = start_kernel(env=env, cwd=tmp_path)
    try:
        resumed = second.execute("%capsule resume", timeout=120)
        assert resumed.status == "ok", resumed.texts()
        assert second.execute("x, 'leaked' in dir()").result_text == "('genuine', False)"
    finally:
        second.close()
    assert (elsewhere / "1.frame").exists(), "the next kernel pruned a journal it reached through a link"


def test_a_cell_that_ignores_interrupts_does_not_outlive_its_dead_kernel_past_the_keepers_bound(tmp_path):
    """The sandbox may outlive its kernel to finish a snapshot, not to go on running a cell."""
    from capsule_kernel.kernel.sandbox.launch import KEEPER_LINGER_SECONDS

    kernel = start_kernel(env={"CAPSULE_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    try:
        worker = kernel.sandbox_pid()
        kernel.kc.execute(
            "import signal, subprocess\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"  # an orphan, in its own session
            "print('spinning', flush=True)\n"
            "while True: pass"
        )
        wait_until(lambda: status_field(worker, "State").startswith("R"), what="the cell to spin")
        kernel.kc.stop_channels()
        os.kill(kernel_pid(kernel), signal.SIGKILL)
        wait_until(lambda: not kernel.km.is_alive(), what="the kernel to die")
        left = processes_of_uid_in_cgroup_of(worker)
        assert Path(f"/proc/{worker}").exists()  # still there right after the kernel's death ...
        wait_until(
            lambda: not Path(f"/proc/{worker}").exists() and not any(Path(f"/proc/{p}").exists() for p in left),
            timeout=KEEPER_LINGER_SECONDS + 15,
            what="the keeper to end the sandbox",
        )  # ... and gone, with the orphan it started, once the keeper's bound has passed
    finally:
        kernel.close()


def processes_of_uid_in_cgroup_of(pid: int) -> list[int]:
    """Every process sharing the worker's cgroup (the sandbox's): the orphan included."""
    line = next(entry for entry in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if "capsule" in entry)
    group = line.split(":", 2)[2]
    for root in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")):
        procs = root / group.lstrip("/") / "cgroup.procs"
        if procs.exists():
            return [int(p) for p in procs.read_text().split()]
    return [pid]


# -- the crash dump in the spool ---------------------------------------------------------


@pytest.mark.parametrize("plant", ["symlink", "fifo", "huge"])
def test_a_planted_crash_dump_shows_no_host_file_and_stays_bounded(fresh_kernel, tmp_path, plant):
    """The kernel reads the dead worker's crash.txt from the spool: never through a link, never a FIFO, capped.

    Fails when the dump is opened without O_NOFOLLOW (checked: the secret line
    was shown in the crash summary and in %capsule status --last-crash).
    """
    secret = tmp_path.parent / f"host-secret-{plant}.txt"  # outside the sandbox's view
    secret.write_text("HOST-SECRET-LINE\n")
    kernel = fresh_kernel()
    kernel.execute("kept = 1")
    assert kernel.execute("%capsule log -n 1").status == "ok"
    pid = kernel_pid(kernel)
    before = int(status_field(pid, "VmRSS").split()[0])
    planting = {
        "symlink": f"os.symlink({str(secret)!r}, crash)",
        "fifo": "os.mkfifo(crash)",
        "huge": "with open(crash, 'w') as f:\n    f.write('Fatal Python error: x\\n' + '  File \"a\"\\n' * 10_000_000)",
    }[plant]
    result = kernel.execute(
        "import os\ncrash = '/run/capsule/spool/crash.txt'\nos.unlink(crash)\n" + planting + "\nos.abort()"
    )
    assert result.status == "error" and result.content["ename"] == "SandboxDied"
    shown = result.texts() + kernel.execute("%capsule status --last-crash").texts()
    assert "HOST-SECRET-LINE" not in shown
    after = int(status_field(pid, "VmRSS").split()[0])
    assert after - before < 64 * 1024, "the kernel read the planted dump whole"
    assert kernel.execute("kept").result_text == "1"
