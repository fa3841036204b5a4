"""CAPSULE_RESONATE_URL: the cells' durable promises live on a Resonate server, over HTTP."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.harness import wait_until
from tests.resonate_server import ResonateProtocolServer
from tests.test_checkpoints import die_in_a_long_cell_and_read_the_next_log, promise_value, promises_in


@pytest.fixture
def home(tmp_path):
    return tmp_path / "capsule-home"


def _journal_rows(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        if not conn.execute("SELECT name FROM sqlite_master WHERE name = 'resonate_journal'").fetchall():
            return 0
        return conn.execute("SELECT count(*) FROM resonate_journal").fetchone()[0]


def test_promises_go_to_the_server_and_interrupted_cells_come_back_from_it(fresh_kernel, home, tmp_path):
    with ResonateProtocolServer(tmp_path / "server.sqlite") as server:
        env = {"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "remote", "CAPSULE_RESONATE_URL": server.url}
        first = fresh_kernel(env=env)
        good = first.execute("answer = 42").content["execution_count"]
        bad = first.execute("1/0").content["execution_count"]
        first.execute("%capsule log")  # settles checkpoints and promises
        wait_until(lambda: server.kinds().count("promise.settle") >= 2, what="both cells' promises to settle")
        die_in_a_long_cell_and_read_the_next_log(first, fresh_kernel, env)
        assert "promise.search" in server.kinds()
    assert _journal_rows(home / "capsule.sqlite") == 0, "the embedded journal was used instead of the server"

    # What the server holds, replayed from its journal once it has stopped.
    remote = promises_in(tmp_path / "server.sqlite", "remote")
    assert remote[good].state == "resolved" and promise_value(remote[good])["checkpoint"]
    assert remote[bad].state == "rejected" and promise_value(remote[bad])["ename"] == "ZeroDivisionError"
    assert any(p.state == "pending" for p in remote.values()), "the interrupted cell stays pending"
