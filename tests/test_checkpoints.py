"""Checkpoints after every cell, and what a crash gives back."""

from __future__ import annotations

import base64
import json
import os
import re
import sqlite3
import threading
from pathlib import Path

import pytest

from tests.harness import wait_until


def settle(kernel):
    """Wait until every cell so far has its checkpoint (%capsule log waits for that).

    Snapshots land after the reply; tests of what a checkpoint holds let it
    land first.
    """
    assert kernel.execute("%capsule log -n 1").status == "ok"


def crash(kernel, *, settled=True):
    if settled:
        settle(kernel)
    result = kernel.execute("import os\nos._exit(1)")
    assert result.content["ename"] == "SandboxDied"
    return result.content["evalue"]


def crash_holding_a_snapshot(kernel, worker: int, gate: Path) -> str:
    """Crash the sandbox while a snapshot child waits on `gate`; open the gate once the worker is gone."""

    def release_once_the_sandbox_is_gone() -> None:
        wait_until(lambda: not Path(f"/proc/{worker}").exists(), what="the sandbox to die")
        gate.touch()

    releaser = threading.Thread(target=release_once_the_sandbox_is_gone)
    releaser.start()
    try:
        return crash(kernel, settled=False)
    finally:
        gate.touch()
        releaser.join()


def latest_written(home: Path) -> int:
    with sqlite3.connect(home / "capsule.sqlite") as db:
        return db.execute("SELECT written FROM checkpoints ORDER BY created DESC LIMIT 1").fetchone()[0]


def checkpoint_count(home: Path) -> int:
    with sqlite3.connect(home / "capsule.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0]


@pytest.fixture
def home(tmp_path):
    return tmp_path / "capsule-home"


def test_functions_classes_and_lambdas_survive_a_crash(fresh_kernel, home):
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home)})
    kernel.execute(
        "import math\n"
        "def area(r):\n    return math.pi * r * r\n"
        "class Point:\n    def __init__(self, x):\n        self.x = x\n"
        "double = lambda v: 2 * v\n"
        "p = Point(4)"
    )
    assert "was restored" in crash(kernel)
    assert kernel.execute("round(area(1), 2), double(p.x), type(p).__name__").result_text == "(3.14, 8, 'Point')"


def test_restored_functions_read_and_change_the_notebooks_globals(fresh_kernel, home):
    """After a crash a function's globals are the notebook's, not a private copy saved with it."""
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home)})
    kernel.execute(
        "counter = [0]\nlimit = 10\n"
        "def bump():\n    counter[0] += 1\n    return counter[0]\n"
        "class Tally:\n    def add(self):\n        counter.append('t')\n"
        "hook = lambda: counter.append('hook')"
    )
    assert "was restored" in crash(kernel)
    result = kernel.execute("bump(); Tally().add(); hook(); limit = 20\n(counter, bump.__globals__ is globals())")
    assert result.result_text == "([1, 't', 'hook'], True)"
    # A global rebound after the restore is what the function sees.
    assert kernel.execute("def over():\n    return limit\nover(), (lambda: limit)()").result_text == "(20, 20)"


def test_a_matplotlib_figure_and_an_empty_array_survive_a_crash(fresh_kernel, home):
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home)})
    kernel.execute(
        "import matplotlib\nmatplotlib.use('agg')\nimport matplotlib.pyplot as plt\nimport numpy as np\n"
        "fig, ax = plt.subplots()\nax.plot([1, 2, 3])\nnothing = np.zeros(0)\nplt.close(fig)"
    )
    evalue = crash(kernel)
    assert "not restored" not in evalue, evalue
    assert kernel.execute("len(ax.lines), nothing.shape").result_text == "(1, (0,))"


def test_in_place_mutation_is_saved(fresh_kernel, home):
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home)})
    kernel.execute("items = [1]")
    kernel.execute("items.append(2)")
    kernel.execute("def add():\n    items.append(3)")
    kernel.execute("add()  # mutates items without naming it")
    crash(kernel)
    assert kernel.execute("items").result_text == "[1, 2, 3]"


def test_deleted_names_stay_deleted(fresh_kernel, home):
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home)})
    kernel.execute("temporary = 1\nkept = 2")
    kernel.execute("del temporary")
    crash(kernel)
    assert kernel.execute("'temporary' in dir(), kept").result_text == "(False, 2)"


