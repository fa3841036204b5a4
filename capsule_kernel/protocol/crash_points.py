"""Crash-point injection: named durability steps at which a test kills the process that reaches them.

Durability is an ordering of writes, renames and commits across the
processes a checkpoint passes (the snapshot child, the worker, or the Wasm
host; then the kernel). A test proves the
order right by killing the process at each step and checking what the next
kernel recovers (tests/test_crash_points.py). `CAPSULE_CRASH_AT=<point>@<cell>`
in the kernel's environment names one step and one execution count; the
process that reaches that step for that cell sends itself SIGKILL, as the
kernel's OOM killer or a `kill -9` would. Unset, `reach` is a dictionary
lookup and nothing else.

The variable is the operator's (the kernel's environment; the sandbox gets
it through its allowlist). A cell that sets it in its own process can only
kill that process, which it can do anyway.
"""

from __future__ import annotations

import os
import signal

VARIABLE = "CAPSULE_CRASH_AT"

# Every step, in the order one cell's checkpoint passes them; the test walks this table.
POINTS = {
    # The worker takes a small snapshot itself (inside/worker/snapshots.py, take_here).
    "worker.before_journal": "its chunks are in the spool; its journal entry is not",
    "worker.after_journal": "its journal entry is written; the kernel has not been told",
    # A forked child takes a large one (inside/worker/snapshots.py, _child).
    "child.before_journal": "the child's chunks are in the spool; its journal entry is not",
    "child.after_journal": "the child's journal entry is written; the worker has not learned the digests",
    "child.after_digests": "the worker has the digests; the report is not sent to the kernel",
    "child.after_report": "the report is sent; the worker does not know that it was",
    # The Wasm host stores what its guest pickled (wasm_host/guest_frames.py, _store_snapshot).
    "wasm.before_journal": "the host has written the guest's chunks into the store; its journal entry is not",
    "wasm.after_journal": "the host's journal entry is written; the kernel has not been told",
    # The kernel records it (kernel/checkpoint/recorder.py) and answers (kernel/session).
    "kernel.before_record": "the report arrived; nothing is copied into the store",
    "kernel.after_chunks": "its chunks are copied into the store and fsynced; the row is not committed",
    "kernel.after_commit": "the checkpoint row is committed; the journal entry is still there",
    "kernel.after_prune": "the journal entry is gone; the cell's promise is not resolved",
    "kernel.before_reply": "the cell is done; its execute_reply is not sent",
    "kernel.after_reply": "the execute_reply is sent",
}


def _target() -> tuple[str, int] | None:
    value = os.environ.get(VARIABLE, "")
    point, _, cell = value.partition("@")
    if point not in POINTS or not cell.isdigit():
        return None
    return point, int(cell)


_TARGET = _target()


def reach(point: str, execution_count: int) -> None:
    """This process is at `point` for cell `execution_count`: die here if the test said so."""
    assert point in POINTS, point
    if _TARGET is not None and _TARGET == (point, execution_count):
        os.kill(os.getpid(), signal.SIGKILL)
