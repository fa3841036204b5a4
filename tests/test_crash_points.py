"""Crash-point injection (issue 27): the process at each durability step is killed there, and recovery is checked.

protocol/crash_points.py names every step one cell's checkpoint passes: in
the worker that saves a small change itself, in the forked child that saves
a large one, and in the kernel that records it and answers. Each test here
runs a short notebook in a real kernel whose environment names one step and
one cell (`CAPSULE_CRASH_AT=<point>@<cell>`); the process that reaches it
SIGKILLs itself there. Then:

- the kernel died: a new kernel resumes the session. Every cell that had
  replied "ok" is in the restored state (only the cell whose reply had not
  come may be missing, and then it is named), and each of them is
  restorable on its own (`%capsule restore N`), large value included;
- the worker died: the kernel stays up, the cell it was running fails with
  the sandbox's death, the fresh sandbox holds the last completed cell's
  state, the rest of the notebook runs, and every completed cell restores;
- the Wasm host died (CAPSULE_MODE=wasm, the same cells): as for the worker;
- a snapshot child died: the kernel and the worker stay up, the cell's
  reply is "ok", and the notebook goes on. The next checkpoint holds the
  whole state (nothing built on the missing snapshot is believed), and
  the cells that have no checkpoint of their own are named in `%capsule log`
  with the reason. A kill of the kernel afterwards loses nothing.
"""

from __future__ import annotations

import queue
import re
import time

import pytest

from capsule_kernel.protocol.crash_points import POINTS, VARIABLE
from tests.harness import KernelHarness, start_kernel, wait_until

pytestmark = pytest.mark.slow

BIG = 8 * 2**20
# Execution count -> cell ([1] is the `%capsule status` that finds the worker). Small cells are
# saved by the worker before their reply; large ones by a child forked at the cell's end.
CELLS = {
    2: "x = 2",
    3: f"import os\nbig = bytearray(os.urandom({BIG}))\nx = 3",
    4: "x = 4",
    5: "big[0] = 5\nx = 5",
    6: "x = 6",
}
LAST = max(CELLS)
# Which cell each step is injected at: a small cell for the worker's steps, a large one for the
# child's, and both kinds for the kernel's (it records both the same way).
CASES = [
    ("worker.before_journal", 4),
    ("worker.after_journal", 4),
    ("child.before_journal", 3),
    ("child.after_journal", 3),
    ("child.after_digests", 3),
    ("child.after_report", 3),
    *[(point, cell) for point in POINTS if point.startswith("kernel.") for cell in (3, 4)],
]
# The Wasm host stores small and large changes alike; kill it at each of its steps in a small
# cell and in one that changes the large value (no later cell needs what either did).
WASM_CASES = [(point, cell) for point in POINTS if point.startswith("wasm.") for cell in (4, 5)]


def _state(kernel: KernelHarness) -> tuple[int, int, int]:
    """x, len(big) (0 if unset) and big[0], from the live namespace."""
    text = kernel.execute("(x, len(big), big[0]) if 'big' in dir() else (x, 0, 0)").result_text
    found = re.fullmatch(r"\((\d+), (\d+), (\d+)\)", text or "")
    assert found, text
    return int(found[1]), int(found[2]), int(found[3])


def _matches(state: tuple[int, int, int], cell: int, lost: int | None = None) -> bool:
    """The state right after cell [cell] ran, cell [lost] having failed (big[0] is random until cell [5] sets it)."""
    x, size, first = state
    return x == cell and size == (BIG if cell >= 3 else 0) and (cell < 5 or lost == 5 or first == 5)


def _run(kernel: KernelHarness, first: int, *, counted: bool = True) -> dict[int, str]:
    """Send the cells from [first] one by one; stop at the first reply that does not come (the kernel died)."""
    statuses: dict[int, str] = {}
    for count in range(first, LAST + 1):
        # (stop_on_error off: a cell right after the one the worker died in is not aborted)
        reply = _reply_or_death(kernel, kernel.kc.execute(CELLS[count], stop_on_error=False))
        if reply is None:
            break
        assert not counted or reply["content"]["execution_count"] == count, reply["content"]
        statuses[count] = reply["content"]["status"]
    return statuses


