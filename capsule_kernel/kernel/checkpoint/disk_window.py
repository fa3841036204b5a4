"""How long after its reply each cell's checkpoint reached the disk: the window a power loss can hit.

A kill of any process loses nothing that replied (the journal, the keeper
and adoption see to that), but those survive in the page cache, not on the
disk. What is on the disk is what the kernel recorded: chunks fsynced, their
directories fsynced, the row committed with SQLite's synchronous=FULL (which
also syncs every earlier commit in the same WAL: the cell's promise). The
reply does not wait for that; this measures, cell by cell, how long after
the reply it came (zero when it came first), so that `%capsule status` and
the benchmarks state the window in milliseconds rather than guess it.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

RECENT_CELLS = 512  # cells the percentiles are taken over
_WAITING = 256  # cells whose reply (or record) is noted while the other is awaited


class DiskWindow:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.lags: deque[float] = deque(maxlen=RECENT_CELLS)  # seconds, one per cell
        self._replied: OrderedDict[int, float] = OrderedDict()
        self._on_disk: OrderedDict[int, float] = OrderedDict()

    def replied(self, count: int) -> None:
        """Cell `count`'s reply is going out, and its state is to be recorded."""
        if self._on_disk.pop(count, None) is not None:
            self.lags.append(0.0)  # on the disk before its reply
            return
        _put(self._replied, count, self.clock())

    def on_disk(self, counts: Iterable[int]) -> None:
        """The checkpoint holding these cells is committed (every covered cell of a coalesced one)."""
        now = self.clock()
        for count in counts:
            sent = self._replied.pop(count, None)
            if sent is None:
                _put(self._on_disk, count, now)
            else:
                self.lags.append(max(0.0, now - sent))

    def never(self, counts: Iterable[int]) -> None:
        """These cells' snapshot failed: no window to measure (a later checkpoint holds their state)."""
        for count in counts:
            self._replied.pop(count, None)
            self._on_disk.pop(count, None)

    def summary(self) -> str:
        """p50, p99 and the largest window over the recent cells, in milliseconds."""
        if not self.lags:
            return "no cell recorded yet"
        ordered = sorted(self.lags)

        def at(share: float) -> float:
            return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000

        return (
            f"p50 {at(0.5):.1f} ms, p99 {at(0.99):.1f} ms, max {ordered[-1] * 1000:.1f} ms after the reply"
            f" (last {len(ordered)} cells)"
        )


def _put(waiting: OrderedDict[int, float], count: int, instant: float) -> None:
    waiting[count] = instant
    while len(waiting) > _WAITING:
        waiting.popitem(last=False)
