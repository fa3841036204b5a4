"""Checkpointing INSIDE the subprocess sandbox: fork, serialize in the child.

After a successful cell the worker forks. The child, a copy-on-write image of
the namespace frozen at that instant, pickles what may have changed into the
chunk store and reports a JSON manifest; the parent answers the kernel at
once and runs the next cell while the child works (Redis saves the same
way).

Every cell that changed state gets its own snapshot, at any pace: a child
forked while earlier ones still run is chained behind them (it waits for the
digests of the one before, then plans against them), so the reply never
waits for a snapshot, and at most MAX_IN_FLIGHT children exist (a cell that
ends with that many waits for the oldest: the bound on the copy-on-write
images the sandbox holds). The durability point is the fork, right after the
cell and before its reply: it does not depend on the worker going idle.

Coalescing is the operator's opt-in ([checkpoints] coalesce > 0): short cells
that end while a snapshot is still running are then deferred, and one
coalesced snapshot covers them all, taken when the worker has been idle for
IDLE_SECONDS, before any request that is not a cell, when the kernel's pipe
closes, or before the next cell once the oldest deferred cell is max_delay
old or max_cells are deferred. A crash loses at most the deferred cells,
which the kernel names (it knows which cells were deferred: "done" says so).
"""

from __future__ import annotations

import contextlib
import copyreg
import io
import json
import os
import select
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

from capsule_kernel.inside import snapshot
from capsule_kernel.inside.ledger import SnapshotLedger, clear_for_replace
from capsule_kernel.inside.worker.channel import FrameChannel
from capsule_kernel.protocol import chunks, crash_points, frames
from capsule_kernel.protocol.chunks import HashingThreads
from capsule_kernel.protocol.deaths import process_exists

_ABSENT = object()

Plan = tuple[list[str], list[str], dict[str, int], dict[str, str]]
# Each stands for a chunk of at least 1 MiB: 16384 cover 16 GiB of large values.
MAX_FINGERPRINTS = 16384
# A child's last word on its digest pipe: its report went to the kernel too.
_REPORTED = b"reported"
# The digest a name has while a child saves it (plan): no entry's digest is ever this.
_BEING_SAVED = "being saved"
# Coalescing: a worker idle this long takes the deferred snapshot ...
IDLE_SECONDS = 0.05
# Only a cell that ran less than this is ever deferred.
SHORT_CELL_SECONDS = 0.1
# Snapshot children run at this niceness: on a busy CPU the cells that follow come first.
SNAPSHOT_NICENESS = 10
# Snapshot children whose digests have not come back: one runs, the others wait for it in
# a chain. A cell that ends with this many in flight waits for the oldest before its
# reply: the bound on the copy-on-write images the sandbox holds (its memory limit counts them).
MAX_IN_FLIGHT = 4
# A cell whose changes pickle to at most this many bytes, with no snapshot child in flight,
# is snapshotted by the worker itself before its reply: no fork, no child, and in the journal
# before the reply leaves. Measured in a worker holding a 10 MB namespace on the 2-core VM:
# its fork costs 3-7 ms, and its pages then fault copy-on-write in the cells that follow
# (2-3 ms more), while the child pickles on the core the kernel needs. Pickling and hashing
# 1 MiB of plain data or arrays costs 2-5 ms, and nothing after. Past 1 MiB, the fork wins.
INLINE_BYTES = 1024 * 1024
# Snapshots taken in the worker that may wait behind one child; past it, the next cell forks.
MAX_BEHIND = 64


