"""The durable record of every task: one SQLite row per task key, authenticated like checkpoints.

Runs in the KERNEL. Lives beside the checkpoint store in CAPSULE_HOME
(``tasks.sqlite``, and ``task-results/`` for results that are not JSON, as
the opaque bytes their sandbox pickled: the kernel stores and hands them on,
never unpickles them). A row says what the task is (its spec, so a later
kernel can run it again), how far it got (queued, running, succeeded,
failed, cancelled) and, once it ended, its envelope. A task that succeeded
is never run again for the same key (unless asked); a row left ``running``
by a kernel that is gone is shown as interrupted.

Every row carries an HMAC-SHA256 under the store's key (checkpoint.key), so a
row rewritten by anything without the key is refused, as a checkpoint is.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsule_kernel.kernel.checkpoint.home import store_key
from capsule_kernel.kernel.checkpoint.rows import CheckpointRefused

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    key TEXT PRIMARY KEY,
    session TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    kernel TEXT NOT NULL,
    spec TEXT NOT NULL,
    envelope TEXT,
    result TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    mac TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_session ON tasks (session, created);
"""
STATES = ("queued", "running", "retrying", "succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class TaskRecord:
    key: str
    session: str
    name: str
    state: str
    kernel: str
    spec: dict[str, Any]
    envelope: dict[str, Any] | None
    result: str | None  # digest of the result's bytes in task-results/, if it was not JSON
    created: float
    updated: float

    def shown_state(self, kernel: str) -> str:
        """What %capsule tasks says: a task another kernel left running is interrupted."""
        if self.state in ("queued", "running", "retrying") and self.kernel != kernel:
            return "interrupted"
        return self.state


class TaskRecords:
    def __init__(self, home: Path, clock: Any = time.time) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.path = home / "tasks.sqlite"
        self.results = home / "task-results"
        self.results.mkdir(exist_ok=True)
        self.clock = clock
        self._guard = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives the kernel's death (the row is in the WAL); only a power
        # loss may take the last ones back, which costs a re-run, never a wrong result.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._key = store_key(home)

    def close(self) -> None:
        with self._guard:
            self._db.close()

    # -- rows -------------------------------------------------------------------------

    def get(self, key: str) -> TaskRecord | None:
        with self._guard:
            row = self._db.execute("SELECT * FROM tasks WHERE key = ?", (key,)).fetchone()
        return self._record(row) if row else None

    def of_session(self, session: str, limit: int = 200) -> list[TaskRecord]:
        with self._guard:
            rows = self._db.execute(
                "SELECT * FROM tasks WHERE session = ? ORDER BY created DESC LIMIT ?", (session, limit)
            ).fetchall()
        records = []
        for row in rows:
            try:
                records.append(self._record(row))
            except CheckpointRefused:
                continue  # a tampered row is not shown (its own lookup says why)
        return list(reversed(records))

    def put(
        self,
        key: str,
        *,
        session: str,
        name: str,
        state: str,
        kernel: str,
        spec: dict[str, Any] | None,
        envelope: dict[str, Any] | None = None,
        result: str | None = None,
    ) -> TaskRecord:
        """Write the row for this key (insert or replace), authenticated.

        `spec` None keeps the spec the row holds (checked against its MAC
        first): a queued task's code lives there, not in the kernel's memory.
        """
        assert state in STATES, state
        now = self.clock()
        with self._guard:
            old = self._db.execute("SELECT * FROM tasks WHERE key = ?", (key,)).fetchone()
            created = old[8] if old else now
            if spec is None:
                if old is None:
                    raise CheckpointRefused(f"the record of task {name!r} is gone; its spec cannot be kept")
                spec_text = json.dumps(self._record(old).spec)
            else:
                spec_text = json.dumps(spec)
            columns = (
                key, session, name, state, kernel, spec_text, json.dumps(envelope) if envelope else None,
                result, created, now,
            )  # fmt: skip
            row = (*columns, self._mac(columns))
            self._db.execute("INSERT OR REPLACE INTO tasks VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)
        return TaskRecord(key, session, name, state, kernel, json.loads(spec_text), envelope, result, created, now)

    # -- result bytes -----------------------------------------------------------------

    def save_result(self, data: bytes) -> str:
        """Keep a result's pickled bytes (opaque here); their SHA-256 names them."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.results / digest
        if not path.exists():
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        return digest

    def load_result(self, digest: str) -> bytes:
        """The bytes of a result, checked against the digest the authenticated row names."""
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise CheckpointRefused(f"task result {digest[:16]!r} is not a result name")
        data = (self.results / digest).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointRefused(f"task result {digest[:12]} was changed on disk; it is not loaded")
        return data

    # -- authentication ---------------------------------------------------------------

    def _mac(self, columns: tuple) -> str:
        return hmac.new(self._key, json.dumps(["task", *columns]).encode(), hashlib.sha256).hexdigest()

    def _record(self, row: tuple) -> TaskRecord:
        *columns, mac = row
        if not hmac.compare_digest(str(mac), self._mac(tuple(columns))):
            raise CheckpointRefused(
                f"the record of task {columns[2]!r} (key {str(columns[0])[:12]}) in {self.path} does not match its "
                "authentication code (it was changed outside Capsule), so it is not used"
            )
        key, session, name, state, kernel, spec, envelope, result, created, updated = columns
        return TaskRecord(
            key, session, name, state, kernel, json.loads(spec), json.loads(envelope) if envelope else None,
            result, created, updated,
        )  # fmt: skip
