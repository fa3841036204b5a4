"""DiskWindow: the time from a cell's reply to its checkpoint on disk, whichever comes first."""

from __future__ import annotations

import pytest

from capsule_kernel.kernel.checkpoint.disk_window import RECENT_CELLS, DiskWindow


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_window_runs_from_the_reply_to_the_commit():
    clock = Clock()
    window = DiskWindow(clock)
    window.replied(1)
    clock.now += 0.004
    window.on_disk([1])
    assert list(window.lags) == [pytest.approx(0.004)]


def test_a_checkpoint_on_disk_before_its_reply_has_no_window():
    clock = Clock()
    window = DiskWindow(clock)
    window.on_disk([2])  # a small cell: recorded while its reply was still being sent
    clock.now += 1
    window.replied(2)
    assert list(window.lags) == [0.0]


def test_a_coalesced_checkpoint_closes_the_window_of_every_cell_it_covers():
    clock = Clock()
    window = DiskWindow(clock)
    for count in (3, 4, 5):
        window.replied(count)
        clock.now += 0.010
    window.on_disk([3, 4, 5])
    assert [round(lag, 3) for lag in window.lags] == [0.03, 0.02, 0.01]


def test_a_failed_snapshot_is_not_counted_and_not_kept():
    window = DiskWindow(Clock())
    window.replied(6)
    window.never([6])
    window.on_disk([6])  # a later report of the same count is a fresh one: not a window of the failed one
    window.replied(6)
    assert list(window.lags) == [0.0]


def test_the_summary_states_percentiles_in_milliseconds_over_a_bounded_history():
    clock = Clock()
    window = DiskWindow(clock)
    assert window.summary() == "no cell recorded yet"
    for count in range(RECENT_CELLS + 100):
        window.replied(count)
        clock.now += 0.001 if count % 100 else 0.5
        window.on_disk([count])
    assert len(window.lags) == RECENT_CELLS
    assert window.summary().startswith("p50 1.0 ms, p99 500.0 ms, max 500.0 ms after the reply")
