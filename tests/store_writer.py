"""A process that snapshots and records checkpoints as fast as it can.

Run by test_store_survives_kill_minus_9: it prints each checkpoint id once
the store has committed it ("reported complete"), and is killed with
SIGKILL at a random instant, over and over.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

from capsule_kernel.inside import snapshot
from capsule_kernel.kernel.checkpoint.store import CheckpointStore


def main() -> None:
    home = Path(sys.argv[1])
    store = CheckpointStore(home)
    rng = random.Random(os.getpid())
    count = 0
    namespace: dict[str, object] = {}
    digests: dict[str, str] = {}
    while True:
        count += 1
        name = f"v{rng.randrange(8)}"
        namespace[name] = os.urandom(rng.choice([10, 1000, 100_000, 3_000_000]))
        namespace["counter"] = count
        result = snapshot.take(namespace, list(namespace), digests, store.chunks)
        for key, entry in result["entries"].items():
            digests[key] = entry["digest"]
        checkpoint = store.record("kill-loop", count, f"cell {count}", result["entries"], [], result["written"])
        print(checkpoint.id, flush=True)


if __name__ == "__main__":
    main()
