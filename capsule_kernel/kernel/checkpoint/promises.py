"""Every cell execution as a durable promise, through resonate-sdk.

Created pending when the cell starts (param: code hash, parent checkpoint,
sandbox, limits), resolved with the checkpoint id and a summary of outputs,
rejected with the error. A cell whose kernel died mid-way stays pending for
ever; a later kernel shows it as "interrupted" in %capsule log.

The SDK's local mode keeps its server state in memory only. To make it
durable, JournaledLocalConnection writes every request the local state
machine applies (with the clock value it applied it at) into the checkpoint
store's SQLite file, and replays the journal into a fresh state machine on
start. That uses resonate-sdk internals (ServerState.apply, the envelope
helpers), so the SDK is pinned (pyproject) and the replay is tested. When
CAPSULE_RESONATE_URL names a Resonate server, the same code talks to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
from resonate.connections import LocalConnection
from resonate.connections.local import unwrap_request_envelope, wrap_response_envelope
from resonate.error import DecodingError
from resonate.resonate import Resonate
from resonate.timing import now_ms
from resonate.types import Value

_READ_ONLY_KINDS = {"promise.get", "promise.search", "schedule.get", "schedule.search"}
_CENTURY_MS = 100 * 365 * 24 * 3600 * 1000


class JournaledLocalConnection(LocalConnection):
    """resonate-sdk's in-process server, made durable by a SQLite journal."""

    def __init__(self, db_path: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # A commit survives the kernel's death (kill -9) without an fsync of its own: a reply waits
        # for its cell's promise, and two fsyncs per cell were most of what back to back cost.
        # A power loss may lose the last promises, as it loses the last journaled snapshots.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS resonate_journal (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
            "now INTEGER NOT NULL, request BLOB NOT NULL)"
        )
        self._db_guard = threading.Lock()
        self.replayed = self._replay()

    def _replay(self) -> int:
        count = 0
        for now, request in self._db.execute("SELECT now, request FROM resonate_journal ORDER BY seq"):
            # A request that failed when first applied was never journalled;
            # one that fails now would have failed then: skip it alike.
            with contextlib.suppress(Exception):
                self.state.apply(now, msgspec.json.decode(request))
            count += 1
        self.state.outgoing = []
        return count

    def _journal(self, now: int, request: bytes) -> None:
        with self._db_guard, self._db:
            self._db.execute("INSERT INTO resonate_journal (now, request) VALUES (?, ?)", (now, request))

    async def send(self, req: str, headers: dict[str, str] | None = None) -> str:  # noqa: ARG002
        """As LocalConnection.send, but a change is journalled before it is answered."""
        try:
            flat = unwrap_request_envelope(msgspec.json.decode(req))
        except msgspec.DecodeError as exc:
            raise DecodingError(f"invalid JSON request: {exc}") from exc
        if flat.get("kind") == "promise.search":
            async with self._lock:
                response = self._search(flat)
            return msgspec.json.encode(wrap_response_envelope(response)).decode("utf-8")
        now = self._clock()
        async with self._lock:
            response = self.state.apply(now, flat)
            outgoing, self.state.outgoing = self.state.outgoing, []
            if flat.get("kind") not in _READ_ONLY_KINDS:
                await asyncio.to_thread(self._journal, now, msgspec.json.encode(flat))
        self._dispatch_messages(outgoing)
        return msgspec.json.encode(wrap_response_envelope(response)).decode("utf-8")

    def _search(self, request: dict[str, Any]) -> dict[str, Any]:
        """promise.search, which the SDK's local state machine lacks: state and tag filters, one page.

        Answered from the replayed state, in the shape a Resonate server
        gives, so CellPromises.interrupted asks both the same way.
        """
        state = request.get("state")
        tags = request.get("tags") or {}
        found = [
            promise.to_record()
            for promise in self.state.promises.values()
            if (state is None or promise.state == state)
            and all((promise.tags or {}).get(key) == value for key, value in tags.items())
        ]
        return {"kind": "promise.search", "corrId": request.get("corrId"), "status": 200, "promises": found}

    def close(self) -> None:
        with self._db_guard:
            self._db.close()


