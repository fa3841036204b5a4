"""The kernel's side of checkpoints: record what sandboxes report, restore it.

Snapshot manifests arrive from the sandbox as JSON frames. Before a
checkpoint is recorded (and so reported complete) every new chunk it names
is checked against its digest, off the event loop; then it is written to
SQLite in one transaction. Restoring hands the manifest back to a sandbox,
which does the unpickling: the kernel never does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from capsule_kernel.kernel.checkpoint.adoption import Adopted, adopt_orphans
from capsule_kernel.kernel.checkpoint.disk_window import DiskWindow
from capsule_kernel.kernel.checkpoint.home import default_home
from capsule_kernel.kernel.checkpoint.rows import Checkpoint, SandboxRecord
from capsule_kernel.kernel.checkpoint.store import CheckpointStore
from capsule_kernel.protocol import crash_points, frames
from capsule_kernel.protocol.deaths import process_start

_KEEP_CELL_SOURCES = 256


def prune_journal(spool: Path | None, recorded: int) -> None:
    """Drop the journaled reports up to a recorded cell: the store holds them now (frames.journal)."""
    if not isinstance(spool, Path):
        return
    with contextlib.suppress(OSError), frames.opened_journal(spool) as directory:  # never through a link
        for name in os.listdir(directory):
            stem = name.removesuffix(frames.JOURNAL_SUFFIX)
            if stem != name and stem.isdigit() and int(stem) <= recorded:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=directory)


def _widgets_note(widgets: Any) -> str:
    """What became of restored widgets (the sandbox's account: names only, shown as text, bounded)."""
    if not isinstance(widgets, dict):
        return ""

    def names(key: str) -> str:
        listed = widgets.get(key)
        if not isinstance(listed, list):
            return ""
        # Namespace names, so identifiers: nothing else (no control characters) reaches the notebook.
        return ", ".join(name[:80] for name in listed[:20] if isinstance(name, str) and name.isidentifier())

    note = ""
    if names("reconnected"):
        note += f"; widgets reconnected to their views: {names('reconnected')}"
    if names("reopened"):
        note += (
            f"; widgets opened again: {names('reopened')} (their earlier views belonged to the earlier "
            "kernel: display them again to use them)"
        )
    return note


class Checkpoints:
    """Checkpointing for one kernel; inert when the store cannot be opened."""

    keep: int | None = None  # checkpoints kept per session (retention)
    # The notebook identity of this kernel and the session that is its own (session_identity, or
    # VS Code's path from its start-up code). What it writes into any other session (after
    # %capsule session) names the notebook, so the session's owner sees who switched in.
    notebook: str | None = None
    own_session: str | None = None

    def __init__(self, store: CheckpointStore | None, log: logging.Logger, problem: str | None = None) -> None:
        self.store = store
        self.log = log
        self.problem = problem
        # Cells of this kernel whose snapshot failed: count -> (session, reason, when), the newest few.
        self.failures: OrderedDict[int, tuple[str, str, float]] = OrderedDict()
        self.window = DiskWindow()  # how long after each reply its checkpoint was on disk
        self._sources: OrderedDict[int, str] = OrderedDict()
        self._pending: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()  # one writer at a time, in order
        # Sessions whose namespace this kernel started empty (a new kernel that did not resume,
        # a restart) and that no checkpoint holds yet: the session's newest checkpoint is an
        # earlier namespace's, so it is neither restored after a death nor a base for deltas.
        self._afresh: set[str] = set()

    @classmethod
    def open(cls, log: logging.Logger) -> Checkpoints:
        if os.environ.get("CAPSULE_CHECKPOINTS", "on").lower() in ("off", "0", "false", "no"):
            return cls(None, log, "switched off by CAPSULE_CHECKPOINTS")
        home = default_home()
        try:
            return cls(CheckpointStore(home), log)
        except Exception as err:  # noqa: BLE001 - a broken store must not stop the kernel
            log.error("checkpoints disabled: cannot open the store in %s: %s", home, err)
            return cls(None, log, f"the store in {home} cannot be opened: {err}")

    @property
    def chunk_root(self) -> Path | None:
        return self.store.chunks if self.store else None

    def latest(self, session: str) -> Checkpoint | None:
        return self.store.latest(session) if self.store else None

    def latest_id(self, session: str) -> str | None:
        """The latest checkpoint's id alone: cheap enough for every cell."""
        return self.store.latest_id(session) if self.store else None

    def failed(self, session: str, count: int, reason: str) -> None:
        """Cell `count` has no checkpoint of its own, and why (`%capsule log` lists it)."""
        self.failures.pop(count, None)
        self.failures[count] = (session, reason, time.time())
        while len(self.failures) > _KEEP_CELL_SOURCES:
            self.failures.popitem(last=False)

    def failure(self, count: int) -> str | None:
        found = self.failures.get(count)
        return found[1] if found else None

    def note_cell(self, execution_count: int, code: str) -> None:
        self._sources[execution_count] = code
        while len(self._sources) > _KEEP_CELL_SOURCES:
            self._sources.popitem(last=False)

    def describe_lost(self, cells: list[int]) -> str:
        """Name cells whose state no checkpoint holds, so that they can be run again."""
        named = ", ".join(f"[{count}] {self.first_line(count)!r}" for count in cells)
        return (
            f"not in it: the state of cell{'s' if len(cells) > 1 else ''} {named}, whose snapshot "
            "had not been saved when the sandbox died (deferred, or still being written); run them again"
        )

    def first_line(self, count: int) -> str:
        source = self._sources.get(count, "")
        return next((line for line in source.splitlines() if line.strip()), "")[:80]

    def origin_for(self, session: str) -> str | None:
        """What a checkpoint of `session` records as its origin: None in this kernel's own session."""
        return None if session == self.own_session else self.notebook

    def register(self, sandbox: Any, session: str, kernel_id: str) -> None:
        """Note a sandbox that just started in the store's ledger: a later kernel adopts its journal from it."""
        if self.store is None or sandbox.spool is None or sandbox.name is None:
            return
        keeper = ""
        if sandbox.keeper_pid is not None:
            keeper = f"{sandbox.keeper_pid} {process_start(sandbox.keeper_pid) or ''}"
        record = SandboxRecord(
            sandbox.name,
            session,
            sandbox.kind,
            kernel_id,
            os.getpid(),
            keeper,
            str(sandbox.spool),
            -1,
            self.origin_for(session) or "",
        )
        try:
            self.store.register_sandbox(record)
        except Exception:
            self.log.exception("could not note sandbox %s in the store", sandbox.name)

    def sandbox_session(self, sandbox: Any, session: str) -> None:
        if self.store is not None and sandbox is not None and sandbox.name is not None:
            self.store.sandbox_session(sandbox.name, session, self.origin_for(session) or "")

    async def adopt_orphans(self, promises: Any, wait_for: str | None = None) -> Adopted:
        """Record what dead kernels' sandboxes journaled after their kernel's last record (adoption.py)."""
        if self.store is None:
            return Adopted()

        async def pending(session: str, kernel_id: str) -> dict[int, dict[str, Any]] | None:
            return None if promises is None else await promises.pending_cells(session, kernel_id)

        def settle(session: str, kernel_id: str, count: int, value: dict[str, Any]) -> None:
            if promises is not None:
                promises.resolved_for(session, kernel_id, count, value)

        async with self._lock:
            adopted = await adopt_orphans(self.store, pending, settle, self.log, wait_for=wait_for, keep=self.keep)
        for session, cells in adopted.recorded.items():
            self.log.info("adopted the journaled snapshots of cells %s of session %s", cells, session)
        return adopted

    def record(self, session: str, event: dict[str, Any]) -> asyncio.Task:
        """Start recording a snapshot report; `settled` waits for it from this instant on."""
        task = asyncio.ensure_future(self._record(session, event))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def _record(self, session: str, event: dict[str, Any]) -> Checkpoint | None:
        if self.store is None:
            return None
        entries = event.get("entries", {})
        count = int(event.get("execution_count", 0))
        removed = list(event.get("removed", []))
        store = self.store
        spool, sandbox = event.get("spool"), event.get("sandbox")

        def note() -> None:
            store.note_unchanged(session, count, sandbox)
            prune_journal(spool, count)

        def verify_and_record(whole: bool) -> Checkpoint | str:
            # Off the event loop: copying and hashing new chunks and an fsynced commit take time.
            # A subprocess sandbox's new chunks wait in its spool; the Wasm host writes into the store.
            crash_points.reach("kernel.before_record", count)
            bad = store.adopt(spool, entries) if isinstance(spool, Path) else store.missing_chunks(entries)
            if bad:
                return f"{len(bad)} chunk(s) missing or corrupt after writing"
            crash_points.reach("kernel.after_chunks", count)
            checkpoint = store.record(
                session,
                count,
                self._sources.get(count, ""),
                entries,
                removed,
                int(event.get("written", 0)),
                complete=whole or bool(event.get("complete")),
                sandbox=sandbox,
                origin=self.origin_for(session),
            )
            crash_points.reach("kernel.after_commit", count)
            prune_journal(spool, count)
            crash_points.reach("kernel.after_prune", count)
            store.prune(session, self.keep)
            return checkpoint

        async with self._lock:
            # A namespace started afresh: its first report (every name it has) is the whole of it.
            afresh = session in self._afresh
            if not entries and not removed and not afresh:
                # Nothing changed: the previous checkpoint still holds; say so (a batch run's resume reads it).
                await asyncio.to_thread(note)
                return None
            outcome = await asyncio.to_thread(verify_and_record, afresh)
            if afresh and not isinstance(outcome, str):
                self._afresh.discard(session)
        if isinstance(outcome, str):
            self.failed(session, count, outcome)
            self.log.error("checkpoint after cell %s not recorded: %s", count, outcome)
            return None
        checkpoint = outcome
        self.log.debug("checkpoint %s recorded after cell %s", checkpoint.id[:8], count)
        return checkpoint

    async def settled(self, timeout: float = 30.0) -> None:
        """Wait for checkpoints being recorded, so 'latest' means latest."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=timeout)

    async def restore_latest(
        self, session: str, sandbox: Any, previous: Any = None, names: set[str] | None = None
    ) -> str:
        """Restore the session's last checkpoint into sandbox; describe the outcome.

        `previous` is the sandbox that died: a snapshot it had started may
        still be on its way, and it is the newest state there is.
        """
        if previous is not None:
            await previous.snapshots_settled(timeout=60.0)
        await self.settled()
        if self.store is None:
            return f"the namespace was lost (checkpoints are off: {self.problem})"
        latest = self.latest(session)
        if latest is None:
            return "no checkpoint had been taken yet, so the namespace starts empty"
        if session in self._afresh:
            # The newest checkpoint is from before this kernel's start or restart: never brought back unasked.
            return (
                "no checkpoint had been taken since the kernel started or restarted, so the namespace "
                "starts empty (%capsule log lists earlier checkpoints; %capsule restore brings one back)"
            )
        return await self.restore(latest, sandbox, replace=True, names=names)

    async def collect_garbage(self, grace_seconds: float) -> tuple[int, int, int]:
        """Apply retention to every session, then drop unreferenced chunks."""
        assert self.store is not None
        store = self.store

        def work() -> tuple[int, int, int]:
            dropped = sum(store.prune(session, self.keep) for session in store.sessions())
            files, freed = store.collect_garbage(grace_seconds)
            return dropped, files, freed

        async with self._lock:
            return await asyncio.to_thread(work)

    async def current_names(self, sandbox: Any) -> list[str]:
        result = await sandbox.request("names", {}, timeout=60)
        return list(result.get("names", []))

    def record_restore(self, session: str, execution_count: int, code: str, target: Checkpoint) -> Checkpoint | None:
        """The restore is history too: a checkpoint equal to the target, marked restored."""
        if self.store is None:
            return None
        return self.store.record(
            session, execution_count, code, {}, [], 0, status="restored", base=target, origin=self.origin_for(session)
        )

    def begin_afresh(self, session: str) -> None:
        """This kernel's namespace of `session` starts empty now (start without resume, restart).

        Until a snapshot of the new namespace is recorded, a death restores
        nothing; that first snapshot is recorded whole, not as changes on top
        of the earlier namespace's checkpoint. Call it with no snapshot of the
        earlier namespace still in flight.
        """
        self._afresh.add(session)

    async def restore(
        self, checkpoint: Checkpoint, sandbox: Any, *, replace: bool, names: set[str] | None = None
    ) -> str:
        """Load a checkpoint (or, with names, only those of its names) into a sandbox."""
        if replace:
            self._afresh.discard(checkpoint.session)
        entries = checkpoint.entries
        if names is not None:
            entries = {name: entry for name, entry in entries.items() if name in names}
        result = await sandbox.restore(entries, replace=replace)
        restored = result.get("restored", [])
        failed = dict(result.get("failed", {}))
        text = (
            f"checkpoint {checkpoint.id[:8]} (after cell [{checkpoint.execution_count}]) was restored"
            f" ({len(restored)} name{'s' if len(restored) != 1 else ''})"
        )
        if failed:
            text += "; not restored: " + "; ".join(f"{name} ({why})" for name, why in sorted(failed.items()))
        return text + _widgets_note(result.get("widgets"))