# Pickling `slow` blocks until the flag file exists: it holds a snapshot in flight.
HELD_SNAPSHOT = """
import os, time
class Slow:
    def __reduce__(self):
        deadline = time.monotonic() + 60
        while not os.path.exists({flag!r}) and time.monotonic() < deadline:
            time.sleep(0.01)
        return (str, ("released",))
slow = Slow()
temporary = 1
kept = 2
"""


def test_a_deletion_holds_when_the_sandbox_dies_before_its_snapshot_learns_the_last_one(fresh_kernel, home, tmp_path):
    """The snapshot of `del temporary` waits for the one before it; then the sandbox dies.

    It never learns what its predecessor saved, so it must save a whole
    namespace, and be recorded after its predecessor: else `temporary`
    comes back after the crash.
    """
    flag = tmp_path / "release"
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home)})
    worker = kernel.sandbox_pid()
    kernel.execute(HELD_SNAPSHOT.format(flag=str(flag)))
    kernel.execute("del temporary")  # short, with a snapshot running: deferred
    # A request that is not a cell makes the worker take the deferred snapshot now: chained to the held one.
    assert kernel.request("complete", "kep", 3)["content"]["status"] == "ok"
    crash_holding_a_snapshot(kernel, worker, flag)
    assert kernel.execute("'temporary' in dir(), kept, slow").result_text == "(False, 2, 'released')"
    log = kernel.execute("%capsule log").texts()
    assert "del temporary" in log


def test_unpicklable_values_are_named_with_the_reason(fresh_kernel, home):
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home)})
    kernel.execute("numbers = (i for i in range(3))\nimport threading\nguard = threading.Lock()\nfine = 'yes'")
    log = kernel.execute("%capsule log").texts()
    assert "numbers: TypeError" in log and "generator" in log
    assert "guard: TypeError" in log
    evalue = crash(kernel)
    assert "not restored:" in evalue and "numbers (ValueError: it was not saved: TypeError" in evalue
    assert kernel.execute("fine").result_text == "'yes'"


def test_unchanged_buffers_are_not_stored_again(fresh_kernel, home):
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home)})
    kernel.execute("big = bytes(range(256)) * (64 * 1024)  # 16 MiB")
    wait_until(lambda: checkpoint_count(home) >= 1, what="the first checkpoint")
    assert latest_written(home) >= 16 * 1024 * 1024
    kernel.execute("small = 1")
    wait_until(lambda: checkpoint_count(home) >= 2, what="the second checkpoint")
    assert latest_written(home) < 1024 * 1024
    crash(kernel)
    assert kernel.execute("len(big), small").result_text == f"({16 * 1024 * 1024}, 1)"


def test_a_corrupt_chunk_loses_only_its_value(fresh_kernel, home):
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home)})
    kernel.execute("precious = 'x' * 100000\nother = 'fine'")
    wait_until(lambda: checkpoint_count(home) >= 1, what="the first checkpoint")
    # The store is the kernel's: read on the host (a cell cannot see it).
    with sqlite3.connect(home / "capsule.sqlite") as db:
        row = db.execute("SELECT entries FROM checkpoints ORDER BY seq DESC LIMIT 1").fetchone()
    digest = json.loads(row[0])["precious"]["pickle"][0]
    chunk = home / "chunks" / digest[:2] / digest
    chunk.chmod(0o644)
    chunk.write_bytes(b"garbage")
    evalue = crash(kernel)
    assert "precious (ChunkError: chunk" in evalue and "corrupt" in evalue
    assert kernel.execute("other").result_text == "'fine'"
    assert kernel.execute("'precious' in dir()").result_text == "False"


def test_log_lists_checkpoints(fresh_kernel, home):
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "log-test"})
    kernel.execute("a = 1")
    kernel.execute("b = [a, 2]")
    wait_until(lambda: checkpoint_count(home) >= 2, what="two checkpoints")
    text = kernel.execute("%capsule log").texts()
    assert "Checkpoints of session log-test" in text
    lines = [line for line in text.splitlines() if line.startswith("[")]
    assert lines[0].split()[0] == "[1]" and " a " in f" {lines[0]} "
    assert lines[1].split()[0] == "[2]" and "b = [a, 2]" in lines[1]
    assert kernel.execute("%capsule log -n 0").status == "error"
    status = kernel.execute("%capsule status").texts()
    assert "log-test (CAPSULE_SESSION)" in status and "last after cell [2]" in status