def promise_id(session: str, kernel_id: str, execution_count: int) -> str:
    session_key = hashlib.sha256(session.encode()).hexdigest()[:16]
    return f"capsule.{session_key}.{kernel_id}.{execution_count}"


def task_promise_id(session: str, key: str, kernel_id: str, run: int) -> str:
    session_key = hashlib.sha256(session.encode()).hexdigest()[:16]
    return f"capsule.{session_key}.task.{key}.{kernel_id}.{run}"


class CellPromises:
    """Creates and settles one promise per cell, in order, off the critical path."""

    def __init__(
        self, resonate: Resonate, local: JournaledLocalConnection | None, kernel_id: str, log: logging.Logger
    ) -> None:
        self.resonate = resonate
        self.local = local
        self.kernel_id = kernel_id
        self.log = log
        # Creates first: a reply waits for its cell's create (created), and a coalesced snapshot
        # queues up to 64 resolves at once. Safe: a promise is only settled after its create was queued.
        self._queue: asyncio.PriorityQueue = asyncio.PriorityQueue()
        self._order = itertools.count()
        # Cells whose promise is queued but not yet created (promise id -> set once it is).
        self._creating: dict[str, asyncio.Event] = {}
        self._worker = asyncio.ensure_future(self._run())

    @classmethod
    def open(cls, db_path: Path, kernel_id: str, log: logging.Logger, environ: Mapping[str, str]) -> CellPromises:
        """Requires a running event loop (the SDK starts its connection tasks)."""
        url = environ.get("CAPSULE_RESONATE_URL")
        if url:
            return cls(Resonate(url=url, env={}), None, kernel_id, log)
        local = JournaledLocalConnection(db_path, pid=kernel_id, group="capsule")
        return cls(Resonate(network=local, env={}), local, kernel_id, log)

    def started(self, session: str, count: int, param: dict[str, Any]) -> None:
        tags = {"capsule.session": session, "capsule.kernel": self.kernel_id, "capsule.cell": str(count)}
        pid = promise_id(session, self.kernel_id, count)
        self._creating[pid] = asyncio.Event()
        self._enqueue("create", pid, param, tags)

    def _enqueue(self, op: str, pid: str, data: dict[str, Any], tags: dict[str, str] | None) -> None:
        self._queue.put_nowait((0 if op == "create" else 1, next(self._order), (op, pid, data, tags)))

    async def created(self, session: str, count: int, timeout: float = 10.0) -> None:
        """Wait until this cell's promise exists (durably): queued before the cell ran, it almost always does.

        A reply is sent only after it: a later kernel then knows of every cell
        that replied, and can adopt its journaled snapshot or name it as lost.
        """
        event = self._creating.get(promise_id(session, self.kernel_id, count))
        if event is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)

    def resolved(self, session: str, count: int, value: dict[str, Any]) -> None:
        self._enqueue("resolve", promise_id(session, self.kernel_id, count), value, None)

    def resolved_for(self, session: str, kernel_id: str, count: int, value: dict[str, Any]) -> None:
        """Settle a cell of a kernel that died (its snapshot was adopted from the journal by this one)."""
        self._enqueue("resolve", promise_id(session, kernel_id, count), value, None)

    def rejected_for(self, session: str, kernel_id: str, count: int, value: dict[str, Any]) -> None:
        """Settle a dead kernel's cell as lost (a resume has named it)."""
        self._enqueue("reject", promise_id(session, kernel_id, count), value, None)

    def rejected(self, session: str, count: int, value: dict[str, Any]) -> None:
        self._enqueue("reject", promise_id(session, self.kernel_id, count), value, None)

    def task_started(self, session: str, key: str, run: int, name: str, param: dict[str, Any]) -> str:
        """One run of a task (its attempts inside it): pending until its envelope is in."""
        pid = task_promise_id(session, key, self.kernel_id, run)
        tags = {"capsule.session": session, "capsule.kernel": self.kernel_id, "capsule.task": name, "capsule.key": key}
        self._enqueue("create", pid, param, tags)
        return pid

    def task_settled(self, pid: str, envelope: dict[str, Any]) -> None:
        self._enqueue("resolve" if envelope.get("success") else "reject", pid, envelope, None)

    def state_of_id(self, pid: str) -> tuple[str, Any] | None:
        if self.local is None:
            return None
        promise = self.local.state.promises.get(pid)
        return (promise.state, _decode(promise.value)) if promise else None

    async def settled(self, timeout: float = 30.0) -> None:
        """Wait until every queued operation has been applied."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)

    async def _run(self) -> None:
        promises = self.resonate.promises
        while True:
            _, _, (op, pid, data, tags) = await self._queue.get()
            try:
                if op == "create":
                    await promises.create(pid, now_ms() + _CENTURY_MS, Value(data=data), tags)
                elif op == "resolve":
                    await promises.resolve(pid, Value(data=data))
                else:
                    await promises.reject(pid, Value(data=data))
            except Exception as err:  # noqa: BLE001 - bookkeeping must never disturb a cell
                self.log.warning("durable promise %s %s failed: %s", op, pid, err)
            finally:
                if op == "create" and pid in self._creating:
                    self._creating.pop(pid).set()
                self._queue.task_done()

    async def interrupted(self, session: str) -> list[dict[str, Any]]:
        """Cells of this session left pending by kernels that are gone.

        A promise search (state pending, tagged with the session) through
        the SDK: a Resonate server answers it itself; the journaled local
        connection answers it from its replayed state.
        """
        found, cursor = [], None
        while True:
            page = await self.resonate.promises.search("pending", {"capsule.session": session}, 200, cursor)
            for promise in page.promises:
                tags = promise.tags or {}
                if tags.get("capsule.kernel") == self.kernel_id or "capsule.task" in tags:
                    continue  # this kernel's own cell, running now; or a task (%capsule tasks shows those)
                found.append(
                    {
                        "id": promise.id,
                        "kernel": tags.get("capsule.kernel"),
                        "cell": int(tags.get("capsule.cell", 0)),
                        "created": promise.created_at,
                        "param": promise.param.data if isinstance(promise.param.data, dict) else None,
                    }
                )
            cursor = page.cursor
            if not cursor:
                break
        return sorted(found, key=lambda p: p["created"])

    async def pending_cells(self, session: str, kernel_id: str) -> dict[int, dict[str, Any]]:
        """The cells a (dead) kernel started in this session and never settled: count -> param."""
        return {
            cell["cell"]: cell["param"] or {}
            for cell in await self.interrupted(session)
            if cell["kernel"] == kernel_id
        }

    def state_of(self, session: str, count: int) -> tuple[str, Any] | None:
        """(state, decoded value) of one cell's promise in the local state, for tests and log."""
        if self.local is None:
            return None
        promise = self.local.state.promises.get(promise_id(session, self.kernel_id, count))
        return (promise.state, _decode(promise.value)) if promise else None

    async def close(self) -> None:
        await self.settled(5.0)
        self._worker.cancel()
        with contextlib.suppress(Exception):
            await self.resonate.stop()
        if self.local is not None:
            self.local.close()


def _decode(wire: Any) -> Any:
    """A promise param/value as stored: {"data": base64 JSON} -> the JSON value."""
    import base64
    import json

    data = wire.get("data") if isinstance(wire, dict) else None
    if not data:
        return None
    try:
        return json.loads(base64.b64decode(data))
    except (ValueError, TypeError):
        return None