class Snapshotter:
    idle_seconds = IDLE_SECONDS
    # Back to back, a deferred cell waits at most this long, or this many cells, for its
    # snapshot (the kernel's [checkpoints] coalesce and coalesce_cells settings).
    max_delay = 0.0
    max_cells = 64

    def __init__(
        self,
        shell: Any,
        channel: FrameChannel,
        chunk_root: str | None,
        report_fd: int | None,
        source: chunks.ChunkSource | None = None,
    ) -> None:
        self.shell = shell
        self.channel = channel
        # Snapshots write new chunks into `chunk_root`, the sandbox's private
        # spool, which the kernel empties into the store; restores read
        # chunks from `source` (descriptors from the kernel), never the store.
        self.source = source
        # Snapshot children report to the kernel on their own pipe, so a
        # snapshot in flight still lands if this worker dies meanwhile.
        self.report_fd = report_fd
        self.root = Path(chunk_root) if chunk_root else None
        # Digests as of the last snapshot whose digests came back; ids at the latest fork.
        self.ledger = SnapshotLedger()
        # Fingerprints of recent large chunks -> their names (chunks.fingerprint).
        self.fingerprints: dict[str, str] = {}
        self._changed = threading.Condition()
        self._pending: set[int] = set()  # pids of the children whose digests have not come back
        self._latest_pid = 0
        # pid of a child -> the pipe to the child chained after it, waiting for its digests
        self._successors: dict[int, int] = {}
        # pid of a child -> the snapshots taken here behind it (take_here), in order, for its
        # collector to report after its own; the cell of the latest snapshot, fork or here.
        self._behind: dict[int, list[_Behind]] = {}
        self._latest_count = 0
        self._failed_pid = 0  # the latest child whose snapshot failed
        # name -> id of the values the children in flight are saving (plan, _as_saved).
        self._saving: dict[str, int] = {}
        # Cells whose snapshot is deferred into the next coalesced one, the names they mention, since when.
        self.deferred: list[int] = []
        self._deferred_names: set[str] = set()
        self._deferred_since = 0.0

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def wait(self) -> None:
        """Block until every snapshot has told us its digests."""
        with self._changed:
            self._changed.wait_for(lambda: not self._pending)

    @property
    def busy(self) -> bool:
        """A snapshot runs whose digests have not come back."""
        return bool(self._pending)

    def after_cell(self, execution_count: int, candidates: list[str], ran: float) -> tuple[str, list[str], Plan | None]:
        """What follows a good cell: ("take", names, plan), ("defer", [], None) or ("none", [], None).

        By default every cell that changed something is taken at once: a
        small change by the worker itself before the reply ("taken",
        take_here), any other by a forked child (take). With
        coalescing on (max_delay > 0), a short cell (it ran under SHORT_CELL_SECONDS) that ends while a
        snapshot runs, or after deferred cells, is deferred into the next
        coalesced snapshot: it is cheap to run again should it be lost. Any
        other cell is snapshotted at once (a person's pace: each cell its own
        checkpoint), together with the cells deferred before it.
        """
        if self.root is None:
            return "none", [], None
        if self.max_delay <= 0:  # the default: every cell its own checkpoint, chained behind the ones in flight
            plan = self.plan(candidates)
            if plan is None:
                return "none", [], None
            if self.take_here(execution_count, plan):
                return "taken", candidates, plan
            return "take", candidates, plan
        if (self.deferred or self.busy) and ran < SHORT_CELL_SECONDS:
            self._defer(execution_count, candidates)
            return "defer", [], None
        names = sorted(self._deferred_names.union(candidates))
        plan = self.plan(names)
        if plan is None and self.deferred:
            self._defer(execution_count, candidates)  # nothing changed; the deferred ones still need a word
            return "defer", [], None
        self.deferred, self._deferred_names = [], set()
        return ("take", names, plan) if plan else ("none", [], None)

    def _defer(self, execution_count: int, candidates: list[str]) -> None:
        if not self.deferred:
            self._deferred_since = time.monotonic()
        self.deferred.append(execution_count)
        self._deferred_names.update(candidates)

    def overdue(self) -> bool:
        """The deferred cells have waited long enough: snapshot them before the next cell."""
        return len(self.deferred) >= self.max_cells or time.monotonic() - self._deferred_since >= self.max_delay

    def flush(self) -> None:
        """Take the coalesced snapshot of the deferred cells (between cells, in the worker's main thread).

        It is named after the last of them; the kernel knows which cells it
        covers. If nothing they touched changed, say so instead.
        """
        if not self.deferred:
            return
        with self._changed:
            self._changed.wait_for(lambda: len(self._pending) < MAX_IN_FLIGHT)
        last, names = self.deferred[-1], sorted(self._deferred_names)
        self.deferred, self._deferred_names = [], set()
        plan = self.plan(names)
        if plan:
            self.announce(last, self.take(last, plan, names))
        else:
            assert self.root is not None
            unchanged = {"type": "snapshot", "execution_count": last, "entries": {}, "removed": [], "written": 0}
            with contextlib.suppress(OSError):
                frames.journal(self.root, unchanged)
            self.channel.send({"type": "snapshot_unchanged", "execution_count": last})

    def abandon(self, failed: int) -> None:
        """A cell failed (or was interrupted) with cells deferred: their own state is gone.

        The failed cell may have changed the namespace before it stopped, so
        a coalesced snapshot taken now would hold that under the last
        deferred cell's count. Their snapshot fails instead, named (the
        kernel then says no checkpoint holds them); what they changed is
        still looked at by the next snapshot, which is named after a cell
        that completed.
        """
        if not self.deferred or self.report_fd is None:
            return
        last = self.deferred[-1]
        self.deferred = []  # _deferred_names stay: the next snapshot looks at them
        report = {
            "type": "snapshot_failed",
            "execution_count": last,
            "reason": f"cell [{failed}] failed after them and before their coalesced snapshot",
        }
        with self._changed:
            behind = self._latest_in_flight()
            if behind is not None:  # after that child's report, in order
                self._behind.setdefault(behind, []).append(_Behind(report, {}))
                return
        with contextlib.suppress(OSError):
            frames.write_frame(self.report_fd, report)

    def forget(self) -> None:
        """The next snapshot saves every name (a new session starts full)."""
        self.flush()
        self.wait()
        self.ledger.forget()
        self.fingerprints.clear()

    def names(self) -> list[str]:
        """The names a checkpoint of this namespace would hold."""
        return snapshot.saveable_names(self.shell.user_ns, self._hidden())

    def plan(self, candidates: list[str]) -> Plan | None:
        """What the next snapshot must look at; None when nothing can have changed.

        With a snapshot in flight the digests here may be one cell old; that
        only ever adds names to look at (the chained child plans again with
        the fresh ones), so None still means nothing changed.
        """
        if self.root is None:
            return None
        with self._changed:  # the collector thread merges digests under it
            self._changed.wait_for(lambda: len(self._pending) < MAX_IN_FLIGHT)
            sizes, digests = self.ledger.sizes, self.ledger.digests
            if self._latest_in_flight() is not None and self._saving:
                sizes, digests = self._as_saved(sizes, digests)
            return snapshot.changed_names(
                self.shell.user_ns, self._hidden(), self.ledger.ids, sizes, digests, candidates
            )

    def _as_saved(self, sizes: dict[str, int], digests: dict[str, str]) -> tuple[dict[str, int], dict[str, str]]:
        """The ledger as it will be once the children in flight report (under the lock).

        A name a child is saving has no digest here yet, so without this
        every small cell after a large one would save the large value again
        (and fork to do so). Such a name counts as saved, under a digest no
        entry can match; its size, until the child says, is the object's own
        (sys.getsizeof: exact for bytes and arrays, shallow for containers, so
        a container still counts as small and is compared again, as any
        small value is).
        """
        namespace = self.shell.user_ns
        estimated = {
            name: sys.getsizeof(namespace[name])
            for name in self._saving
            if name not in sizes and name in namespace and id(namespace[name]) == self._saving[name]
        }
        pending = {name: _BEING_SAVED for name in estimated if name not in digests}
        return {**estimated, **sizes}, {**pending, **digests}

    def take_here(self, execution_count: int, plan: Plan) -> bool:
        """Snapshot a small change in this process, before the reply; False: it needs a child (take).

        Pickles stop at INLINE_BYTES, or at a value whose pickling may run
        the notebook's code (snapshot.NotHere), so a cell that turns out to
        have changed much costs at most that before it forks after all. The
        report is in the journal before the reply leaves. With no child in
        flight it goes to the kernel at once; with one, it waits
        behind the latest child (its collector reports it after that child's
        own, in order) and says which cell's snapshot it builds on
        (`after`): the kernel believes it only once that one is, also when it
        reads it from the journal because this worker died meanwhile. The
        digests here may then be a cell or two old, so every candidate is
        saved again; the collector drops what turns out unchanged.
        """
        if self.report_fd is None or self.root is None:
            return False
        todo, removed, ids, aliases = plan
        if sum(self.ledger.sizes.get(name, 0) for name in todo) > INLINE_BYTES:
            return False  # known to be large: straight to a child
        with self._changed:
            behind = self._latest_in_flight()
            if behind is not None and len(self._behind.get(behind, [])) >= MAX_BEHIND:
                return False  # a child that does not end: fork, and wait for it (MAX_IN_FLIGHT)
            digests = dict(self.ledger.digests) if behind is None else {}
        previous = {name: digests[name] for name in todo if name in digests}
        namespace = self.shell.user_ns
        _track_notebook_classes(namespace[name] for name in todo if name in namespace)  # as take() does
        try:
            result = snapshot.take(
                namespace, todo, previous, self.root, map, aliases, self.fingerprints,
                durable=False, budget=snapshot.Budget(INLINE_BYTES),
            )  # fmt: skip
        except snapshot.NotHere:
            return False
        report: dict[str, Any] = {
            "type": "snapshot",
            "execution_count": execution_count,
            "entries": result["entries"],
            "removed": removed,
            "written": result["written"],
            "complete": False,
        }
        if behind is not None:
            report["after"] = self._latest_count
        try:
            crash_points.reach("worker.before_journal", execution_count)
            # First in the journal: if the kernel (or, behind a child, this worker) dies now, it is there.
            frames.journal(self.root, report)
        except OSError:
            return False  # a child tries again (and says why, should it fail too)
        crash_points.reach("worker.after_journal", execution_count)
        with self._changed:
            if behind is not None and behind not in self._pending and behind == self._failed_pid:
                self._unjournal(execution_count)  # it built on a snapshot that failed meanwhile:
                return False  # a child compares everything (the failure emptied ledger.ids)
            self.ledger.ids = ids
            self._latest_count = execution_count
            if behind is not None and behind in self._pending:
                self._behind.setdefault(behind, []).append(_Behind(report, result["fingerprints"]))
                return True
            report.pop("after", None)  # that child reported meanwhile: its collector is past the queue
            self._learn_here(report, result["fingerprints"])
        with contextlib.suppress(OSError):  # a kernel that is gone reads the journal instead
            frames.write_frame(self.report_fd, report)
        return True

    def _latest_in_flight(self) -> int | None:
        """The pid of the latest child, if its digests have not come back (under the lock).

        Children end in order (each is chained behind the one before), so
        when the latest is done, all are.
        """
        return self._latest_pid if self._latest_pid in self._pending else None

    def _unjournal(self, execution_count: int) -> None:
        """Take back a journal entry that is not true after all (what it builds on failed)."""
        assert self.root is not None
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.root, frames.JOURNAL_DIR, frames.journal_name(execution_count)))

    def _learn_here(self, report: dict[str, Any], fingerprints: dict[str, str]) -> None:
        """Merge a snapshot taken here (under the lock); with its base's digests now known, drop
        the entries it found unchanged (saved again only because its digests were old)."""
        digests = self.ledger.digests
        entries = report["entries"]
        for name in [name for name, entry in entries.items() if digests.get(name) == entry.get("digest")]:
            del entries[name]
        learned = {name: (entry.get("digest"), entry.get("size", 0)) for name, entry in entries.items()}
        self.ledger.learn(learned, report["removed"])
        self._remember_fingerprints(fingerprints)

    def take(self, execution_count: int, plan: Plan, candidates: list[str]) -> int:
        """Fork, before the reply (the child holds the cell's state from then on); return its pid.

        The child snapshots while this process serves on; `announce` tells the
        kernel its pid once the reply is out.
        """
        namespace = self.shell.user_ns
        _track_notebook_classes(namespace[name] for name in plan[0] if name in namespace)
        chunks.preload()  # imported once (cached) in this process; children inherit it
        read_fd, write_fd = os.pipe()
        state_read, state_write = os.pipe()
        # Under the lock, so a collector cannot pass on digests (and close the
        # pipe) between deciding to chain and the fork; the child never
        # touches this lock.
        with self._changed:
            predecessor = self._latest_pid
            chained = self._latest_in_flight() is not None
            if chained:
                self._successors[predecessor] = state_write
            worker_pid = os.getpid()
            with warnings.catch_warnings():
                # fork with threads: the child starts its own (HashingThreads) and uses no inherited lock
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                os.close(state_write)
                if not chained:
                    os.close(state_read)
                    state_read = -1
                # The child's copies of digests/sizes are frozen by the fork.
                known = (self.ledger.ids, self.ledger.digests, self.ledger.sizes)
                chain = (state_read, worker_pid, predecessor)
                self._child(namespace, execution_count, candidates, known, chain, write_fd)
            self._pending.add(pid)
            self._latest_pid = pid
            self._latest_count = execution_count
            self.ledger.ids = plan[2]
            if not chained:
                self._saving = {}
            self._saving.update({name: plan[2][name] for name in plan[0] if name in plan[2]})
        os.close(write_fd)
        os.close(state_read)
        if not chained:
            os.close(state_write)
        # The collector first: it passes the digests on to a chained child even if the kernel is gone.
        threading.Thread(
            target=self._collect, args=(pid, read_fd, execution_count), name="capsule-snapshot", daemon=True
        ).start()
        return pid

    def announce(self, execution_count: int, pid: int) -> None:
        """Tell the kernel which child holds a cell's snapshot (after the 'done' that announced one)."""
        self.channel.send({"type": "snapshot_started", "execution_count": execution_count, "pid": pid})

    def _child(
        self,
        namespace: dict[str, Any],
        execution_count: int,
        candidates: list[str],
        known: tuple[dict[str, int], dict[str, str], dict[str, int]],
        chain: tuple[int, int, int],
        digest_fd: int,
    ) -> None:
        """Plan and take one snapshot; `chain` is (pipe to wait on or -1, the worker's pid, the previous child's)."""
        known_ids, digests, sizes = known
        state_fd, worker_pid, predecessor = chain
        status = 1
        learned: dict[str, Any] = {}
        removed: list[str] = []
        fingerprints: dict[str, str] = {}
        try:
            # Background work: the next cells (the worker, the kernel) come first on a busy CPU.
            with contextlib.suppress(OSError):
                os.nice(SNAPSHOT_NICENESS)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            for signum in (signal.SIGUSR2, signal.SIGXCPU):
                signal.signal(signum, signal.SIG_DFL)
            # Locks of the parent's threads may be held: never print or use the channel here.
            sys.stdout = sys.stderr = io.StringIO()
            self.channel.close_after_fork()
            assert self.root is not None
            complete = False
            if state_fd >= 0:
                # Chained: wait for the previous snapshot's outcome.
                state = _wait_for_frame(state_fd, worker_pid)
                if state is None:
                    # The worker died before passing it on: what the store
                    # holds is unknown, so save every name and say the list
                    # is whole (names missing from it were deleted). Report
                    # after the previous snapshot, which is recorded first.
                    state, complete = {"ok": False}, True
                    _wait_until_gone(predecessor)
                digests, sizes = state.get("digests", {}), state.get("sizes", {})
                if not state.get("ok"):
                    known_ids = {}  # it failed: compare everything
            # Planned here, not in the parent: these are the digests as of the fork (or the chain).
            plan = snapshot.changed_names(namespace, self._hidden(), known_ids, sizes, digests, candidates)
            todo, removed, _, aliases = plan if plan else ([], [], {}, {})
            previous = {name: digests[name] for name in todo if name in digests}
            with HashingThreads() as pool:
                result = snapshot.take(
                    namespace, todo, previous, self.root, pool.map, aliases, self.fingerprints, durable=False
                )
            report = {
                "type": "snapshot",
                "execution_count": execution_count,
                "entries": result["entries"],
                "removed": removed,
                "written": result["written"],
                "complete": complete,
            }
            learned = {name: [entry.get("digest"), entry.get("size", 0)] for name, entry in result["entries"].items()}
            fingerprints = result["fingerprints"]
            status = 0
        except BaseException as err:  # noqa: BLE001 - report, never raise, in a forked child
            report = {
                "type": "snapshot_failed",
                "execution_count": execution_count,
                "reason": f"{type(err).__name__}: {err}",
            }
        try:
            if status == 0:
                crash_points.reach("child.before_journal", execution_count)
                # First in the journal: if the kernel dies now, the next kernel adopts it from there.
                with contextlib.suppress(OSError):
                    frames.journal(self.root, report)
                crash_points.reach("child.after_journal", execution_count)
            # The worker learns the outcome before the kernel does: killed in between, the worker
            # knows the snapshot was taken and passes its journaled report on itself (_collect).
            outcome = {"ok": status == 0, "digests": learned, "removed": removed, "fingerprints": fingerprints}
            _write_all(digest_fd, json.dumps(outcome).encode() + b"\n")
            crash_points.reach("child.after_digests", execution_count)
            if self.report_fd is not None:
                # A kernel that is gone (EPIPE) reads the journal instead; the digests still went to the
                # worker, so what is chained behind this snapshot builds on it rather than starting over.
                with contextlib.suppress(OSError):
                    frames.write_frame(self.report_fd, report)
            crash_points.reach("child.after_report", execution_count)
            _write_all(digest_fd, _REPORTED)
            # Close before exiting: tearing down a large copy-on-write address
            # space takes a while, and the parent only needs the digests.
            os.close(digest_fd)
        finally:
            os._exit(status)

    def _collect(self, pid: int, read_fd: int, execution_count: int) -> None:
        """Learn the new digests from the child, report what was taken here behind it, pass the
        digests on to a chained child, reap it."""
        result, reaped = {}, False
        try:
            result, reaped = self._hear_out(pid, read_fd, execution_count)
        finally:
            with self._changed:
                ok = self._learn(result, pid)
                if not ok:
                    self._failed_pid = pid
            forward, state = self._report_behind(pid, ok)
        if forward is not None:
            try:
                _write_all(forward, state)
            except OSError:
                pass  # the chained child died: its own report says so
            finally:
                os.close(forward)
        if not reaped:
            os.waitpid(pid, 0)

    def _hear_out(self, pid: int, read_fd: int, execution_count: int) -> tuple[dict[str, Any], bool]:
        """The child's outcome ({}: it failed), and whether it was reaped here (it died without a word).

        A child killed (an OOM kill, a kill -9) after it journaled still
        saved its snapshot: its outcome is read from the journal, and the
        report it may not have sent is sent for it (told twice is recorded
        once). Killed before it journaled, its failure is reported, named.
        """
        result, reported = self._read_digests(read_fd)
        told: dict[str, Any] | None = None  # a report the child did not get to send
        reaped = False
        if not result:
            told = self._own_journal_entry(execution_count)
            if told is not None:
                result = _outcome_of(told)
            else:
                reaped = True
                told = {
                    "type": "snapshot_failed",
                    "execution_count": execution_count,
                    "reason": f"the snapshot process {_how_it_ended(pid)} before it saved",
                }
        elif not reported and result.get("ok"):
            told = self._own_journal_entry(execution_count)
        if told is not None and self.report_fd is not None:
            with contextlib.suppress(OSError):  # before what is queued behind it: the kernel believes in order
                frames.write_frame(self.report_fd, told)
        return result, reaped

    def _report_behind(self, pid: int, ok: bool) -> tuple[int | None, bytes]:
        """Report the snapshots taken here behind a child that is done; then (the pipe to the child
        chained after it, or None; the digests to pass it).

        Until the queue behind it is empty the child counts as in flight: a
        snapshot taken here meanwhile queues behind it too, so the report
        pipe keeps the cells' order.
        """
        while True:
            with self._changed:
                behind = self._behind.pop(pid, [])
                if not behind:
                    self._pending.discard(pid)
                    forward, state = self._successors.pop(pid, None), b""
                    if forward is not None:
                        ledger = self.ledger
                        state = frames.encode(
                            {"type": "digests", "ok": ok, "digests": ledger.digests, "sizes": ledger.sizes}
                        )
                    self._changed.notify_all()
                    return forward, state
                reports = [self._settle_behind(item, ok) for item in behind]
            for report in reports:
                with contextlib.suppress(OSError):  # a kernel that is gone reads the journal instead
                    frames.write_frame(self.report_fd, report)

    def _own_journal_entry(self, execution_count: int) -> dict[str, Any] | None:
        """What a child of this worker journaled for a cell, read as the kernel reads it (None: nothing)."""
        assert self.root is not None
        try:
            with frames.opened_journal(self.root) as directory:
                return frames.read_journaled_snapshot(frames.journal_name(execution_count), frames.SNAPSHOT, directory)
        except (OSError, frames.ProtocolError):
            return None

    def _settle_behind(self, item: _Behind, ok: bool) -> dict[str, Any]:
        """The report of a snapshot taken here behind a child, now that the child is done (under the lock).

        If the child failed, this one is a change on top of a snapshot that
        does not exist: it fails too (its journal entry goes), and the next
        snapshot compares everything.
        """
        report = item.report
        if report["type"] != "snapshot":
            return report  # a failure (abandon): said as it is
        if ok:
            self._learn_here(report, item.fingerprints)
            return report
        self.ledger.ids = {}
        self._unjournal(report["execution_count"])
        return {
            "type": "snapshot_failed",
            "execution_count": report["execution_count"],
            "reason": f"it builds on the snapshot of cell [{report['after']}], which failed",
        }

    @staticmethod
    def _read_digests(read_fd: int) -> tuple[dict[str, Any], bool]:
        """The child's outcome ({} if it never said) and whether it went on to send its report."""
        with os.fdopen(read_fd, "rb") as pipe:
            raw = pipe.read()
        line, newline, rest = raw.partition(b"\n")
        if not newline:
            return {}, False
        try:
            return json.loads(line), rest == _REPORTED
        except ValueError:
            return {}, False

    def _learn(self, result: dict[str, Any], pid: int) -> bool:
        """Merge one child's digests (called under the lock); False if it failed."""
        if not result.get("ok"):
            if pid == self._latest_pid:
                self.ledger.ids = {}  # compare everything next time
            return False
        self.ledger.learn(result["digests"], result["removed"])
        self._remember_fingerprints(result.get("fingerprints") or {})
        return True

    def _remember_fingerprints(self, seen: dict[str, str]) -> None:
        """Keep the latest MAX_FINGERPRINTS; a forgotten one costs a SHA-256, never correctness."""
        for key, digest in seen.items():
            self.fingerprints.pop(key, None)
            self.fingerprints[key] = digest
        for key in list(islice(self.fingerprints, max(0, len(self.fingerprints) - MAX_FINGERPRINTS))):
            del self.fingerprints[key]

    def _hidden(self) -> set[str]:
        """Names not saved: IPython's and the profile's start-up names, while they still hold what they held.

        The rule of IPython's %who: a hidden name rebound by a cell is the user's again.
        """
        namespace = self.shell.user_ns
        return {name for name, value in self.shell.user_ns_hidden.items() if namespace.get(name, _ABSENT) is value}

    def restore(self, entries: dict[str, Any], replace: bool) -> dict[str, Any]:
        """Load a checkpoint into the namespace; report what could not be."""
        self.flush()
        self.wait()
        assert self.source is not None
        namespace = self.shell.user_ns
        source = self.source
        if replace:
            clear_for_replace(namespace, self.names(), entries)
        with HashingThreads() as pool:
            restored, failed = snapshot.load_all(
                entries, namespace, lambda entry: snapshot.load(entry, source, pool.map, namespace), merge=not replace
            )
        self.ledger.restored(entries, restored, namespace, replace=replace)
        return {"restored": sorted(restored), "failed": failed}


