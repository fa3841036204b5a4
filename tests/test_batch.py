"""capsule-kernel run: parameters, exit codes, the output notebook after each cell, resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import nbformat
import psutil
import pytest

from capsule_kernel.kernel.checkpoint.home import default_home
from capsule_kernel.kernel.checkpoint.store import CheckpointStore
from tests.harness import wait_until

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "capsule_kernel.client.cli", "run"]


def notebook(path: Path, sources: list[str], parameters: str | None = None) -> Path:
    nb = nbformat.v4.new_notebook()
    if parameters is not None:
        cell = nbformat.v4.new_code_cell(parameters)
        cell.metadata["tags"] = ["parameters"]
        nb.cells.append(cell)
    nb.cells += [nbformat.v4.new_code_cell(source) for source in sources]
    nbformat.write(nb, path)
    return path


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd,
                          timeout=300)  # fmt: skip


def texts(nb) -> list[str]:
    out = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            out.append("".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") or o.get("evalue", "")
                               for o in cell.outputs))  # fmt: skip
    return out


def test_parameters_outputs_and_exit_codes(tmp_path):
    source = notebook(tmp_path / "n.ipynb", ["print(greeting * times)", "1 / 0", "print('after')"],
                      parameters="greeting = 'hi'\ntimes = 1")  # fmt: skip
    done = run(str(source), "-o", str(tmp_path / "o.ipynb"), "-p", "greeting=ho", "-p", "times=2")
    assert done.returncode == 1, done.stderr
    out = nbformat.read(tmp_path / "o.ipynb", as_version=4)
    assert "injected-parameters" in out.cells[1].metadata["tags"]
    shown = texts(out)
    assert shown[2] == "hoho\n" and "division by zero" in shown[3] and shown[4] == ""
    assert "cell 3: error" in done.stderr  # one line per cell off a terminal
    allowed = run(str(source), "-o", str(tmp_path / "o2.ipynb"), "--allow-errors")
    assert allowed.returncode == 1
    assert texts(nbformat.read(tmp_path / "o2.ipynb", as_version=4))[-1] == "after\n"
    clean = notebook(tmp_path / "ok.ipynb", ["x = 1", "x + 1"])
    assert run(str(clean)).returncode == 0
    assert texts(nbformat.read(tmp_path / "ok.out.ipynb", as_version=4))[-1] == "2"


def test_a_killed_run_resumes_without_rerunning_completed_cells(tmp_path):
    log = tmp_path / "ran.log"
    cells = [
        f"open({str(log)!r}, 'a').write('a')\ndata = list(range(5))",
        # Over 0.1 s: a checkpoint of its own (a shorter cell's waits behind the running cell c).
        f"open({str(log)!r}, 'a').write('b')\ntotal = sum(data)\nimport time\ntime.sleep(0.15)",
        f"open({str(log)!r}, 'a').write('c')\nimport time, pathlib\n"
        f"while not pathlib.Path({str(tmp_path / 'go')!r}).exists():\n    time.sleep(0.05)\ntotal * 2",
        f"open({str(log)!r}, 'a').write('d')\ntotal + 1",
    ]
    source = notebook(tmp_path / "job.ipynb", cells)
    output = tmp_path / "job.out.ipynb"
    first = subprocess.Popen([*CLI, str(source), "-o", str(output)], stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    wait_until(lambda: log.exists() and log.read_text() == "abc", timeout=120, what="the third cell to start")
    # Cell b's checkpoint is recorded (a kill in the window between a reply and its checkpoint is issue 15's).
    session = nbformat.read(output, as_version=4).metadata["capsule"]["session"]
    store = CheckpointStore(default_home())
    wait_until(lambda: any(c.execution_count >= 2 for c in store.history(session)), timeout=60, what="b's checkpoint")
    store.close()
    os.killpg(first.pid, signal.SIGKILL)  # the runner and its kernel, as a reboot would
    first.wait()
    (tmp_path / "go").touch()
    resumed = run(str(source), "-o", str(output), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    out = nbformat.read(output, as_version=4)
    assert log.read_text() == "abccd", (resumed.stderr, [c.outputs for c in out.cells])
    out = nbformat.read(output, as_version=4)
    assert texts(out)[2:] == ["20", "11"]
    assert [c.metadata.get("capsule", {}).get("restored", False) for c in out.cells] == [True, True, False, False]
    assert out.metadata["capsule"]["restored_cells"] == 2


def test_short_cells_before_a_long_one_are_not_run_again_after_a_kill(tmp_path):
    """Issue 27's notebook: set-up cells back to back, then a long cell, the run killed during it.

    Nothing waits for a checkpoint here: each short cell's state is durable
    from its own fork at its end, so the resume runs only the long cell again.
    """
    log = tmp_path / "log.txt"
    cells = [
        f"open({str(log)!r}, 'a').write('c1 ')\na = 1",
        f"open({str(log)!r}, 'a').write('c2 ')\nb = 2",
        f"open({str(log)!r}, 'a').write('c3 ')\nimport time, pathlib\n"
        f"while not pathlib.Path({str(tmp_path / 'go')!r}).exists():\n    time.sleep(0.05)\nc = 3",
        "print(n, a, b, c)",
    ]
    source = notebook(tmp_path / "job.ipynb", cells, parameters="n = 1")
    output = tmp_path / "out.ipynb"
    first = subprocess.Popen([*CLI, str(source), "-o", str(output), "-p", "n=3"], stderr=subprocess.DEVNULL,
                             start_new_session=True)  # fmt: skip
    try:
        wait_until(lambda: log.exists() and log.read_text() == "c1 c2 c3 ", timeout=120, what="the long cell to start")
        # While the long cell runs, c2 (count 4: the parameters, the injected cell, c1, c2) has its checkpoint.
        session = nbformat.read(output, as_version=4).metadata["capsule"]["session"]
        store = CheckpointStore(default_home())
        try:
            wait_until(
                lambda: any(c.execution_count >= 4 for c in store.history(session)), timeout=60, what="c2's checkpoint"
            )
        finally:
            store.close()
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the runner and its kernel (also when the test fails: no leftovers)
        first.wait()
    (tmp_path / "go").touch()
    resumed = run(str(source), "-o", str(output), "-p", "n=3", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert log.read_text() == "c1 c2 c3 c3 ", resumed.stderr
    out = nbformat.read(output, as_version=4)
    assert texts(out)[-1] == "3 1 2 3\n"
    restored = [c.metadata.get("capsule", {}).get("restored", False) for c in out.cells]
    assert restored == [True, True, True, True, False, False], restored


def test_a_run_killed_right_after_a_reply_resumes_from_the_journaled_snapshot(tmp_path):
    """The kill lands while cell b's snapshot is still being written: only the sandbox's journal has it.

    Fails without the runner adopting the journal before it plans (checked: b ran
    again, the log read "abbc"): the plan saw no checkpoint of b in the store.
    """
    log = tmp_path / "ran.log"
    cells = [
        f"open({str(log)!r}, 'a').write('a')\nsmall = 1",
        # About 300 MB of fresh bytes: its snapshot takes a second or more after the reply.
        f"open({str(log)!r}, 'a').write('b')\nimport os\nbig = os.urandom(300_000_000)",
        # Held until after the kill (the runner sends it at once): the dead run's c ends interrupted.
        f"import time, pathlib\nwhile not pathlib.Path({str(tmp_path / 'go')!r}).exists():\n    time.sleep(0.05)\n"
        f"open({str(log)!r}, 'a').write('c')\nlen(big) + small",
    ]
    source = notebook(tmp_path / "big.ipynb", cells)
    output = tmp_path / "big.out.ipynb"
    first = subprocess.Popen([*CLI, str(source), "-o", str(output)], stderr=subprocess.DEVNULL,
                             start_new_session=True)  # fmt: skip

    def b_replied() -> bool:
        try:
            out = nbformat.read(output, as_version=4)
        except (OSError, ValueError):  # being written
            return False
        return bool(out.cells[1].metadata.get("capsule", {}).get("completed"))

    wait_until(b_replied, timeout=120, interval=0.005, what="cell b's reply in the output notebook")
    # The runner and its kernel at once, as a reboot would (the sandbox's keeper, in a session of
    # its own, lives on; jupyter_client starts the kernel in a session of its own too).
    kernels = [p for p in psutil.Process(first.pid).children() if "capsule_kernel" in " ".join(p.cmdline())]
    os.killpg(first.pid, signal.SIGKILL)
    for kernel in kernels:
        kernel.kill()
    first.wait()
    session = nbformat.read(output, as_version=4).metadata["capsule"]["session"]
    b_count = nbformat.read(output, as_version=4).cells[1].execution_count
    store = CheckpointStore(default_home())
    recorded = [c.execution_count for c in store.history(session)]
    store.close()
    assert b_count not in recorded, "b's snapshot was recorded before the kill: the window was missed"
    (tmp_path / "go").touch()
    resumed = run(str(source), "-o", str(output), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert log.read_text() == "abc", resumed.stderr
    out = nbformat.read(output, as_version=4)
    assert texts(out)[2] == "300000001"
    assert [c.metadata.get("capsule", {}).get("restored", False) for c in out.cells] == [True, True, False]


def test_a_changed_cell_runs_again_from_there(tmp_path):
    log = tmp_path / "ran.log"
    cells = [f"open({str(log)!r}, 'a').write('a')\nn = 2", f"open({str(log)!r}, 'a').write('b')\nn * 10"]
    source = notebook(tmp_path / "j.ipynb", cells)
    output = tmp_path / "j.out.ipynb"
    assert run(str(source), "-o", str(output)).returncode == 0
    assert run(str(source), "-o", str(output), "--resume").returncode == 0
    assert log.read_text() == "ab"  # all restored: nothing ran
    cells[1] = cells[1].replace("n * 10", "n * 100")
    notebook(source, cells)
    assert run(str(source), "-o", str(output), "--resume").returncode == 0
    assert log.read_text() == "abb"
    assert texts(nbformat.read(output, as_version=4)) == ["", "200"]


def test_papermills_capsule_engine_resumes_too(tmp_path):
    log = tmp_path / "ran.log"
    cells = [
        # Over 0.1 s: a checkpoint of its own (a shorter cell's waits behind the running cell b).
        f"open({str(log)!r}, 'a').write('a')\ndata = [1, 2, 3]\nimport time\ntime.sleep(0.15)",
        f"open({str(log)!r}, 'a').write('b')\nimport time, pathlib\n"
        f"while not pathlib.Path({str(tmp_path / 'go')!r}).exists():\n    time.sleep(0.05)\nsum(data)",
    ]
    source = notebook(tmp_path / "pm.ipynb", cells, parameters="factor = 1")
    output = tmp_path / "pm.out.ipynb"
    papermill = [sys.executable, "-m", "papermill", str(source), str(output), "-k", "capsule", "--engine", "capsule",
                 "--language", "python", "--cwd", str(tmp_path)]  # fmt: skip
    first = subprocess.Popen([*papermill, "-p", "factor", "2"], stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: log.exists() and log.read_text() == "ab", timeout=120, what="the second cell to start")
    session = nbformat.read(output, as_version=4).metadata["capsule"]["session"]
    store = CheckpointStore(default_home())
    wait_until(lambda: store.history(session), timeout=60, what="the first cell's checkpoint")
    store.close()
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    (tmp_path / "go").touch()
    again = subprocess.run([*papermill, "-p", "factor", "2"], capture_output=True, text=True,
                           env={**os.environ, "CAPSULE_RESUME": "1"}, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert log.read_text() == "abb"  # the first cell did not run again
    assert texts(nbformat.read(output, as_version=4))[-1] == "6"