def test_checkpoints_can_be_switched_off(fresh_kernel, home):
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home), "CAPSULE_CHECKPOINTS": "off"})
    kernel.execute("x = 1")
    assert "Checkpoints are off" in kernel.execute("%capsule log").texts()
    assert "checkpoints are off" in crash(kernel)
    assert not (home / "capsule.sqlite").exists()


def test_snapshot_in_flight_lands_even_if_the_sandbox_dies(fresh_kernel, home):
    """The cell right before a crash is not lost: its snapshot reports on its own pipe."""
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home)})
    kernel.kc.execute("last_words = 'saved'")
    result = kernel.execute("import os\nos._exit(2)")
    assert "was restored" in result.content["evalue"]
    assert kernel.execute("last_words").result_text == "'saved'"
    assert os.path.exists(home / "capsule.sqlite")


def test_restore_back_and_forth(fresh_kernel, home):
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "travel"})
    first = kernel.execute("stage = 'one'\nfirst_only = True")
    kernel.execute("stage = 'two'\ndel first_only")
    third = kernel.execute("stage = 'three'\nlater = [1, 2]")
    back = kernel.execute(f"%capsule restore {first.content['execution_count']}")
    assert back.status == "ok", back.texts()
    assert "Removed (created later): later" in back.texts()
    assert kernel.execute("stage, first_only, 'later' in dir()").result_text == "('one', True, False)"
    # Forward again, by checkpoint id prefix this time.
    log = kernel.execute("%capsule log").texts()
    third_row = next(line for line in log.splitlines() if line.startswith(f"[{third.content['execution_count']}]"))
    assert "restored" in log
    kernel.execute(f"%capsule restore {third_row.split()[1]}")
    assert kernel.execute("stage, later, 'first_only' in dir()").result_text == "('three', [1, 2], False)"
    # Work goes on from the restored state and is checkpointed as usual.
    kernel.execute("stage = 'four'")
    crash(kernel)
    assert kernel.execute("stage, later").result_text == "('four', [1, 2])"


def test_names_bound_to_one_object_come_back_as_one_object(fresh_kernel, home):
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "aliases"})
    kernel.execute("import numpy as np\nrows = [np.zeros(300_000)]\nsame = rows")
    # Changed through the alias only: the target's checkpoint must follow.
    shared = kernel.execute("same.append(np.ones(300_000))").content["execution_count"]
    crash(kernel)
    assert kernel.execute("same is rows, len(rows)").result_text == "(True, 2)"
    # Rebinding the target ends the alias; the old object stays with the other name.
    split = kernel.execute("rows = [1]").content["execution_count"]
    crash(kernel)
    assert kernel.execute("rows, len(same)").result_text == "([1], 2)"
    text = kernel.execute(f"%capsule diff {shared} {split}").texts()
    changed = {line.split()[1] for line in text.splitlines() if line.split()[:1] == ["changed"]}
    assert changed == {"rows"}, text  # same holds what it held, alias or not
    # Time travel keeps identity too.
    kernel.execute(f"%capsule restore {shared}")
    assert kernel.execute("same is rows, len(rows)").result_text == "(True, 2)"


def test_restore_wrong_arguments_change_nothing(fresh_kernel, home):
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home)})
    kernel.execute("value = 1")
    for code, message in [
        ("%capsule restore 999", "no checkpoint '999'"),
        ("%capsule restore", "the following arguments are required: N"),
        ("%capsule restore zzz", "no checkpoint 'zzz'"),
    ]:
        result = kernel.execute(code)
        assert result.status == "error" and message in result.content["evalue"], result.content["evalue"]
        assert "\n" not in result.content["evalue"]
    inside = kernel.execute("x = 2\n%capsule restore 1")
    assert inside.status == "error" and "cell of its own" in inside.content["evalue"]
    assert kernel.execute("value").result_text == "1"


