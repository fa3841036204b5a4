"""Adoption of a dead kernel's journal (checkpoint/adoption.py), on a real store and a planted spool."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from capsule_kernel.inside import snapshot
from capsule_kernel.kernel.checkpoint.adoption import adopt_orphans
from capsule_kernel.kernel.checkpoint.rows import SandboxRecord
from capsule_kernel.kernel.checkpoint.store import CheckpointStore
from capsule_kernel.protocol import frames

GONE_KERNEL = "capsule-4194000-0badc0de"  # a kernel pid near pid_max, which no process here has


def plant(home: Path, kind: str = "subprocess", recorded_through: int = -1) -> tuple[CheckpointStore, Path]:
    store = CheckpointStore(home)
    spool = home / "spool" / GONE_KERNEL
    spool.mkdir(parents=True)
    store.register_sandbox(SandboxRecord(GONE_KERNEL, "s", kind, "dead", 4194000, "", str(spool), recorded_through))
    return store, spool


def journal_values(spool: Path, count: int, values: dict) -> dict:
    made = snapshot.take(values, sorted(values), {}, spool, durable=False)
    report = {"type": "snapshot", "execution_count": count, "entries": made["entries"], "removed": [], "written": 0}
    frames.journal(spool, report)
    return report


def adopt(store: CheckpointStore, pending: dict[int, dict] | None):
    settled: list[tuple[int, dict]] = []

    async def cells(session: str, kernel_id: str):
        assert (session, kernel_id) == ("s", "dead")
        return None if pending is None else dict(pending)

    def settle(session: str, kernel_id: str, count: int, value: dict) -> None:
        settled.append((count, value))

    adopted = asyncio.run(adopt_orphans(store, cells, settle, logging.getLogger("test")))
    return adopted, settled


def test_a_journaled_snapshot_of_a_pending_cell_is_recorded_and_settles_the_cells_it_covers(tmp_path):
    store, spool = plant(tmp_path)
    journal_values(spool, 7, {"x": 41})
    adopted, settled = adopt(store, {5: {"first_line": "a = 1"}, 6: {}, 7: {"first_line": "x = 41"}, 9: {}})
    latest = store.latest("s")
    assert latest is not None and latest.execution_count == 7 and latest.first_line == "x = 41"
    assert set(latest.entries) == {"x"}
    assert [count for count, _ in settled] == [5, 6, 7]  # cell 9 ran later: still pending, named by resume
    assert settled[0][1]["coalesced_into"] == 7 and "coalesced_into" not in settled[2][1]
    assert adopted.recorded == {"s": [5, 6, 7]}
    assert not spool.exists() and store.sandboxes() == []


def test_a_cell_its_kernel_never_ran_is_refused(tmp_path):
    store, spool = plant(tmp_path)
    journal_values(spool, 999, {"x": "forged"})
    adopted, settled = adopt(store, {3: {}})
    assert store.latest("s") is None and settled == []
    assert "never ran" in adopted.refused[0]


def test_reports_recorded_before_the_kernel_died_are_not_recorded_twice(tmp_path):
    store, spool = plant(tmp_path, recorded_through=4)
    journal_values(spool, 4, {"x": 1})
    journal_values(spool, 5, {"x": 2})
    adopt(store, {4: {}, 5: {}})
    assert [c.execution_count for c in store.history("s")] == [5]


def test_an_entry_naming_a_chunk_nobody_wrote_is_refused(tmp_path):
    store, spool = plant(tmp_path)
    report = journal_values(spool, 2, {"x": 1})
    report["entries"]["x"]["pickle"] = ["ab" * 32]
    frames.journal(spool, report)
    adopted, settled = adopt(store, {2: {}})
    assert store.latest("s") is None and settled == []
    assert "missing or corrupt" in adopted.refused[0]


def test_made_in_comes_from_the_ledger_not_the_journal(tmp_path):
    store, spool = plant(tmp_path, kind="wasm")
    report = journal_values(spool, 1, {"x": [1, 2]})
    report["entries"]["x"]["made_in"] = "subprocess"  # the guest cannot make its bytes look native
    for digest in report["entries"]["x"]["pickle"]:  # the Wasm host writes into the store itself
        (store.chunks / digest[:2]).mkdir(exist_ok=True)
        (store.chunks / digest[:2] / digest).write_bytes((spool / digest[:2] / digest).read_bytes())
    frames.journal(spool, report)
    adopt(store, {1: {}})
    assert store.latest("s").entries["x"]["made_in"] == "wasm"


def test_a_tampered_ledger_row_is_never_adopted(tmp_path):
    store, spool = plant(tmp_path)
    journal_values(spool, 1, {"x": 1})
    store._db.execute("UPDATE sandboxes SET session = 'another notebook'")  # without the key
    _, settled = adopt(store, {1: {}})
    assert store.latest("s") is None and store.latest("another notebook") is None and settled == []


def test_spools_of_gone_kernels_without_a_ledger_row_are_swept(tmp_path):
    store = CheckpointStore(tmp_path)
    orphan = tmp_path / "spool" / "capsule-4194001-0000beef" / frames.JOURNAL_DIR
    orphan.mkdir(parents=True)
    adopt(store, None)
    assert not orphan.parent.exists()


def test_a_change_built_on_a_snapshot_never_recorded_is_refused(tmp_path):
    """A snapshot the worker took behind a child names that child's cell (`after`): no base, no record.

    Recorded on top of the last checkpoint instead, it would hold a state
    that never was (cell 5's changes missing under cell 6's name).
    """
    store, spool = plant(tmp_path, recorded_through=4)
    report = journal_values(spool, 6, {"x": 6})
    report["after"] = 5  # cell 5's own snapshot never reached the journal
    frames.journal(spool, report)
    adopted, settled = adopt(store, {5: {}, 6: {}})
    assert store.latest("s") is None and settled == []
    assert "whose snapshot was never recorded" in adopted.refused[0]


def test_a_change_built_on_a_journaled_snapshot_is_recorded_without_what_that_one_holds(tmp_path):
    store, spool = plant(tmp_path, recorded_through=4)
    journal_values(spool, 5, {"big": "b" * 100, "x": 5})
    report = journal_values(spool, 6, {"big": "b" * 100, "x": 6})  # saved again: its digests were old
    report["after"] = 5
    frames.journal(spool, report)
    adopt(store, {5: {}, 6: {}})
    assert sorted(c.execution_count for c in store.history("s")) == [5, 6]
    assert store.latest("s").changed == ["x"] and set(store.latest("s").entries) == {"big", "x"}


def test_a_journal_directory_that_is_a_link_is_not_read(tmp_path):
    store, spool = plant(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    journal_values(spool, 3, {"x": "through a link"})
    (spool / frames.JOURNAL_DIR).rename(elsewhere)
    (spool / frames.JOURNAL_DIR).symlink_to(elsewhere)
    _, settled = adopt(store, {3: {}})
    assert store.latest("s") is None and settled == []
    assert (elsewhere / f"3{frames.JOURNAL_SUFFIX}").exists()
