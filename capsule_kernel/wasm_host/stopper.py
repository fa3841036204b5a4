"""Deadlines and interrupts for the guest: a soft stop at its next host call, then one epoch increment."""

from __future__ import annotations

import threading
import time
from typing import Any

from capsule_kernel.protocol.limits import STOP_GRACE_SECONDS

# How often a cell under a CPU budget is looked at.
CPU_POLL_SECONDS = 0.02

# WASI errno values (wasi_snapshot_preview1).


class Stopper:
    """Deadlines and interrupts, watched from a thread while the guest computes.

    The soft stop is delivered at the guest's next call to the host (its
    print, sleep or input raise KeyboardInterrupt or CellTimeout and the
    namespace lives). A cell that makes no such call within the grace period
    is stopped hard: one epoch increment, armed as the store's deadline.
    """

    def __init__(self, engine: Any, wake_guest: Any) -> None:
        self.engine = engine
        self.wake_guest = wake_guest
        self.lock = threading.Condition()
        self.in_cell = False
        self.deadline: float | None = None
        self.hard_stop_at: float | None = None
        self.pending: str | None = None  # "interrupt" or "timeout", not yet delivered
        self.reason: str | None = None  # why the current cell is being stopped
        self.stopped_hard: str | None = None
        self.sleep_wake = threading.Event()
        # The CPU the cell may spend, counting what the host does for it inside host
        # calls (WASI reads from mounts): fuel counts Wasm instructions only.
        self.main_clock = time.pthread_getcpuclockid(threading.get_ident())
        self.cpu_start = 0.0
        self.cpu_budget: float | None = None
        self.cpu_reason = ""
        threading.Thread(target=self._watch, name="capsule-wasm-stopper", daemon=True).start()

    def begin_cell(self, timeout: float | None, cpu_budget: float | None = None, cpu_reason: str = "") -> None:
        """Called on the main thread as the guest takes a cell: the cell's clocks start here."""
        with self.lock:
            self.in_cell = True
            self.pending = self.reason = None
            self.hard_stop_at = None
            self.deadline = time.monotonic() + timeout if timeout else None
            self.cpu_start = time.clock_gettime(self.main_clock)
            self.cpu_budget, self.cpu_reason = cpu_budget, cpu_reason
            self.sleep_wake.clear()
            self.lock.notify()

    def end_cell(self) -> None:
        with self.lock:
            self.in_cell = False
            self.deadline = self.hard_stop_at = None
            self.pending = None
            self.lock.notify()

    def interrupt(self) -> None:
        with self.lock:
            if not self.in_cell:
                return
            self._stop_soft("interrupt")

    def take_pending(self) -> str | None:
        with self.lock:
            why, self.pending = self.pending, None
            if why is None and self.hard_stop_at is None:
                self.sleep_wake.clear()
            return why

    def _stop_soft(self, why: str) -> None:
        self.pending = self.reason = why
        if self.hard_stop_at is None:
            self.hard_stop_at = time.monotonic() + STOP_GRACE_SECONDS
        self.sleep_wake.set()
        self.wake_guest()
        self.lock.notify()

    def _watch(self) -> None:
        with self.lock:
            while True:
                now = time.monotonic()
                if self.in_cell and self.deadline is not None and now >= self.deadline:
                    self.deadline = None
                    self._stop_soft("timeout")
                if self.in_cell and self.hard_stop_at is not None and now >= self.hard_stop_at:
                    self.hard_stop_at = None
                    self.stopped_hard = self.reason or "interrupt"
                    self.engine.increment_epoch()
                if self.in_cell and self.cpu_budget is not None and self.stopped_hard is None:
                    if time.clock_gettime(self.main_clock) - self.cpu_start >= self.cpu_budget:
                        self.stopped_hard = "cpu"
                        self.engine.increment_epoch()
                times = [t for t in (self.deadline, self.hard_stop_at) if t is not None and self.in_cell]
                if self.in_cell and self.cpu_budget is not None and self.stopped_hard is None:
                    times.append(now + CPU_POLL_SECONDS)
                self.lock.wait(max(0.0, min(times) - now) if times else None)