def test_a_count_that_names_two_checkpoints_restores_nothing_and_lists_them(fresh_kernel, home):
    """After a second kernel in the same session, [1] names two checkpoints: say so, never pick one silently."""
    env = {"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "twice.ipynb"}
    first = fresh_kernel(env=env)
    first.execute("old = 'first kernel'")
    assert first.execute("%capsule log").status == "ok"  # its checkpoint is recorded
    first.close()
    second = fresh_kernel(env=env)
    assert second.execute("new = 'second kernel'").content["execution_count"] == 1
    log = second.execute("%capsule log").texts()
    assert len(re.findall(r"^\[1\]", log, re.MULTILINE)) == 2, log
    assert re.search(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", log), "the time column has no date"
    result = second.execute("%capsule restore 1")
    assert result.status == "error" and "names 2 checkpoints" in result.content["evalue"], result.content
    ids = [line.split()[1] for line in log.splitlines() if line.startswith("[1]")]
    assert all(checkpoint in result.content["evalue"] for checkpoint in ids)
    assert second.execute("new").result_text == "'second kernel'"  # nothing was restored
    by_id = second.execute(f"%capsule restore {ids[0]}")
    assert by_id.status == "ok", by_id.texts()
    assert second.execute("old").result_text == "'first kernel'"


def test_diff_between_checkpoints(fresh_kernel, home):
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home)})
    a = kernel.execute("keep = 1\nchange = [1, 2]\ndrop = 'x'").content["execution_count"]
    b = kernel.execute("change.append(3)\ndel drop\nnew = {'k': 1}").content["execution_count"]
    text = kernel.execute(f"%capsule diff {a} {b}").texts()
    rows = {
        line.split()[1]: line
        for line in text.splitlines()
        if line.split() and line.split()[0] in ("added", "removed", "changed")
    }
    assert set(rows) == {"change", "drop", "new"}
    assert rows["change"].startswith("changed") and "len=2" in rows["change"] and "len=3" in rows["change"]
    assert rows["drop"].startswith("removed") and rows["new"].startswith("added")
    assert "keep" not in rows
    assert "no differences" in kernel.execute(f"%capsule diff {a} {a}").texts()
    assert kernel.execute("%capsule diff 1").status == "error"


def _kill_kernel(kernel) -> None:
    import signal

    kernel.kc.stop_channels()
    os.kill(kernel.km.provisioner.process.pid, signal.SIGKILL)
    wait_until(lambda: not kernel.km.is_alive(), what="the kernel to die")


def test_resume_after_the_kernel_dies(fresh_kernel, home):
    env = {"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "analysis.ipynb"}
    first = fresh_kernel(env=env)
    first.execute("import math\nresult = math.sqrt(16)\nnotes = ['kept']")
    last = first.execute("notes.append('also kept')").content["execution_count"]
    first.execute("%capsule log")  # waits for the last checkpoint to be recorded
    _kill_kernel(first)

    second = fresh_kernel(env=env)
    offer = second.execute("1 + 1")
    # A quiet note (stdout), not a warning; once per kernel.
    assert "%capsule resume" in offer.stdout and f"after cell [{last}]" in offer.stdout
    assert "earlier kernel" not in offer.stderr
    assert "earlier kernel" not in second.execute("2 + 2").texts()
    resumed = second.execute("%capsule resume")
    assert resumed.status == "ok" and "Resumed session analysis.ipynb" in resumed.texts()
    after = second.execute("result, notes")
    assert after.result_text == "(4.0, ['kept', 'also kept'])"
    assert after.content["execution_count"] > last


def test_auto_resume_from_capsule_toml(fresh_kernel, home, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "capsule.toml").write_text("auto_resume = true\n")
    env = {"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "auto"}
    first = fresh_kernel(env=env, cwd=project)
    first.execute("carried = 'over'")
    first.execute("%capsule log")
    _kill_kernel(first)
    second = fresh_kernel(env=env, cwd=project)
    result = second.execute("carried")
    assert result.result_text == "'over'", result.texts()
    assert "Resumed session auto" in result.stderr


def test_session_can_be_named_at_run_time(fresh_kernel, home):
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home)})
    kernel.execute("before = 1")
    assert "Checkpoints now go to session renamed" in kernel.execute("%capsule session renamed").texts()
    kernel.execute("after = 2")
    assert "renamed (%capsule session)" in kernel.execute("%capsule session").texts()
    log = kernel.execute("%capsule log").texts()
    assert "Checkpoints of session renamed" in log
    _kill_kernel(kernel)
    again = fresh_kernel(env={"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "renamed"})
    # Another notebook (a fresh id) wrote it after switching in: only its id brings it back.
    refused = again.execute("%capsule resume")
    assert refused.status == "error" and "written by notebook session-" in refused.content["evalue"]
    checkpoint_id = re.search(r"%capsule resume ([0-9a-f]{12})", refused.content["evalue"]).group(1)
    again.execute(f"%capsule resume {checkpoint_id}")
    assert again.execute("before, after").result_text == "(1, 2)"


def test_vscode_notebook_path_names_the_session(fresh_kernel, home):
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home)})
    kernel.execute("__vsc_ipynb_file__ = '/work/report.ipynb'", silent=True)
    kernel.execute("x = 1")
    assert "/work/report.ipynb (__vsc_ipynb_file__" in kernel.execute("%capsule status").texts()


