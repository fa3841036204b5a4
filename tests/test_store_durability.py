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
