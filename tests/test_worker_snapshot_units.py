"""The worker's own snapshots (worker/snapshots.py take_here) queued behind a child, with real forks and pipes.

A snapshot the worker takes while a child is still writing one must reach
the kernel after that child's report, in order, and must not be believed
when that child fails: it is a change on top of the child's cell.
"""

from __future__ import annotations

import os
import select
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from capsule_kernel.inside.worker.snapshots import Snapshotter
from capsule_kernel.protocol import frames


class Held:
    """100 KB that pickle only once `release` exists (in a snapshot child); SystemExit there if `fail` exists."""

    def __init__(self, release: str, fail: str) -> None:
        self.release, self.fail = release, fail

    def __reduce__(self):
        deadline = time.monotonic() + 30
        while not os.path.exists(self.release) and time.monotonic() < deadline:
            time.sleep(0.01)
        if os.path.exists(self.fail):
            raise SystemExit("the snapshot child fails")
        return (bytes, (b"h" * 100_000,))


class Channel:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send(self, message: dict) -> None:
        self.sent.append(message)

    def close_after_fork(self) -> None:
        pass


def reports(fd: int, timeout: float = 30.0) -> list[dict]:
    """Every report on the pipe until it stays quiet for a moment."""
    decoder, found = frames.FrameDecoder(frames.SNAPSHOT), []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.3)
        if not ready:
            if found:
                return found
            continue
        found += decoder.feed(os.read(fd, 1 << 20))
    return found


@pytest.fixture
def worker(tmp_path):
    read_fd, write_fd = os.pipe()
    namespace: dict = {}
    shell = SimpleNamespace(user_ns=namespace, user_ns_hidden={})
    snapshots = Snapshotter(shell, Channel(), str(tmp_path / "spool"), write_fd)
    (tmp_path / "spool").mkdir()
    yield snapshots, namespace, read_fd, tmp_path
    snapshots.wait()
    os.close(read_fd)
    os.close(write_fd)


def cell(snapshots: Snapshotter, count: int, names: list[str]) -> str:
    """What the worker does after a good cell: ("taken" here, or "take" by a forked child)."""
    action, candidates, plan = snapshots.after_cell(count, names, 0.0)
    if action == "take":
        snapshots.take(count, plan, candidates)
    return action


def hold(snapshots: Snapshotter, namespace: dict, read_fd: int, tmp_path: Path, fail: bool = False) -> Path:
    """Cell 1 saves `held` (100 KB) and x; cell 2 names `held` again: its child waits for the file returned."""
    release = tmp_path / "release"
    release.touch()
    namespace.update(x=1, held=Held(str(release), str(tmp_path / "fail")))
    assert cell(snapshots, 1, ["x", "held"]) == "take"  # a notebook object: a child pickles it
    assert [r["type"] for r in reports(read_fd)] == ["snapshot"]
    snapshots.wait()
    release.unlink()
    if fail:
        (tmp_path / "fail").touch()
    assert cell(snapshots, 2, ["held"]) == "take"  # known to be large: a child, held until release exists
    return release


def test_a_snapshot_taken_behind_a_child_is_reported_after_it_and_without_what_did_not_change(worker):
    snapshots, namespace, read_fd, tmp_path = worker
    held = hold(snapshots, namespace, read_fd, tmp_path)
    namespace["x"] = 2
    assert cell(snapshots, 3, ["x"]) == "taken"  # small: here, behind the child
    journaled = frames.read_journal_entry(Path(snapshots.root, "journal", "3.frame"), frames.SNAPSHOT)
    assert journaled["after"] == 2
    assert reports(read_fd, timeout=1.0) == []  # nothing before the child's report
    held.touch()
    got = reports(read_fd)
    assert [(r["type"], r["execution_count"]) for r in got] == [("snapshot", 2), ("snapshot", 3)]
    assert set(got[1]["entries"]) == {"x"}  # what it saved again for want of fresh digests was unchanged


def test_a_snapshot_taken_behind_a_child_that_fails_fails_too_and_leaves_the_journal(worker):
    snapshots, namespace, read_fd, tmp_path = worker
    held = hold(snapshots, namespace, read_fd, tmp_path, fail=True)
    namespace["x"] = 2
    assert cell(snapshots, 3, ["x"]) == "taken"
    held.touch()
    got = reports(read_fd)
    assert [(r["type"], r["execution_count"]) for r in got] == [("snapshot_failed", 2), ("snapshot_failed", 3)]
    assert "cell [2]" in got[1]["reason"]
    assert not Path(snapshots.root, "journal", "3.frame").exists()  # no later kernel believes it either
    snapshots.wait()
    assert snapshots.ledger.ids == {}  # the next snapshot compares everything