def test_retention_and_gc(fresh_kernel, home, tmp_path):
    project = tmp_path / "gc-project"
    project.mkdir()
    (project / "capsule.toml").write_text('[checkpoints]\nkeep = 2\ngc_grace = "1ms"\n')
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "gc"}, cwd=project)
    for i in range(4):
        kernel.execute(f"import os\nblob = os.urandom(2 * 1024 * 1024)\nround_ = {i}")
        settle(kernel)  # a checkpoint per round (back to back they would coalesce)
    log = kernel.execute("%capsule log").texts()
    assert len([line for line in log.splitlines() if line.startswith("[")]) == 2
    report = kernel.execute("%capsule gc").texts()
    assert "dropped 0 checkpoints beyond the newest 2" in report
    freed_mib = float(report.split("Freed ")[1].split(" MiB")[0])
    assert freed_mib >= 3.9  # the two oldest blobs
    assert "Freed 0 B" in kernel.execute("%capsule gc").texts()
    crash(kernel)
    assert kernel.execute("round_, len(blob)").result_text == f"(3, {2 * 1024 * 1024})"


def promises_in(db: Path, session: str) -> dict[int, object]:
    """Replay a promise journal (a kernel's capsule.sqlite, or the test server's), as a later kernel would."""
    from capsule_kernel.kernel.checkpoint.promises import JournaledLocalConnection

    connection = JournaledLocalConnection(db)
    try:
        return {
            int(p.tags["capsule.cell"]): p
            for p in connection.state.promises.values()
            if (p.tags or {}).get("capsule.session") == session
        }
    finally:
        connection.close()


def promise_value(promise) -> dict:
    """A settled promise's value as the kernel encoded it (JSON, base64)."""
    return json.loads(base64.b64decode(promise.value["data"]))