class _Behind(NamedTuple):
    """A snapshot taken in the worker while a child was in flight: reported after that child's."""

    report: dict[str, Any]
    fingerprints: dict[str, str]


def _track_notebook_classes(values: Iterable[Any]) -> None:
    """Give classes defined in the notebook their cloudpickle tracker id here, before the fork.

    cloudpickle pickles such classes by value with a random id it keeps per
    process, and with their __dict__, where copyreg caches __slotnames__ the
    first time an instance is pickled. Made in each snapshot child (or, for
    __slotnames__, first in the worker itself), either would change the
    digest of the class and of every instance, and unchanged values would
    be saved again and listed as changed. Looks at the values and, for plain
    containers, their first elements.
    """
    from cloudpickle import cloudpickle as internals

    track = getattr(internals, "_get_or_create_tracker_id", None)
    by_reference = getattr(internals, "_should_pickle_by_reference", None)
    if track is None or by_reference is None:
        return
    seen: set[int] = set()

    def visit(value: Any) -> None:
        kind = value if isinstance(value, type) else type(value)
        if id(kind) in seen:
            return
        seen.add(id(kind))
        try:
            if not by_reference(kind):
                track(kind)
                # Pickling an instance caches __slotnames__ on its class (copyreg), which changes
                # the class's own pickle: cache it now, so the first snapshot taken in this
                # process does not make the next one see the class as changed.
                copyreg._slotnames(kind)
        except Exception:  # noqa: BLE001 - best effort; a miss costs a re-save, not correctness
            pass

    for value in values:
        visit(value)
        if isinstance(value, list | tuple | set | frozenset):
            for item in list(islice(value, 1000)):
                visit(item)
        elif isinstance(value, dict):
            for item in list(islice(value.values(), 1000)):
                visit(item)


