"""The store's sandboxes table: which sandbox of which kernel serves which session, and how far it is recorded.

A part of CheckpointStore (a mixin over its connection and key): every row is
HMAC-authenticated like a checkpoint's, so a dead kernel's sandboxes are
adopted (adoption.py) only as the kernel that started them recorded them.
"""

from __future__ import annotations

import dataclasses
import hmac

from capsule_kernel.kernel.checkpoint.rows import (
    SANDBOX_COLUMNS,
    SandboxRecord,
)


class SandboxRows:
    """The sandboxes table: register, move to a session, advance, verify, forget."""

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
            rows = self._db.execute(f"SELECT {SANDBOX_COLUMNS} FROM sandboxes").fetchall()
        found = []
        for row in rows:
            record = self._verified_sandbox(row)
            if record is not None:
                found.append(record)
            else:
                self.forget_sandbox(row[0])
        return found

    def _sandbox(self, name: str) -> SandboxRecord | None:
        rows = self._db.execute(f"SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE name = ?", (name,)).fetchall()
        return self._verified_sandbox(rows[0]) if rows else None

    def _verified_sandbox(self, row: tuple) -> SandboxRecord | None:
        *columns, mac = row
        if not isinstance(mac, str) or not hmac.compare_digest(mac, self._sandbox_mac(tuple(columns))):
            return None
        return SandboxRecord(*columns)

    def _write_sandbox(self, record: SandboxRecord) -> None:
        row = dataclasses.astuple(record)
        self._db.execute(
            f"INSERT OR REPLACE INTO sandboxes ({SANDBOX_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (*row, self._sandbox_mac(row)),
        )

    def _advance(self, sandbox: str | None, execution_count: int) -> None:
        """Within the caller's transaction: the sandbox's reports up to this cell are recorded."""
        if sandbox is None:
            return
        record = self._sandbox(sandbox)
        if record is not None and execution_count > record.recorded_through:
            self._write_sandbox(dataclasses.replace(record, recorded_through=execution_count))

    def _sandbox_mac(self, row: tuple) -> str:
        *columns, origin = row
        return self._mac(("sandbox", *columns, origin) if origin else ("sandbox", *columns))