def test_every_cell_is_a_durable_promise(fresh_kernel, home):
    env = {"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "promised"}
    kernel = fresh_kernel(env=env)
    good = kernel.execute("answer = 42").content["execution_count"]
    same = kernel.execute("answer").content["execution_count"]
    bad = kernel.execute("1/0").content["execution_count"]
    kernel.execute("%capsule log")  # settles checkpoints and promises
    promises = promises_in(home / "capsule.sqlite", "promised")

    assert promises[good].state == "resolved"
    assert promise_value(promises[good])["checkpoint"]
    assert json.loads(base64.b64decode(promises[good].param["data"]))["sandbox"] == "subprocess"
    assert promises[same].state == "resolved" and promise_value(promises[same])["changed"] is False
    assert promise_value(promises[same])["outputs"].get("execute_result") == 1
    assert promises[bad].state == "rejected" and promise_value(promises[bad])["ename"] == "ZeroDivisionError"


def test_a_cell_running_when_the_kernel_dies_shows_as_interrupted(fresh_kernel, home):
    env = {"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "interrupted-session"}
    first = fresh_kernel(env=env)
    first.execute("done_before = 1")
    # Settle its checkpoint and promise first: the window right after a reply is another test's matter.
    first.execute("%capsule log")
    log = die_in_a_long_cell_and_read_the_next_log(first, fresh_kernel, env)
    assert any(line.startswith("[1]") and " ok " in f" {line} " for line in log.splitlines())


def die_in_a_long_cell_and_read_the_next_log(first, fresh_kernel, env) -> str:
    """Kill -9 the kernel mid-cell; a new kernel's %capsule log must show that cell interrupted."""
    msg_id = first.kc.execute("import time\nprint('working', flush=True)\ntime.sleep(120)")
    wait_until(lambda: _saw_stream(first, msg_id, "working"), what="the long cell to start")
    _kill_kernel(first)
    log = fresh_kernel(env=env).execute("%capsule log").texts()
    row = next(line for line in log.splitlines() if line.startswith("[") and " interrupted " in f" {line} ")
    assert "import time" in row
    return log


def _saw_stream(kernel, msg_id, text) -> bool:
    import queue

    try:
        msg = kernel.kc.get_iopub_msg(timeout=0.1)
    except queue.Empty:
        return False
    if msg["parent_header"].get("msg_id") != msg_id or msg["msg_type"] != "stream":
        return False
    return text in msg["content"]["text"]


GATE = '''
import os, time
class Gate:
    """Pickling waits for a file: holds its snapshot child in flight until the test opens it."""
    def __init__(self, path):
        self.path = path
    def __reduce__(self):
        deadline = time.monotonic() + 60
        while not os.path.exists(self.path) and time.monotonic() < deadline:
            time.sleep(0.01)
        return (Gate, (self.path,))
gate = Gate(GATE_PATH)
'''


def test_next_cells_reply_while_a_snapshot_is_still_running(fresh_kernel, home, tmp_path):
    """Cells that end while a slow snapshot runs reply at once, and each still gets a checkpoint of its own.

    Their snapshots are chained behind the slow one (each plans against the
    digests of the one before), so a crash during the next long cell loses
    none of them and every one of them can be restored.
    """
    release = tmp_path / "release"
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "chain"})
    kernel.execute(f"GATE_PATH = {str(release)!r}")
    settle(kernel)
    gated = kernel.execute(GATE)
    assert gated.status == "ok", gated.texts()
    # The snapshot of that cell is stuck in pickling `gate` until `release` exists.
    second = kernel.execute("after_gate = 1\ndel GATE_PATH", timeout=30)
    third = kernel.execute("after_gate += 1", timeout=30)
    assert second.status == third.status == "ok"
    assert not release.exists()  # so the replies above came while the snapshot was in flight
    release.touch()
    log = kernel.execute("%capsule log").texts()
    rows = {line.split()[0]: line for line in log.splitlines() if line.startswith("[")}
    assert "gate" in rows[f"[{gated.content['execution_count']}]"]
    # Each chained snapshot saved only what its own cell changed.
    for cell in (second, third):
        row = rows[f"[{cell.content['execution_count']}]"].split()
        assert "after_gate" in row and "gate" not in row and "Gate," not in row, log
    back = kernel.execute(f"%capsule restore {second.content['execution_count']}")
    assert back.status == "ok", back.texts()
    assert kernel.execute("after_gate, 'GATE_PATH' in dir(), type(gate).__name__").result_text == "(1, False, 'Gate')"
    forward = kernel.execute(f"%capsule restore {third.content['execution_count']}")
    assert forward.status == "ok", forward.texts()
    assert kernel.execute("after_gate, 'GATE_PATH' in dir()").result_text == "(2, False)"


def test_a_crash_names_the_coalesced_cells_it_lost(fresh_kernel, home, tmp_path):
    """Cells deferred into a coalesced snapshot that never came are named, and exactly those are lost."""
    project = tmp_path / "project"
    project.mkdir()
    release = project / "release"  # inside the working directory: the sandbox sees it
    # Deferred cells wait for the idle worker (or a minute): the crash comes first, whatever this machine's pace.
    (project / "capsule.toml").write_text('[checkpoints]\ncoalesce = "60s"\n')
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "lost"}, cwd=project)
    worker = kernel.sandbox_pid()
    kernel.execute(f"GATE_PATH = {str(release)!r}\nkept = 1")
    settle(kernel)  # so the gated cell is snapshotted on its own, not deferred
    kernel.execute(GATE)
    first = kernel.execute("kept = 2  # first deferred")
    second = kernel.execute("extra = 3  # second deferred")
    assert not release.exists()
    evalue = crash_holding_a_snapshot(kernel, worker, release)
    counts = (first.content["execution_count"], second.content["execution_count"])
    assert f"[{counts[0]}] 'kept = 2  # first deferred'" in evalue, evalue
    assert f"[{counts[1]}] 'extra = 3  # second deferred'" in evalue, evalue
    assert "run them again" in evalue
    # The gated cell's checkpoint landed (after the worker died); the deferred cells' state is what is missing.
    assert kernel.execute("kept, 'extra' in dir(), type(gate).__name__").result_text == "(1, False, 'Gate')"


