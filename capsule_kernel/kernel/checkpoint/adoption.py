"""Adopting what a dead kernel's sandboxes journaled: the snapshots it had not recorded when it died.

Runs in the KERNEL. A cell's reply is sent while its snapshot may still be
running; if the kernel is killed then, the sandbox's keeper (sandbox/keeper.py)
lets the snapshot finish and the report lands in the sandbox's journal
(frames.journal) instead of being recorded. The next kernel that opens the
same CAPSULE_HOME finds the sandbox in the store's ledger (the row its kernel
wrote when it started it, never anything the sandbox wrote) and records the
journaled reports beyond what the dead kernel had recorded, under the same
checks as a live report:

- the file is decoded as one frame from the sandbox's kind of sender (the
  subprocess sandbox's snapshot children, or the trusted Wasm host), with the
  same size caps;
- session, spool, sandbox kind and ``made_in`` come from the ledger row;
- only cells the dead kernel started and never settled (pending durable
  promises) are accepted: a sandbox cannot invent a cell, and a coalesced
  snapshot holds exactly the pending cells up to it;
- every chunk is copied out of the spool and hashed (CheckpointStore.adopt).

The cells still pending afterwards are what was lost, and resume names them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsule_kernel.kernel.checkpoint.rows import SandboxRecord
from capsule_kernel.kernel.checkpoint.store import CheckpointStore
from capsule_kernel.kernel.sandbox.cgroups import left_by_a_gone_kernel
from capsule_kernel.protocol import frames
from capsule_kernel.protocol.deaths import process_exists, process_start

# Settle one of the dead kernel's cell promises: (session, kernel id, count, value).
Settle = Callable[[str, str, int, dict[str, Any]], None]
# The dead kernel's pending cells in a session: count -> the promise's param.
Pending = Callable[[str, str], Awaitable[dict[int, dict[str, Any]] | None]]


@dataclass
class Adopted:
    """What one adoption pass did, for the log and for %capsule resume."""

    recorded: dict[str, list[int]] = field(default_factory=dict)  # session -> cells whose state was adopted
    refused: list[str] = field(default_factory=list)  # journal entries not believed, and why
    waiting: list[str] = field(default_factory=list)  # sandboxes whose keeper still runs (adopted later)


def keeper_alive(keeper: str) -> bool:
    """The keeper ("PID START") still runs: the same process, not a later one with its pid."""
    try:
        pid, start = keeper.split()
    except ValueError:
        return False
    return process_exists(int(pid)) and process_start(int(pid)) == start


async def adopt_orphans(
    store: CheckpointStore,
    pending: Pending,
    settle: Settle,
    log: logging.Logger,
    *,
    wait_for: str | None = None,
    patience: float = 70.0,
    keep: int | None = None,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Adopted:
    """Adopt the journals of every sandbox whose kernel is gone; sweep spools nobody will adopt.

    A sandbox whose keeper still runs is finishing its last snapshots: for the
    session `wait_for` (the one being resumed) this waits for it, up to
    `patience` seconds; the others are left for a later pass.
    """
    adopted = Adopted()
    for record in await asyncio.to_thread(store.sandboxes):
        if not left_by_a_gone_kernel(Path(record.name)):
            continue  # its kernel lives (this one, or another sharing CAPSULE_HOME)
        if keeper_alive(record.keeper):
            if record.session != wait_for:
                adopted.waiting.append(record.name)
                continue
            deadline = clock() + patience
            while keeper_alive(record.keeper) and clock() < deadline:
                await sleep(0.02)
        await _adopt_one(store, record, pending, settle, log, adopted, keep)
    await asyncio.to_thread(_sweep, store, adopted.waiting)
    return adopted


async def _adopt_one(
    store: CheckpointStore,
    record: SandboxRecord,
    pending: Pending,
    settle: Settle,
    log: logging.Logger,
    adopted: Adopted,
    keep: int | None,
) -> None:
    spool = Path(record.spool)
    sender = frames.HOST if record.kind == "wasm" else frames.SNAPSHOT
    reports = await asyncio.to_thread(_read_journal, spool, sender, adopted.refused)
    cells = await pending(record.session, record.kernel_id) if reports else {}
    believed: set[int] = set()  # the cells whose journaled snapshot this pass recorded
    for report in reports:
        count = report["execution_count"]
        if count <= record.recorded_through:
            continue  # recorded before the kernel died
        after = report.get("after")
        if after is not None and after > record.recorded_through and after not in believed:
            adopted.refused.append(
                f"{record.name}: cell [{count}]: a change on top of cell [{after}], whose snapshot was never recorded"
            )
            continue
        if cells is not None and count not in cells:
            adopted.refused.append(f"{record.name}: a journaled snapshot of cell [{count}], which its kernel never ran")
            continue
        covers = sorted(c for c in (cells or {count: {}}) if c <= count)
        first_line = str((cells or {}).get(count, {}).get("first_line", ""))
        checkpoint_id, problem = await asyncio.to_thread(_record, store, record, report, first_line, keep)
        if problem is not None:
            adopted.refused.append(f"{record.name}: cell [{count}]: {problem}")
            continue
        believed.add(count)
        adopted.recorded.setdefault(record.session, []).extend(covers)
        for cell in covers:
            value: dict[str, Any] = {"checkpoint": checkpoint_id, "adopted_by_a_later_kernel": True}
            if cell != count:
                value["coalesced_into"] = count
            settle(record.session, record.kernel_id, cell, value)
            if cells is not None:
                cells.pop(cell, None)
    for refusal in adopted.refused:
        log.warning("not adopted: %s", refusal)
    await asyncio.to_thread(store.forget_sandbox, record.name)
    await asyncio.to_thread(shutil.rmtree, spool, True)


def _read_journal(spool: Path, sender: str, refused: list[str]) -> list[dict[str, Any]]:
    """The journaled reports, by cell; what does not decode as a report from `sender` is refused."""
    reports = []
    try:
        with frames.opened_journal(spool) as directory:
            for name in sorted(os.listdir(directory)):
                stem = name.removesuffix(frames.JOURNAL_SUFFIX)
                if stem == name or not stem.isdigit():
                    continue  # a temporary file of a write the kernel's death cut short
                try:
                    reports.append(frames.read_journaled_snapshot(name, sender, directory))
                except (OSError, frames.ProtocolError) as err:
                    refused.append(f"{spool.name}: journal entry {name}: {err}")
    except OSError:
        return []  # none, or not a directory of its own (a link: never followed)
    return sorted(reports, key=lambda report: report["execution_count"])


def _record(
    store: CheckpointStore, record: SandboxRecord, report: dict[str, Any], first_line: str, keep: int | None
) -> tuple[str | None, str | None]:
    """Record one journaled report as the live kernel would have: (checkpoint id, None) or (None, why not)."""
    count = report["execution_count"]
    entries = {name: {k: v for k, v in entry.items() if k != "made_in"} for name, entry in report["entries"].items()}
    if record.kind == "wasm":
        entries = {name: {**entry, "made_in": "wasm"} for name, entry in entries.items()}
    removed = list(report["removed"])
    if "after" in report:
        # Taken while the snapshot it builds on was in flight, it saved every candidate again
        # (worker/snapshots.py take_here): what that one already holds is not a change.
        base = store.latest(record.session)
        held = base.entries if base is not None else {}
        entries = {
            name: entry for name, entry in entries.items() if held.get(name, {}).get("digest") != entry.get("digest")
        }
    if not entries and not removed:
        store.note_unchanged(record.session, count, record.name)
        return store.latest_id(record.session), None
    bad = store.adopt(Path(record.spool), entries)
    if bad:
        return None, f"{len(bad)} chunk(s) missing or corrupt"
    checkpoint = store.record(
        record.session,
        count,
        first_line,
        entries,
        removed,
        int(report.get("written", 0)),
        complete=bool(report.get("complete")),
        sandbox=record.name,
        origin=record.origin or None,
    )
    store.prune(record.session, keep)
    return checkpoint.id, None


def _sweep(store: CheckpointStore, waiting: list[str]) -> None:
    """Remove the spools of gone kernels that no ledger row names (task sandboxes', or already adopted)."""
    spools = store.home / "spool"
    with contextlib.suppress(OSError):
        for entry in spools.iterdir():
            if entry.name not in waiting and left_by_a_gone_kernel(entry):
                shutil.rmtree(entry, ignore_errors=True)
