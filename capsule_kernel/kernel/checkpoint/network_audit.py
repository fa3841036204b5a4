"""The audit of every request through the allowed-hosts proxy: rows beside the checkpoints, authenticated.

Runs in the KERNEL. Lives in CAPSULE_HOME (``network.sqlite``), one row per
decision of the proxy (kernel/network/proxy.py): when, which session and
cell (or task), method, host:port, allowed or refused and why, the address used and
the bytes each way. Every row carries an HMAC-SHA256 under the store's key
(checkpoint.key), as checkpoints do: a row written or changed by anything
without the key is shown as tampered, never as a request that happened.

A sandbox decides how many requests it makes, so what it can make the
kernel do here is bounded: decisions wait in a queue of at most QUEUE rows
(past it they are counted, and the count is written as a row of its own)
and are written in batches off the event loop; each session keeps its
newest KEEP rows.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from capsule_kernel.kernel.checkpoint.home import store_key

QUEUE = 1000
KEEP = 10_000
_FLUSH_SECONDS = 0.2
_COLUMNS = (
    "session", "task", "at", "cell", "method", "host", "port", "allowed", "reason", "address", "sent", "received",
)  # fmt: skip

SCHEMA = """
CREATE TABLE IF NOT EXISTS network (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    session TEXT NOT NULL,
    task TEXT NOT NULL,  -- the task's name, or '' for a notebook cell
    at REAL NOT NULL,
    cell INTEGER,
    method TEXT NOT NULL,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    allowed INTEGER NOT NULL,
    reason TEXT NOT NULL,
    address TEXT NOT NULL,
    sent INTEGER NOT NULL,
    received INTEGER NOT NULL,
    mac TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS network_by_session ON network (session, seq);
"""


class NetworkAudit:
    def __init__(self, home: Path) -> None:
        self._db = sqlite3.connect(home / "network.sqlite", isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._key = store_key(home)
        self._guard = threading.Lock()
        self._queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self._dropped: dict[str, int] = {}
        self._flushing: asyncio.Task | None = None

    def add(self, session: str, decision: dict[str, Any]) -> None:
        """Queue one decision (from the event loop); written within a moment."""
        if len(self._queue) >= QUEUE:
            self._dropped[session] = self._dropped.get(session, 0) + 1
        else:
            self._queue.append(_row(session, decision))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(_FLUSH_SECONDS)
        await self.flush()

    async def flush(self) -> None:
        rows, self._queue = list(self._queue), collections.deque()
        dropped, self._dropped = self._dropped, {}
        for session, count in dropped.items():
            reason = f"{count} more decisions were not recorded: the sandbox made them faster than they are written"
            rows.append(_row(session, {"at": rows[-1][2] if rows else 0.0, "reason": reason}))
        if rows:
            await asyncio.to_thread(self._write, rows)

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        with self._guard, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                f"INSERT INTO network ({', '.join(_COLUMNS)}, mac) VALUES ({', '.join('?' * (len(_COLUMNS) + 1))})",
                [(*row, self._mac(row)) for row in rows],
            )
            for session in {row[0] for row in rows}:
                self._db.execute(
                    "DELETE FROM network WHERE session = ? AND seq <= "
                    "(SELECT MAX(seq) FROM network WHERE session = ?) - ?",
                    (session, session, KEEP),
                )

    def recent(self, session: str, limit: int = 50) -> list[dict[str, Any]]:
        """The newest decisions of a session, oldest first; a row whose MAC fails says so instead."""
        with self._guard:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)}, mac FROM network WHERE session = ? ORDER BY seq DESC LIMIT ?",
                (session, limit),
            ).fetchall()
        found = []
        for *values, mac in reversed(rows):
            if not (isinstance(mac, str) and hmac.compare_digest(mac, self._mac(tuple(values)))):
                found.append({"tampered": True})
                continue
            found.append(dict(zip(_COLUMNS, values, strict=True)))
        return found

    def _mac(self, row: tuple[Any, ...]) -> str:
        message = json.dumps(["network", *row], default=str).encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def close(self) -> None:
        with self._guard:
            self._db.close()


def _row(session: str, decision: dict[str, Any]) -> tuple[Any, ...]:
    """A decision as the row stores it (SQLite's own types, so its MAC checks the same when read back)."""
    cell = decision.get("cell")
    return (
        session,
        str(decision.get("task") or "")[:200],
        float(decision.get("at") or 0.0),
        int(cell) if isinstance(cell, int) else None,
        str(decision.get("method", "-"))[:16],
        str(decision.get("host", "-"))[:255],
        int(decision.get("port") or 0),
        1 if decision.get("allowed") else 0,
        str(decision.get("reason", ""))[:500],
        str(decision.get("address", ""))[:64],
        int(decision.get("sent") or 0),
        int(decision.get("received") or 0),
    )