def _wait_for_frame(fd: int, parent: int) -> dict[str, Any] | None:
    """One frame from the parent; None if the parent is gone.

    Not read to end-of-file: a snapshot child forked meanwhile may hold a
    copy of the pipe's write end, and EOF would never come. While waiting,
    check now and then that the worker that forked us still lives.
    """
    decoder = frames.FrameDecoder()
    while True:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            if os.getppid() != parent:
                return None
            continue
        block = os.read(fd, 1 << 20)
        if not block:
            return None
        messages = decoder.feed(block)
        if messages:
            return messages[0]


def _wait_until_gone(pid: int, timeout: float = 60.0) -> None:
    """Poll until a process has exited (or is a zombie); give up after `timeout`."""
    deadline = time.monotonic() + timeout
    while process_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _outcome_of(report: dict[str, Any]) -> dict[str, Any]:
    """A child's outcome, as it would have told it, from the report it journaled."""
    entries = report.get("entries", {})
    learned = {name: [entry.get("digest"), entry.get("size", 0)] for name, entry in entries.items()}
    return {"ok": True, "digests": learned, "removed": report.get("removed", []), "fingerprints": {}}


def _how_it_ended(pid: int) -> str:
    """Reap a child that died without a word, and say how ("was killed by SIGKILL")."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return "ended"
    if os.WIFSIGNALED(status):
        return f"(pid {pid}) was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"(pid {pid}) exited with code {os.waitstatus_to_exitcode(status)}"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
