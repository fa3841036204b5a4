"""The durable checkpoint store: one SQLite database (WAL) plus chunk files.

Lives under CAPSULE_HOME (default: the user's data directory, e.g.
~/.local/share/capsule-kernel). A checkpoint row is written in one
transaction, after every chunk it names has been written and checked, so a
kill -9 at any instant leaves a database that opens and holds every
checkpoint that was ever reported complete. Manifests are JSON; the kernel
that owns this store never unpickles what they point to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsule_kernel.protocol.chunks import CHUNK_BYTES, chunk_path, entry_chunks, is_chunk_name, verify

_SCHEMA = """
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
_CHECKPOINT_COLUMNS = (
    "id, session, seq, parent, execution_count, first_line, created, status, entries, changed, removed, "
    "size, written, origin, mac"
)
_SANDBOX_COLUMNS = "name, session, kind, kernel_id, kernel_pid, keeper, spool, recorded_through, origin, mac"


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


def default_home(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    if environ.get("CAPSULE_HOME"):
        return Path(environ["CAPSULE_HOME"])
    import platformdirs

    return Path(platformdirs.user_data_dir("capsule-kernel"))


def session_identity(environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Who this notebook is, and how we know: the frontend's path, or a fresh id."""
    environ = os.environ if environ is None else environ
    if environ.get("JPY_SESSION_NAME"):
        return environ["JPY_SESSION_NAME"], "JPY_SESSION_NAME (the notebook's path)"
    if environ.get("CAPSULE_SESSION"):
        return environ["CAPSULE_SESSION"], "CAPSULE_SESSION"
    return f"session-{uuid.uuid4().hex[:12]}", "fresh id (set CAPSULE_SESSION to reuse the session later)"


def notebook_identity(session: str, environ: Mapping[str, str] | None = None) -> str:
    """Which notebook a kernel serves: the operator's CAPSULE_NOTEBOOK, else the session it starts in.

    The batch runner names a run's notebook (its output path) apart from
    each attempt's session, so a resumed run may switch into its dead
    attempt's session: that session's owner is the same notebook.
    """
    environ = os.environ if environ is None else environ
    return environ.get("CAPSULE_NOTEBOOK") or session


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


KEY_FILE = "checkpoint.key"


def store_key(home: Path) -> bytes:
    """The key that authenticates checkpoint rows: made once, readable by the kernel's user only.

    It lives in CAPSULE_HOME, which no sandbox can see; a row rewritten in
    capsule.sqlite by anything without it fails verification.
    """
    path = home / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < 32:
            raise OSError(f"{path} is not a Capsule checkpoint key") from None
        return key
    key = secrets.token_bytes(32)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


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


class CheckpointStore:
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
        self._db.executescript(_SCHEMA)
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
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE session = ? ORDER BY seq DESC LIMIT 1", (session,)
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
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE session = ? ORDER BY seq DESC LIMIT ?",
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

    def register_sandbox(self, record: SandboxRecord) -> None:
        """Written by the kernel as a sandbox starts, before the sandbox runs a cell."""
        with self._guard, self._db:
            self._write_sandbox(record)

    def sandbox_session(self, name: str, session: str, origin: str = "") -> None:
        """Its reports belong to another session from now on (%capsule session), written by `origin`."""
        with self._guard, self._db:
            record = self._sandbox(name)
            if record is not None:
                self._write_sandbox(dataclasses.replace(record, session=session, origin=origin))

    def forget_sandbox(self, name: str) -> None:
        with self._guard, self._db:
            self._db.execute("DELETE FROM sandboxes WHERE name = ?", (name,))

    def sandboxes(self) -> list[SandboxRecord]:
        """Every sandbox row that authenticates (a row without a valid MAC is dropped: never adopted)."""
        with self._guard:
            rows = self._db.execute(f"SELECT {_SANDBOX_COLUMNS} FROM sandboxes").fetchall()
        found = []
        for row in rows:
            record = self._verified_sandbox(row)
            if record is not None:
                found.append(record)
            else:
                self.forget_sandbox(row[0])
        return found

    def _sandbox(self, name: str) -> SandboxRecord | None:
        rows = self._db.execute(f"SELECT {_SANDBOX_COLUMNS} FROM sandboxes WHERE name = ?", (name,)).fetchall()
        return self._verified_sandbox(rows[0]) if rows else None

    def _verified_sandbox(self, row: tuple) -> SandboxRecord | None:
        *columns, mac = row
        if not isinstance(mac, str) or not hmac.compare_digest(mac, self._sandbox_mac(tuple(columns))):
            return None
        return SandboxRecord(*columns)

    def _write_sandbox(self, record: SandboxRecord) -> None:
        row = dataclasses.astuple(record)
        self._db.execute(
            f"INSERT OR REPLACE INTO sandboxes ({_SANDBOX_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (*row, self._sandbox_mac(row)),
        )

    def _advance(self, sandbox: str | None, execution_count: int) -> None:
        """Within the caller's transaction: the sandbox's reports up to this cell are recorded."""
        if sandbox is None:
            return
        record = self._sandbox(sandbox)
        if record is not None and execution_count > record.recorded_through:
            self._write_sandbox(dataclasses.replace(record, recorded_through=execution_count))

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
        """
        if ref.isdigit():
            rows = self._query(
                f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE session = ? AND execution_count = ? "
                "ORDER BY seq DESC",
                (session, int(ref)),
            )
            if rows:
                return [self._row(row) for row in rows]
        rows = self._query(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE session = ? AND id LIKE ? ORDER BY seq DESC",
            (session, ref + "%"),
        )
        return [self._row(row) for row in rows]

    def adopt(self, spool: Path, entries: Mapping[str, Any]) -> list[str]:
        """Move the chunks a sandbox wrote into its spool into the store; return those that fail.

        The spool is writable by the sandbox, so nothing in it is believed:
        each file is opened without following links, must be a regular file
        of at most one chunk, and is copied (never renamed: the sandbox may
        still hold it open for writing, or have linked it elsewhere) while
        the very bytes written are hashed. A copy whose hash is not its name
        is discarded. Chunks already in the store are kept as they are.
        """
        bad = []
        for digest in entry_chunks(entries):
            if not is_chunk_name(digest):
                bad.append(digest)
                continue
            with contextlib.suppress(OSError):
                os.utime(chunk_path(self.chunks, digest))  # recently used: garbage collection keeps it
            # Another adoption may have stored the same chunk meanwhile: look again after a failed copy.
            if not (self._sound(digest) or self._copy_in(spool, digest) or self._sound(digest)):
                bad.append(digest)
            with contextlib.suppress(OSError):
                chunk_path(spool, digest).unlink()
        return bad

    def _copy_in(self, spool: Path, digest: str) -> bool:
        try:
            handle = os.open(chunk_path(spool, digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return False
        target = chunk_path(self.chunks, digest)
        temporary = target.with_name(f".{digest}.{os.getpid()}.{threading.get_ident()}.adopt")
        try:
            info = os.fstat(handle)
            if not stat.S_ISREG(info.st_mode) or info.st_size > CHUNK_BYTES:
                return False
            target.parent.mkdir(parents=True, exist_ok=True)
            hasher = hashlib.sha256()
            copied = 0
            with open(temporary, "wb") as out:
                while copied <= CHUNK_BYTES and (block := os.read(handle, 1 << 20)):
                    hasher.update(block)
                    out.write(block)
                    copied += len(block)
                if copied > CHUNK_BYTES or hasher.hexdigest() != digest:
                    return False
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temporary, 0o444)
            os.replace(temporary, target)
            written = target.stat()
            self._verified[digest] = (written.st_dev, written.st_ino, written.st_size)
            return True
        except OSError:
            return False
        finally:
            os.close(handle)
            with contextlib.suppress(OSError):
                temporary.unlink()

    def missing_chunks(self, entries: Mapping[str, Any]) -> list[str]:
        """Chunks named by these entries that are absent or corrupt.

        A chunk file checked once is not read again while it is the same
        file (chunks are written to a new file and renamed, never changed
        in place): a changed list of nine 100 MB arrays re-verifies only
        the array that changed. Restores check every chunk they read anyway.
        """
        return [digest for digest in entry_chunks(entries) if not self._sound(digest)]

    def _sound(self, digest: str) -> bool:
        """The store holds this chunk and its content matches its name (checked once per file)."""
        try:
            info = chunk_path(self.chunks, digest).stat()
        except OSError:
            return False
        identity = (info.st_dev, info.st_ino, info.st_size)
        if self._verified.get(digest) == identity:
            return True
        if not verify(self.chunks, digest):
            return False
        self._verified[digest] = identity
        return True

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
                    f"INSERT INTO checkpoints ({_CHECKPOINT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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

    def referenced_chunks(self) -> set[str]:
        digests: set[str] = set()
        for (entries,) in self._query("SELECT entries FROM checkpoints"):
            for entry in json.loads(entries).values():
                digests.update(entry.get("pickle", []))
                for buffer in entry.get("buffers", []):
                    digests.update(buffer)
        return digests

    def collect_garbage(self, grace_seconds: float) -> tuple[int, int]:
        """Delete chunks no checkpoint names; return (files, bytes) freed.

        Chunks younger than the grace period are kept: another kernel sharing
        this store may be writing a checkpoint that names them.
        """
        referenced = self.referenced_chunks()
        cutoff = self.clock() - grace_seconds
        files = freed = 0
        for path in self.chunks.glob("*/*"):
            if path.name in referenced or path.name.startswith("."):
                continue
            try:
                info = path.stat()
                if info.st_mtime > cutoff:
                    continue
                path.unlink()
            except OSError:
                continue
            files += 1
            freed += info.st_size
        return files, freed

    def _max_seq(self, session: str) -> int:
        return self._query("SELECT MAX(seq) FROM checkpoints WHERE session = ?", (session,))[0][0] or 0

    def _sandbox_mac(self, row: tuple) -> str:
        *columns, origin = row
        return self._mac(("sandbox", *columns, origin) if origin else ("sandbox", *columns))

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
