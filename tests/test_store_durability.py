"""Rule 6: kill -9 at any instant leaves a store that opens and holds every
checkpoint reported complete."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from capsule_kernel.inside import snapshot
from capsule_kernel.kernel.checkpoint.store import CheckpointStore

ROOT = Path(__file__).resolve().parent.parent
KILLS = 50


@pytest.mark.slow
def test_store_survives_kill_minus_9(tmp_path):
    home = tmp_path / "store"
    reported: list[str] = []
    rng = random.Random(1234)
    for _ in range(KILLS):
        writer = subprocess.Popen(
            [sys.executable, "-m", "tests.store_writer", str(home)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None
        # Let it commit a random number of times (at least once), then kill
        # it wherever it is: writing chunks, inside a transaction, printing.
        for _ in range(1 + rng.randrange(4)):
            line = writer.stdout.readline().strip()
            assert line, "the writer stopped reporting"
            reported.append(line)
        os.kill(writer.pid, signal.SIGKILL)
        remaining, _ = writer.communicate()
        # A line that was printed in full was committed before it was printed.
        reported += [line for line in remaining.split("\n")[:-1] if line]
    store = CheckpointStore(home)
    by_id = {c.id: c for c in store.history("kill-loop")}
    missing = [cid for cid in reported if cid not in by_id]
    assert not missing, f"{len(missing)} reported checkpoints are missing"
    for cid in reported:
        checkpoint = by_id[cid]
        assert store.missing_chunks(checkpoint.entries) == [], cid
        for entry in checkpoint.entries.values():
            snapshot.load(entry, store.chunks)  # every value loads
    assert len(reported) >= KILLS


def test_a_short_number_names_a_count_never_an_id_prefix(tmp_path):
    """`%capsule restore 4` for a cell without a checkpoint of its own finds none, whatever the ids look like."""
    store = CheckpointStore(tmp_path)
    made = []
    while not any(c.id[0].isdigit() and c.id[0] != "1" for c in made):
        made.append(store.record("s", 1, "x = 1", {}, [], 0))
    digit = next(c.id[0] for c in made if c.id[0].isdigit() and c.id[0] != "1")
    assert store.find("s", digit) == []
    assert [c.execution_count for c in store.find("s", "1")] == [1] * len(made)
    assert store.find("s", made[-1].id[:8])[0].id == made[-1].id
