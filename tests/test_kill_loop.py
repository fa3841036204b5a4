"""The kill loop (issue 27): a batch run killed at random instants, resumed until it completes.

A notebook of twelve cells mixes instant cells, cells that change a large
value in place and cells that run for a while; each appends its own line to
a side-effect file in the working directory. A run is killed at a random
instant, sometimes the runner's whole process group, sometimes the kernel
alone, sometimes the sandbox's worker, sometimes a snapshot child, and then
resumed (``capsule-kernel run --resume``), killed again, until it completes.

What must hold, every time: each cell's line is in the file exactly once,
except the cell that was running at a kill (the last line when the kill
came: it may run again, and nothing else may); and the final outputs are those
of a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
from collections import Counter
from pathlib import Path

import nbformat
import psutil
import pytest

from tests.harness import wait_until
from tests.test_batch import CLI, notebook, texts

pytestmark = pytest.mark.slow

KILLS = 12  # kills per test run, spread over the victims below (the suite's time budget bounds it)
VICTIMS = ("group", "kernel", "sandbox", "snapshot")


def cells(side: Path) -> list[str]:
    mark = f"open({str(side)!r}, 'a').write"
    return [
        f"{mark}('c01\\n')\nimport time\nbig = bytearray(24 * 2**20)\ntotal = 0",
        f"{mark}('c02\\n')\na = 1",
        f"{mark}('c03\\n')\nbig[3] = 3\ntotal += 3",
        f"{mark}('c04\\n')\ntime.sleep(0.4)\nb = [a, 2]",
        f"{mark}('c05\\n')\nb.append(5)",
        f"{mark}('c06\\n')\nbig[6] = 6\ntotal += 6",
        f"{mark}('c07\\n')\ntime.sleep(0.6)\nc = {{'k': len(b)}}",
        f"{mark}('c08\\n')\nd = a + 7",
        f"{mark}('c09\\n')\nbig = bytearray(big)\nbig[9] = 9\ntotal += 9",
        f"{mark}('c10\\n')\ntime.sleep(0.3)\ne = d * 2",
        f"{mark}('c11\\n')\nc['k'] += 11",
        f"{mark}('c12\\n')\nprint(a, b, c, d, e, total, bytes(big[:10]).hex())",
    ]


def _worker_processes(runner: psutil.Process) -> list[psutil.Process]:
    """The runner's sandbox processes: the worker first (lowest pid), then its snapshot children."""
    found = []
    for process in runner.children(recursive=True):
        try:
            if "capsule_kernel.inside.worker.worker" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return sorted(found, key=lambda p: p.pid)


def _kernel_process(runner: psutil.Process) -> psutil.Process | None:
    for process in runner.children(recursive=True):
        try:
            cmdline = process.cmdline()
        except psutil.Error:
            continue
        if "capsule_kernel" in cmdline and "-f" in cmdline:
            return process
    return None


def _kill(runner: subprocess.Popen, victim: str) -> None:
    """Kill `victim` of this run (the group when it is not there to kill)."""
    try:
        parent = psutil.Process(runner.pid)
        if victim == "snapshot":
            # The kernel, while a snapshot child saves (if one comes within a second).
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: len(_worker_processes(parent)) > 1, timeout=1.0, interval=0.002, what="a snapshot")
            victim = "kernel"
        if victim == "kernel" and (kernel := _kernel_process(parent)) is not None:
            kernel.kill()
            return
        if victim == "sandbox" and (workers := _worker_processes(parent)):
            os.kill(workers[0].pid, signal.SIGKILL)
            return
    except (psutil.Error, ProcessLookupError):
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(runner.pid, signal.SIGKILL)


def test_random_kills_never_run_a_completed_cell_twice(tmp_path):
    chooser = random.Random(2712)
    work = tmp_path  # the notebook's directory: the sandbox's working directory
    side = work / "side.txt"
    source = notebook(tmp_path / "loop.ipynb", cells(side))
    env = {**os.environ, "CAPSULE_HOME": str(tmp_path / "home")}

    # The uninterrupted run: its outputs are what every interrupted one must end with.
    clean = subprocess.run([*CLI, str(source), "-o", str(tmp_path / "clean.ipynb")], env=env, cwd=work,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    expected = texts(nbformat.read(tmp_path / "clean.ipynb", as_version=4))
    assert expected[-1].startswith("1 [1, 2, 5] {'k': 14} 8 16 18"), expected
    assert len(side.read_text().splitlines()) == 12

    kills, victims, rounds = 0, Counter(), 0
    while kills < KILLS:
        rounds += 1
        side.unlink(missing_ok=True)
        output = tmp_path / f"round{rounds}.ipynb"
        allowed_twice: set[str] = set()
        history: list[tuple[str, list[str], int | None, str]] = []  # what each attempt did, for the message
        resume = False
        for _attempt in range(20):
            args = [*CLI, str(source), "-o", str(output), *(["--resume"] if resume else [])]
            runner = subprocess.Popen(args, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True)  # fmt: skip
            killed, victim, lines, stderr = False, "-", [], ""
            try:
                if kills < KILLS and chooser.random() < 0.8:
                    # A random instant: after a random number of side-effect lines, then a random delay.
                    target = chooser.randint(0, 11)
                    wait_until(
                        lambda t=target, r=runner: (
                            r.poll() is not None or (side.exists() and len(side.read_text().splitlines()) >= t)
                        ),
                        timeout=120,
                        what="the run to reach its kill point",
                    )
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        runner.wait(timeout=chooser.uniform(0, 0.5))  # the kill instant, unless the run ends first
                    if runner.poll() is None:
                        victim = chooser.choice(VICTIMS)
                        lines = side.read_text().splitlines() if side.exists() else []
                        _kill(runner, victim)
                        if lines:
                            allowed_twice.add(lines[-1])  # the cell that was running (or had just replied)
                        killed = True
                        victims[victim] += 1
                        kills += 1
                stderr = runner.communicate(timeout=180)[1]  # a kernel or sandbox kill: the runner stops by itself
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(runner.pid, signal.SIGKILL)  # whatever is left of this run
                runner.wait()
            if killed:
                # A cell the runner had sent when the kernel went may start after the look above (the sandbox
                # lives on until its keeper stops it): it was running at the kill too.
                after = side.read_text().splitlines() if side.exists() else []
                allowed_twice.update(after[len(lines) :])
            tail = [line for line in stderr.splitlines() if line.startswith("cell ")]
            history.append((victim, lines, runner.returncode, " | ".join(tail)[-1500:]))
            if runner.returncode == 0:
                break
            assert killed, f"a run failed with nothing killed (exit {runner.returncode}):\n{stderr}"
            resume = True
        else:
            raise AssertionError("the notebook never completed")
        lines = Counter(side.read_text().splitlines())
        assert set(lines) == {f"c{n:02}" for n in range(1, 13)}, lines
        twice = {line for line, count in lines.items() if count > 1}
        assert twice <= allowed_twice, (lines, allowed_twice, history)
        assert texts(nbformat.read(output, as_version=4)) == expected
    assert set(victims) == set(VICTIMS), victims  # every kind of kill happened