def test_a_cell_that_fails_after_deferred_cells_is_not_saved_under_their_name(fresh_kernel, home, tmp_path):
    """Coalescing on: a failed cell changed x before it stopped; no checkpoint named after a deferred cell holds that.

    Fails without Snapshotter.abandon (checked: the idle worker's coalesced
    snapshot, named after `x = 2`, restored x == 99).
    """
    project = tmp_path / "project"
    project.mkdir()
    release = project / "release"
    (project / "capsule.toml").write_text('[checkpoints]\ncoalesce = "60s"\n')
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "failed-after"}, cwd=project)
    kernel.execute(f"GATE_PATH = {str(release)!r}\nx = 0")
    settle(kernel)
    kernel.execute(GATE)  # its snapshot is held: the next short cells are deferred
    counts = [kernel.execute(f"x = {value}").content["execution_count"] for value in (1, 2)]
    failed = kernel.execute("x = 99\nraise ValueError('partial')")
    assert failed.status == "error"
    release.touch()
    settle(kernel)
    after = kernel.execute("y = 1")
    settle(kernel)
    for count, value in zip(counts, (1, 2), strict=True):
        back = kernel.execute(f"%capsule restore {count}")
        if "no checkpoint" not in back.texts():
            assert kernel.execute("x").result_text == str(value), (count, back.texts())
    # The next cell that completed holds what the failed one left, as ipykernel's namespace does.
    back = kernel.execute(f"%capsule restore {after.content['execution_count']}")
    assert back.status == "ok" and "no checkpoint" not in back.texts(), back.texts()
    assert kernel.execute("x, y").result_text == "(99, 1)"


def test_modules_and_notebook_classes_are_not_saved_again_when_unchanged(fresh_kernel, home):
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "stable"})
    kernel.execute("import os\nclass Point:\n    pass\norigin = Point()\nitems = [Point(), Point()]")
    settle(kernel)
    later = kernel.execute("x = 1")
    settle(kernel)  # each its own checkpoint, as at a person's pace
    last = kernel.execute("y = 2")
    log = kernel.execute("%capsule log").texts()
    row = next(line for line in log.splitlines() if line.startswith(f"[{later.content['execution_count']}]"))
    changed = row.split()[row.split().index("1") + 1]  # the column after the first line "x = 1"
    assert changed == "x", row
    assert kernel.execute(f"%capsule diff 1 {last.content['execution_count']}").texts().count("changed") == 0


def test_many_cells_back_to_back_all_get_their_checkpoint(fresh_kernel, home):
    """Cells sent without waiting, each changing a few MB: every one is its own checkpoint, none is lost."""
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "burst"})
    kernel.execute("blob = bytearray(64 * 1024 * 1024)\nstep = 0")
    for _ in range(12):
        kernel.kc.execute("step += 1\nblob[step] = step")
    log = kernel.execute("%capsule log -n 20", timeout=120)
    assert log.status == "ok"
    counts = [int(line.split()[0][1:-1]) for line in log.texts().splitlines() if line.startswith("[")]
    assert counts == list(range(1, 14)), log.texts()
    crash(kernel, settled=False)  # %capsule log above waited for every snapshot
    assert kernel.execute("step, blob[12], blob[13]").result_text == "(12, 12, 0)"


