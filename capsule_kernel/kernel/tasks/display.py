"""What the user sees of tasks: each run's live status display (throttled), its output's tail, the %capsule tasks table.

A part of TaskScheduler (a mixin over its state: runs, controller.relay).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from capsule_kernel.kernel.tasks import envelope as task_envelope
from capsule_kernel.kernel.tasks.runs import (
    OUTPUT_TAIL_CHARS,
    STATUS_MIME_THROTTLE_SECONDS,
    TaskRun,
)
from capsule_kernel.protocol.limits import format_size

if TYPE_CHECKING:
    pass


class TaskDisplay:
    """Live status displays and the %capsule tasks table."""

    def _on_output(self, run: TaskRun, event: dict[str, Any]) -> None:
        """Output of a task's code: live in the cell for a foreground task; into its display in the background."""
        relay = self.controller.relay
        if not run.spec.background:
            relay.on_event_for(event, run.parent)
            return
        if event.get("type") == "stream":
            run.output = _terminal_tail(run.output + event["text"])
            self._show_status(run)

    def _show_status(self, run: TaskRun, *, first: bool = False, final: bool = False) -> None:
        if run.display_id is None:
            return
        now = time.monotonic()
        if not (first or final) and now - run.last_shown < STATUS_MIME_THROTTLE_SECONDS:
            return
        run.last_shown = now
        if final and run.envelope is not None:
            data = task_envelope.bundle(run.envelope)
            if run.output:
                data["text/plain"] = run.output.rstrip("\n") + "\n" + data["text/plain"]
        else:
            line = self._status_line(run)
            data = {"text/plain": (run.output.rstrip("\n") + "\n" if run.output else "") + line}
        msg_type = "display_data" if first else "update_display_data"
        content = {"data": data, "metadata": {}, "transient": {"display_id": run.display_id}}
        self.controller.relay.publish_for(msg_type, content, run.parent)

    @staticmethod
    def _status_line(run: TaskRun) -> str:
        elapsed = time.monotonic() - (run.started or run.submitted)
        state = run.state
        if state == "retrying" and run.retry_in is not None:
            state = f"retrying in {run.retry_in:.1f} s"
        attempt = f", attempt {run.attempt}" if run.attempt else ""
        return f"task {run.name}: {state}, {elapsed:.1f} s{attempt}"

    def table(self) -> tuple[list[str], list[list[str]]]:
        headers = ["name", "id", "state", "attempts", "duration", "sandbox", "fuel", "peak memory"]
        rows: dict[str, list[str]] = {}
        records = self.records.of_session(self.controller.session_name) if self.records else []
        for record in records:
            envelope = record.envelope or {}
            rows[record.key] = _row(record.name, record.key, record.shown_state(self.controller.kernel_id),
                                    envelope.get("execution"), record.spec.get("kind", ""))  # fmt: skip
        for run in self._by_key.values():
            if run.future is not None and not run.future.done():
                rows[run.key] = _row(run.name, run.key, run.state, None, run.spec.kind, run.attempt)
            elif run.key not in rows and run.envelope is not None:  # answered from another session's record
                execution = run.envelope["execution"]
                state = "succeeded (cached)" if execution.get("cached") else run.state
                rows[run.key] = _row(run.name, run.key, state, execution, run.spec.kind)
        return headers, list(rows.values())


def _row(name: str, key: str, state: str, execution: dict[str, Any] | None, kind: str, attempt: int = 0) -> list[str]:
    execution = execution or {}
    attempts = len(execution.get("attempts", [])) or attempt
    duration = f"{execution['duration_ms']} ms" if "duration_ms" in execution else ""
    fuel = execution.get("fuel_consumed")
    peak = execution.get("peak_memory_bytes")
    return [
        name,
        key[:12],
        state,
        str(attempts or ""),
        duration,
        execution.get("sandbox", kind),
        f"{fuel:,}" if isinstance(fuel, int) else "",
        format_size(peak) if isinstance(peak, int) else "",
    ]


def _terminal_tail(text: str) -> str:
    """What a terminal would show of this output: a carriage return rewrites its line (tqdm), the tail kept."""
    lines = []
    for line in text.split("\n"):
        lines.append(line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r"))
    return "\n".join(lines)[-OUTPUT_TAIL_CHARS:]
