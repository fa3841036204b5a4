"""The durable checkpoint store: one SQLite database (WAL) plus chunk files.

Lives under CAPSULE_HOME (default: the user's data directory, e.g.
~/.local/share/capsule-kernel). A checkpoint row is written in one
transaction, after every chunk it names has been written and checked, so a
kill -9 at any instant leaves a database that opens and holds every
checkpoint that was ever reported complete. Manifests are JSON; the kernel
that owns this store never unpickles what they point to.

Its parts: rows.py (the schema and row types), home.py (CAPSULE_HOME, names, the
key), sandbox_rows.py (the sandboxes table), chunk_intake.py (chunks in from a spool).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capsule_kernel.kernel.checkpoint.chunk_intake import ChunkIntake
from capsule_kernel.kernel.checkpoint.home import store_key
from capsule_kernel.kernel.checkpoint.rows import (
    CHECKPOINT_COLUMNS,
    SCHEMA,
    Checkpoint,
    CheckpointRefused,
)
from capsule_kernel.kernel.checkpoint.sandbox_rows import SandboxRows

# An all-digit reference shorter than this names an execution count, never an id prefix.
MIN_DIGIT_ID = 6


class CheckpointStore(SandboxRows, ChunkIntake):
    """Checkpoints of every session, and the chunks they share; every row is authenticated (HMAC-SHA256)."""

    def __init__(self, home: Path, clock: Any = time.time) -> None:
        self.home = home
        self.chunks = home / "chunks"
        self.chunks.mkdir(parents=True, exist_ok=True)
        self.path = home / "capsule.sqlite"
        self.clock = clock
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # The kernel records from a worker thread and reads from its loop.
        self._guard = threading.RLock()
        # digest -> (device, inode, size) of the chunk file last found sound.
        self._verified: dict[str, tuple[int, int, int]] = {}
        # session -> id of its newest checkpoint, as this process last wrote or read it. The
        # kernel asks on every cell, from its loop: without this it waits for the guard while
        # a worker thread's record holds it through an fsynced commit.
        self._latest_ids: dict[str, str] = {}
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        columns = [row[1] for row in self._db.execute("PRAGMA table_info(checkpoints)")]
        if "mac" not in columns:
            # A store from before rows were authenticated: its rows have no MAC and are refused.
            self._db.execute("ALTER TABLE checkpoints ADD COLUMN mac TEXT")
        if "origin" not in columns:
            self._db.execute("ALTER TABLE checkpoints ADD COLUMN origin TEXT")
        if "origin" not in [row[1] for row in self._db.execute("PRAGMA table_info(sandboxes)")]:
            self._db.execute("ALTER TABLE sandboxes ADD COLUMN origin TEXT NOT NULL DEFAULT ''")
        self._key = store_key(home)

    def close(self) -> None:
        with self._guard:
            self._db.close()

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._guard:
            return self._db.execute(sql, params).fetchall()

    def latest(self, session: str) -> Checkpoint | None:
        rows = self._query(
            f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE session = ? ORDER BY seq DESC LIMIT 1", (session,)
        )
        return self._row(rows[0]) if rows else None

    def latest_id(self, session: str) -> str | None:
        """The newest checkpoint's id (another process's later record of the session shows after this one's next)."""
        cached = self._latest_ids.get(session)
        if cached is not None:
            return cached
        rows = self._query("SELECT id FROM checkpoints WHERE session = ? ORDER BY seq DESC LIMIT 1", (session,))
        if not rows:
            return None
        self._latest_ids[session] = rows[0][0]
        return rows[0][0]

    def history(self, session: str, limit: int | None = None) -> list[Checkpoint]:
        rows = self._query(
            f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE session = ? ORDER BY seq DESC LIMIT ?",
            (session, limit or -1),
        )
        return [self._row(row) for row in reversed(rows)]

    def note_unchanged(self, session: str, execution_count: int, sandbox: str | None = None) -> None:
        """A snapshot after this cell found no name changed (no checkpoint row is written for it)."""
        mac = self._mac(("unchanged", session, execution_count))
        with self._guard, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT OR REPLACE INTO unchanged VALUES (?, ?, ?)", (session, execution_count, mac))
            self._advance(sandbox, execution_count)

    # -- the sandbox ledger ----------------------------------------------------------------

    def note_restart(self, session: str, checkpoint: str | None) -> None:
        """The user restarted this session's kernel while `checkpoint` was its newest."""
        mac = self._mac(("restart", session, checkpoint))
        with self._guard, self._db:
            self._db.execute("INSERT OR REPLACE INTO restarts VALUES (?, ?, ?)", (session, checkpoint, mac))

    def restarted_at(self, session: str) -> str | None:
        """The newest checkpoint when the user last restarted the session's kernel (a row failing its MAC: none)."""
        rows = self._query("SELECT checkpoint, mac FROM restarts WHERE session = ?", (session,))
        for checkpoint, mac in rows:
            if isinstance(mac, str) and hmac.compare_digest(mac, self._mac(("restart", session, checkpoint))):
                return checkpoint
        return None

    def unchanged_counts(self, session: str) -> set[int]:
        """The cells of this session whose snapshot found nothing to save (rows that fail their MAC are left out)."""
        rows = self._query("SELECT execution_count, mac FROM unchanged WHERE session = ?", (session,))
        return {
            count for count, mac in rows
            if isinstance(mac, str) and hmac.compare_digest(mac, self._mac(("unchanged", session, count)))
        }  # fmt: skip

    def find(self, session: str, ref: str) -> list[Checkpoint]:
        """The checkpoints an execution count ('12') or an id prefix ('3fa9') names, newest first.

        More than one is an ambiguity for the caller to report: after a
        restart, counts start again from 1, so [2] may name two checkpoints.
        A number shorter than MIN_DIGIT_ID is a count only: `restore 4` for a
        cell without a checkpoint must not bring back one whose id happens
        to start with 4.
        """
        if ref.isdigit():
            rows = self._query(
                f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE session = ? AND execution_count = ? "
                "ORDER BY seq DESC",
                (session, int(ref)),
            )
            if rows or len(ref) < MIN_DIGIT_ID:
                return [self._row(row) for row in rows]
        rows = self._query(
            f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE session = ? AND id LIKE ? ORDER BY seq DESC",
            (session, ref + "%"),
        )
        return [self._row(row) for row in rows]

    def record(
        self,
        session: str,
        execution_count: int,
        code: str,
        changed_entries: Mapping[str, Any],
        removed: list[str],
        written: int,
        status: str = "ok",
        base: Checkpoint | None = None,
        complete: bool = False,
        sandbox: str | None = None,
        origin: str | None = None,
    ) -> Checkpoint:
        """Add a checkpoint on top of `base` (default: the session's latest).

        `complete`: the entries are the whole namespace, not changes, so any
        other name of the parent was removed (a snapshot that could not learn
        what its predecessor saved saves everything). `sandbox`: the ledger
        row of the sandbox that reported it advances in the same transaction.
        `origin`: the notebook identity of the kernel whose sandbox made it.
        """
        with self._guard:
            parent = base if base is not None else self.latest(session)
            entries = dict(parent.entries) if parent else {}
            if complete:
                removed = sorted(set(entries) - set(changed_entries))
                changed = sorted(
                    name
                    for name, entry in changed_entries.items()
                    if entries.get(name, {}).get("digest") != entry.get("digest")
                )
                entries = dict(changed_entries)
            else:
                for name in removed:
                    entries.pop(name, None)
                entries.update(changed_entries)
                changed = sorted(changed_entries)
            first_line = next((line for line in code.splitlines() if line.strip()), "")[:120]
            checkpoint = Checkpoint(
                id=uuid.uuid4().hex,
                session=session,
                seq=(self._max_seq(session) + 1),
                parent=parent.id if parent else None,
                execution_count=execution_count,
                first_line=first_line,
                created=self.clock(),
                status=status,
                entries=entries,
                changed=changed,
                removed=sorted(removed),
                size=sum(entry.get("size", 0) for entry in entries.values()),
                written=written,
                origin=origin,
            )
            row = (
                checkpoint.id,
                session,
                checkpoint.seq,
                checkpoint.parent,
                execution_count,
                first_line,
                checkpoint.created,
                status,
                json.dumps(entries),
                json.dumps(checkpoint.changed),
                json.dumps(checkpoint.removed),
                checkpoint.size,
                written,
                origin,
            )
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    f"INSERT INTO checkpoints ({CHECKPOINT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (*row, self._checkpoint_mac(row)),
                )
                self._advance(sandbox, execution_count)
            self._latest_ids[session] = checkpoint.id
            return checkpoint

    def prune(self, session: str, keep: int | None) -> int:
        """Drop all but the newest `keep` checkpoints of a session; return how many went."""
        if keep is None:
            return 0
        keep = max(keep, 1)  # the latest is never dropped
        with self._guard, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            cursor = self._db.execute(
                "DELETE FROM checkpoints WHERE session = ? AND seq <= "
                "(SELECT MAX(seq) FROM checkpoints WHERE session = ?) - ?",
                (session, session, keep),
            )
            return cursor.rowcount

    # -- who owns a session ------------------------------------------------------------------

    def session_owner(self, name: str) -> str | None:
        """The notebook that created the session; None for a session no one has used yet.

        A session with checkpoints but no owner row (from before owners were
        recorded) is its own notebook's; a row that fails its MAC names no
        one, so no notebook may switch into that session.
        """
        rows = self._query("SELECT owner, mac FROM sessions WHERE name = ?", (name,))
        if rows:
            owner, mac = rows[0]
            valid = isinstance(mac, str) and hmac.compare_digest(mac, self._mac(("session", name, owner)))
            return owner if valid else ""
        if self._query("SELECT 1 FROM checkpoints WHERE session = ? LIMIT 1", (name,)):
            return name
        return None

    def claim_session(self, name: str, owner: str, *, replace: bool) -> str:
        """Record `owner` as the session's (replace: whatever was there); return who owns it now."""
        with self._guard, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            current = None if replace else self.session_owner(name)
            if current is None:
                mac = self._mac(("session", name, owner))
                self._db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?)", (name, owner, mac))
                return owner
            return current

    def sessions(self) -> list[str]:
        return [row[0] for row in self._query("SELECT DISTINCT session FROM checkpoints")]

    def _max_seq(self, session: str) -> int:
        return self._query("SELECT MAX(seq) FROM checkpoints WHERE session = ?", (session,))[0][0] or 0

    def _mac(self, row: tuple) -> str:
        """HMAC-SHA256 over every column of a row, in order, as JSON."""
        return hmac.new(self._key, json.dumps(list(row)).encode("utf-8"), hashlib.sha256).hexdigest()

    def _checkpoint_mac(self, columns: tuple) -> str:
        *before, origin = columns
        return self._mac(tuple(columns) if origin is not None else tuple(before))

    def _row(self, row: tuple) -> Checkpoint:
        *columns, mac = row
        if not isinstance(mac, str) or not hmac.compare_digest(mac, self._checkpoint_mac(tuple(columns))):
            cid, session, count = columns[0], columns[1], columns[4]
            raise CheckpointRefused(
                f"checkpoint {str(cid)[:8]} (after cell [{count}]) of session {session} was refused: its row in "
                f"{self.path} does not match its authentication code (it was changed outside Capsule, or written "
                "without this store's key), so nothing of it is loaded"
            )
        # entries, changed and removed are JSON columns (8-10).
        for i in (8, 9, 10):
            columns[i] = json.loads(columns[i])
        return Checkpoint(*columns)