def test_a_cell_outside_history_and_the_deferred_cell_after_it_share_a_count_without_a_violation(
    fresh_kernel, home, tmp_path
):
    """store_history=False reuses the next count: its snapshot's report must not use up the deferred cell's."""
    release = tmp_path / "release"
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "shared-count"})
    kernel.execute(f"GATE_PATH = {str(release)!r}\n" + GATE.replace("gate = Gate(GATE_PATH)", ""))
    settle(kernel)
    worker = kernel.sandbox_pid()
    quiet = kernel.execute("gate = Gate(GATE_PATH)", store_history=False)  # snapshotted at once, held by the gate
    stored = kernel.execute("after = 2")  # the same count, short, a snapshot running: deferred
    assert quiet.status == stored.status == "ok"
    release.touch()  # the quiet cell's report lands, then the deferred cell's coalesced snapshot starts
    log = kernel.execute("%capsule log")
    assert log.status == "ok", log.texts()
    assert kernel.sandbox_pid() == worker  # no "broke the protocol": the same sandbox
    crash(kernel)
    assert kernel.execute("after, type(gate).__name__").result_text == "(2, 'Gate')"


def test_a_clean_shutdown_keeps_the_deferred_cells(fresh_kernel, home, tmp_path):
    """Cells deferred behind a running snapshot get their coalesced snapshot when the kernel shuts down.

    Without it a batch run (or a closed notebook) lost its last cells at a
    clean shutdown: the worker stopped before taking their snapshot.
    """
    release = tmp_path / "release"
    env = {"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "closed.ipynb"}
    first = fresh_kernel(env=env)
    first.execute(f"GATE_PATH = {str(release)!r}")
    settle(first)  # so the gated cell is snapshotted on its own, not deferred
    first.execute(GATE)
    last = first.execute("after_gate = 41\nafter_gate += 1")  # deferred behind the gated snapshot
    first.kc.stop_channels()
    first.km.request_shutdown()
    release.touch()
    first.km.finish_shutdown()
    assert not first.km.is_alive()

    second = fresh_kernel(env=env)
    resumed = second.execute("%capsule resume")
    assert f"after cell [{last.content['execution_count']}]" in resumed.texts(), resumed.texts()
    assert second.execute("after_gate, type(gate).__name__").result_text == "(42, 'Gate')"


def test_every_cell_sent_back_to_back_can_be_restored_and_forward_again(fresh_kernel, home):
    """An agent's undo: each cell sent as soon as the reply before it came is a checkpoint of its own."""
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "undo"})
    cells = ["x = 1; items = ['a']", "x = 2; items.append('b')", "x = 3; del items", "x = 4; items = list('xyz')"]
    counts = []
    for code in cells:
        msg_id = kernel.kc.execute(code)
        reply = kernel.shell_reply(msg_id, timeout=60)["content"]  # the next goes out as soon as this comes
        assert reply["status"] == "ok", reply
        counts.append(reply["execution_count"])
    log = kernel.execute("%capsule log", timeout=120).texts()
    listed = {int(line.split()[0][1:-1]) for line in log.splitlines() if line.startswith("[")}
    assert set(counts) <= listed, log
    expected = ["(1, ['a'])", "(2, ['a', 'b'])", "(3, None)", "(4, ['x', 'y', 'z'])"]
    for order in (range(4), reversed(range(4))):  # back in time, then forward again
        for index in order:
            back = kernel.execute(f"%capsule restore {counts[index]}")
            assert back.status == "ok" and "no checkpoint" not in back.texts(), back.texts()
            shown = kernel.execute("x, globals().get('items')").result_text
            assert shown == expected[index], (counts[index], shown)


def test_a_change_made_by_a_notebook_function_is_in_that_cells_checkpoint(fresh_kernel, home):
    """`grow()` appends to a large global the cell never names: the cell's checkpoint still holds it."""
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "reach"})
    setup = kernel.execute(
        "big = [bytes(1024) for _ in range(4096)]\n"  # about 4 MiB: not re-hashed unless something names it
        "def grow():\n    big.append(b'new')\n"
        "class Counter:\n    def bump(self):\n        big.append(b'bumped')\n"
        "counter = Counter()"
    )
    assert setup.status == "ok", setup.texts()
    settle(kernel)
    grown = kernel.execute("grow()")
    bumped = kernel.execute("counter.bump()")
    settle(kernel)
    for cell, expected in ((grown, "(4097, b'new')"), (bumped, "(4098, b'bumped')")):
        back = kernel.execute(f"%capsule restore {cell.content['execution_count']}")
        assert back.status == "ok" and "no checkpoint" not in back.texts(), back.texts()
        assert kernel.execute("len(big), big[-1]").result_text == expected
