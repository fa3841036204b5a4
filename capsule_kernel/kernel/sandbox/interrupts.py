"""Stop, then stop again: an interrupt the running cell does not heed ends its sandbox.

Runs in the KERNEL, for either sandbox. An interrupt is a SIGINT (the
worker's process group, or the Wasm host, which raises KeyboardInterrupt in
its guest); a cell can ignore it (`signal.signal(SIGINT, SIG_IGN)`, a loop
that catches KeyboardInterrupt, C code that never checks). The stop button
must still work, without a kernel restart that would lose the namespace:

- a second interrupt from the user for the same cell, once the first has had
  SECOND_AFTER_SECONDS to act (a double click is one stop), stops the
  sandbox at once;
- with no second one, a cell still running `interrupt_grace` seconds after
  the first interrupt (the operator's `[sandbox] interrupt_grace`, 3 s)
  stops it too.

Stopping is a kill: the cell's reply says what happened and that what the
cell did is lost, and the kernel restores the last checkpoint into a fresh
sandbox (cells.py, _report_death), as after any death. Interrupts the kernel
repeats on its own (pool.py: a SIGINT that landed between a fork and an exec)
are not the user's second stop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

# A second interrupt this soon after the first is the same press (a bounce, a double click).
SECOND_AFTER_SECONDS = 0.5


class InterruptEscalation:
    """One sandbox's interrupts, per cell: the first is a SIGINT, a second (or the grace running out) a stop."""

    def __init__(
        self,
        grace: Callable[[], float],
        stop: Callable[[asyncio.Future, str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.grace = grace  # the operator's interrupt_grace, read when it is needed
        self.stop = stop  # kill the sandbox if that cell still runs in it, with the reason its death is told with
        self.clock = clock
        self._cell: asyncio.Future | None = None  # the cell (its "done" future) interrupted by the user
        self._first_at = 0.0
        self._timed: asyncio.Future | None = None  # the cell whose grace is running

    def interrupted(
        self, cell: asyncio.Future | None, loop: asyncio.AbstractEventLoop | None, *, by_user: bool
    ) -> None:
        """A SIGINT was just sent while `cell` runs; from any thread (the control thread, a signal handler)."""
        if cell is None or loop is None or cell.done():
            return
        loop.call_soon_threadsafe(self._on_loop, cell, loop, by_user, self.clock())

    def _on_loop(self, cell: asyncio.Future, loop: asyncio.AbstractEventLoop, by_user: bool, at: float) -> None:
        if cell.done():
            return
        if by_user and self._cell is cell and at - self._first_at >= SECOND_AFTER_SECONDS:
            self._stop(cell, "was stopped by a second interrupt (the cell had not stopped at the first)")
            return
        if by_user and self._cell is not cell:
            self._cell, self._first_at = cell, at
        if self._timed is not cell:
            self._timed = cell
            loop.call_later(self.grace(), self._grace_over, cell)

    def _grace_over(self, cell: asyncio.Future) -> None:
        if self._timed is cell:
            self._timed = None
        grace = f"{self.grace():g} s"
        self._stop(cell, f"did not stop within {grace} of the interrupt (the cell ignores it), so it was stopped")

    def _stop(self, cell: asyncio.Future, reason: str) -> None:
        if not cell.done():
            self.stop(cell, f"{reason}; what that cell did is lost")