def _reply_or_death(kernel: KernelHarness, msg_id: str, timeout: float = 120) -> dict | None:
    """The cell's execute_reply, or None once the kernel process has died without sending it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = kernel.kc.get_shell_msg(timeout=0.1)
        except queue.Empty:
            if not kernel.km.is_alive():
                return None
            continue
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply
    raise TimeoutError(f"neither a reply to {msg_id} nor the kernel's death")


def _check_every_cell_restores(
    kernel: KernelHarness, cells: set[int], *, by_id: bool = False, lost: int | None = None
) -> None:
    """`%capsule restore N` of each cell (by its checkpoint's id in a resumed kernel, whose counts start again)."""
    log = kernel.execute("%capsule log").texts()
    for cell in sorted(cells):
        found = re.findall(rf"^\[{cell}\]\s+([0-9a-f]{{8}})\s.*\sok\s", log, re.MULTILINE)
        assert len(found) == 1, (cell, log)  # one checkpoint per cell, however its report came
        restored = kernel.execute(f"%capsule restore {found[0] if by_id else cell}", timeout=120)
        assert restored.status == "ok", (cell, restored.texts())
        assert _matches(_state(kernel), cell, lost), (cell, _state(kernel), restored.texts())


@pytest.mark.parametrize(("point", "cell"), CASES, ids=[f"{point}@{cell}" for point, cell in CASES])
def test_a_kill_at_each_durability_step_loses_no_completed_cell(tmp_path, point, cell):
    session = f"crash-{point}-{cell}".replace(".", "-")
    env = {"CAPSULE_HOME": str(tmp_path / "home"), "CAPSULE_SESSION": session}
    kernel = start_kernel(env={**env, VARIABLE: f"{point}@{cell}"}, cwd=tmp_path)
    try:
        worker = kernel.sandbox_pid()
        statuses = _run(kernel, first=2)
        ok = {number for number, status in statuses.items() if status == "ok"}
        if point.startswith("kernel."):
            # Its step comes for every cell, after the cells that follow, perhaps: a large cell's
            # checkpoint is recorded while the next cells run, or after the last.
            wait_until(lambda: not kernel.km.is_alive(), timeout=120, what=f"the kernel to die at {point}")
        alive = kernel.km.is_alive()
        if alive:
            assert len(statuses) == len(CELLS), statuses
            died_in = {number for number, status in statuses.items() if status != "ok"}
            if point.startswith("worker."):
                # The worker died in cell [cell] before its reply: that cell failed, the rest ran.
                assert died_in == {cell} and kernel.sandbox_pid() != worker, statuses
            else:
                # A snapshot child (or nothing) died: every cell completed in the same worker.
                assert not died_in and kernel.sandbox_pid() == worker, statuses
                assert point.startswith("child."), f"the kernel survived its own crash point {point}"
            last = max(ok)
            assert _matches(_state(kernel), last), (_state(kernel), statuses)
            log = kernel.execute("%capsule log").texts()
            own = {number for number in ok if _has_checkpoint(log, number)}
            if point == "child.before_journal":
                # The killed child held the only copy of cell [3]'s state, and the small cell taken
                # behind it built on that copy. Each is named, with the reason; cell [5]'s
                # checkpoint is whole, so nothing later depends on the missing ones.
                assert ok - own == {cell, cell + 1}, log
                assert re.search(rf"^\[{cell}\] .* failed .*killed by SIGKILL before it saved", log, re.M), log
                assert re.search(rf"^\[{cell + 1}\] .* failed .*builds on the snapshot of cell \[{cell}\]", log, re.M)
            else:
                # Journaled before it died: the worker passes that on, and everything behind it holds.
                assert own == ok, log
            _check_every_cell_restores(kernel, own)
            return
        assert point.startswith("kernel."), f"the kernel died at {point}, which is not its step"
    finally:
        kernel.close()
    # The kernel died at its step in cell [cell]: a new kernel resumes the session.
    assert all(status == "ok" for status in statuses.values()), statuses
    resumed = start_kernel(env=env, cwd=tmp_path)
    try:
        shown = resumed.execute("%capsule resume", timeout=120)
        assert shown.status == "ok", shown.texts()
        state = _state(resumed)
        last = max(statuses, default=0)
        # Every cell that replied is there; the one whose reply never came may be too (it ran).
        assert _matches(state, last) or _matches(state, last + 1), (state, statuses, shown.texts())
        named = {int(n) for n in re.findall(r"\[(\d+)\] '", shown.texts().split("Not in it", 1)[-1])}
        if "Not in it" in shown.texts():
            assert named and not named & set(statuses), (named, statuses, shown.texts())
        _check_every_cell_restores(resumed, set(statuses), by_id=True)
        # And forward again from the last of them: the rest of the notebook runs on top.
        rest = _run(resumed, last + 1, counted=False)  # (with counts of its own: the cells above took some)
        assert all(status == "ok" for status in rest.values()) and len(rest) == LAST - last, rest
        assert _matches(_state(resumed), LAST)
    finally:
        resumed.close()


@pytest.mark.parametrize(("point", "cell"), WASM_CASES, ids=[f"{point}@{cell}" for point, cell in WASM_CASES])
def test_a_wasm_host_killed_at_each_of_its_steps_loses_no_completed_cell(tmp_path, point, cell):
    env = {"CAPSULE_HOME": str(tmp_path / "home"), "CAPSULE_MODE": "wasm", VARIABLE: f"{point}@{cell}"}
    kernel = start_kernel(env=env, cwd=tmp_path)
    try:
        host = kernel.sandbox_pid()
        statuses = _run(kernel, first=2)
        assert kernel.km.is_alive() and len(statuses) == len(CELLS), statuses
        # The host died in cell [cell] before its reply (its report sent after its chunks and
        # journal entry, before the cell's "done"): that cell failed, the rest ran in a new host.
        died_in = {number for number, status in statuses.items() if status != "ok"}
        assert died_in == {cell} and kernel.sandbox_pid() != host, statuses
        ok = set(statuses) - died_in
        assert _matches(_state(kernel), max(ok), lost=cell), (_state(kernel), statuses)
        log = kernel.execute("%capsule log").texts()
        assert {number for number in ok if _has_checkpoint(log, number)} == ok, log
        _check_every_cell_restores(kernel, ok, lost=cell)
    finally:
        kernel.close()


def _has_checkpoint(log: str, number: int) -> bool:
    """The `%capsule log` row of cell [number] names a checkpoint id."""
    return re.search(rf"^\[{number}\]\s+[0-9a-f]{{8}}\s", log, re.MULTILINE) is not None


def test_every_durability_step_is_injected_somewhere():
    assert {point for point, _ in CASES + WASM_CASES} == set(POINTS)
