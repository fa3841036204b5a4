"""The rows the store keeps: Checkpoint, SandboxRecord, CheckpointRefused, and the SQL schema and columns.

Below the store's parts, so each takes them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY,
    session TEXT NOT NULL,
    seq INTEGER NOT NULL,
    parent TEXT,
    execution_count INTEGER NOT NULL,
    first_line TEXT NOT NULL,
    created REAL NOT NULL,
    status TEXT NOT NULL,
    entries TEXT NOT NULL,
    changed TEXT NOT NULL,
    removed TEXT NOT NULL,
    size INTEGER NOT NULL,
    written INTEGER NOT NULL,
    mac TEXT,
    origin TEXT
);
CREATE INDEX IF NOT EXISTS checkpoints_by_session ON checkpoints (session, seq);
-- Snapshots that found nothing changed: the state after that cell is the checkpoint before it.
CREATE TABLE IF NOT EXISTS unchanged (
    session TEXT NOT NULL,
    execution_count INTEGER NOT NULL,
    mac TEXT NOT NULL,
    PRIMARY KEY (session, execution_count)
);
-- The kernel's own record of each sandbox it started (never anything a sandbox wrote): whose it
-- is, where its spool and journal are, who keeps it after the kernel, and how far its reports
-- were recorded. A later kernel adopts what a dead kernel's sandbox journaled beyond that
-- (checkpoint/adoption.py).
-- A user's restart of a session's kernel, and the newest checkpoint then: the next kernel does not
-- offer to resume what the user chose to leave.
CREATE TABLE IF NOT EXISTS restarts (
    session TEXT PRIMARY KEY,
    checkpoint TEXT,
    mac TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sandboxes (
    name TEXT PRIMARY KEY,
    session TEXT NOT NULL,
    kind TEXT NOT NULL,
    kernel_id TEXT NOT NULL,
    kernel_pid INTEGER NOT NULL,
    keeper TEXT NOT NULL,
    spool TEXT NOT NULL,
    recorded_through INTEGER NOT NULL,
    mac TEXT NOT NULL,
    origin TEXT NOT NULL DEFAULT ''
);
-- Who may switch into a session with %capsule session: the notebook that created it (the
-- frontend's or operator's name for a notebook owns the session of that name).
CREATE TABLE IF NOT EXISTS sessions (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    mac TEXT NOT NULL
);
"""

# Every checkpoint column, in the order the MAC covers them; `origin` (the notebook whose kernel
# wrote the row) came later and is covered only when set, so older rows still authenticate.
CHECKPOINT_COLUMNS = (
    "id, session, seq, parent, execution_count, first_line, created, status, entries, changed, removed, "
    "size, written, origin, mac"
)

SANDBOX_COLUMNS = "name, session, kind, kernel_id, kernel_pid, keeper, spool, recorded_through, origin, mac"


@dataclass(frozen=True)
class SandboxRecord:
    """One row of the sandboxes table: a sandbox as the kernel that started it saw it."""

    name: str
    session: str
    kind: str
    kernel_id: str
    kernel_pid: int
    keeper: str  # "PID START" of its keeper process (keeper.py), or "" without one
    spool: str
    recorded_through: int
    origin: str = ""  # as Checkpoint.origin: "" in its kernel's own session, else that kernel's notebook


@dataclass(frozen=True)
class Checkpoint:
    id: str
    session: str
    seq: int
    parent: str | None
    execution_count: int
    first_line: str
    created: float
    status: str
    entries: dict[str, Any]
    changed: list[str]
    removed: list[str]
    size: int
    written: int
    # None when the kernel that wrote it was in its own session; after a switch into another
    # session (%capsule session), the notebook identity of that kernel: the session's own
    # notebook resumes it only when asked for it by id.
    origin: str | None = None

    @property
    def switched_in(self) -> bool:
        return self.origin is not None

    def foreign_to(self, notebook: str) -> bool:
        """Written by another notebook that switched into this session: never loaded unasked."""
        return self.switched_in and self.origin != notebook

    @property
    def unsaved(self) -> dict[str, str]:
        return {name: entry["error"] for name, entry in self.entries.items() if "error" in entry}


class CheckpointRefused(ValueError):
    """A checkpoint row that fails authentication: nothing of it is loaded."""


def switched_in_by_another(checkpoint: Checkpoint, notebook: str) -> str | None:
    """Why a checkpoint is not resumed unasked: another notebook wrote it after switching into this session.

    Its values are that notebook's pickles; loading them runs its code in
    this notebook's sandbox, with this notebook's files. Only a request by
    the checkpoint's id brings it back.
    """
    if not checkpoint.foreign_to(notebook):
        return None
    return (
        f"the newest checkpoint of session {checkpoint.session}, {checkpoint.id[:8]} (after cell "
        f"[{checkpoint.execution_count}]), was written by notebook {checkpoint.origin} after it switched into "
        "this session, so it is not loaded unasked (loading it runs that notebook's code here). If you trust "
        f"it, ask for it by id: %capsule resume {checkpoint.id[:12]}"
    )
