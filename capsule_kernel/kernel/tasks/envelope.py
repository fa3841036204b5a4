"""The structured verdict every task ends with, and how a failure is classified.

Runs in the KERNEL. The envelope is JSON (``envelope.schema.json`` in this
package says exactly what it holds); it is shown as the cell's output (an
HTML card, ``application/json`` and text), kept in the task record, and
handed to the notebook as ``capsule_kernel.tasks.envelope(NAME)``. Nothing
in it is taken from a sandbox except the result's JSON (size-capped) and
the error's text: the kind of failure is decided here, from the kernel's
own reading of the sandbox's end.
"""

from __future__ import annotations

import html
import json
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from capsule_kernel.kernel.sandbox.process import SandboxDied

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The JSON form of a result, kept in the envelope; a larger one is carried as a value only.
JSON_RESULT_LIMIT = 1024 * 1024
_ENAME_KINDS = {
    "CellTimeout": "timeout",
    "CPULimitExceeded": "cpu",
    "MemoryError": "memory",
    "KeyboardInterrupt": "cancelled",
}


@dataclass
class Failure:
    """Why one attempt failed: an error type of the envelope, a message, the traceback."""

    type: str
    message: str
    traceback: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "message": self.message, "traceback": list(self.traceback)}


def failure_from_reply(reply: dict[str, Any]) -> Failure:
    """An error reply of the task's code: its ename says which limit, if any, stopped it."""
    ename = str(reply.get("ename", "Error"))
    evalue = str(reply.get("evalue", ""))
    kind = _ENAME_KINDS.get(ename, "exception")
    return Failure(kind, f"{ename}: {evalue}" if evalue else ename, [str(t) for t in reply.get("traceback", [])])


def failure_from_death(death: SandboxDied, kind: str) -> Failure:
    """The task's sandbox ended before its reply: the kernel's own account of why."""
    reason = death.reason
    if death.timed_out or "wall-clock limit" in reason:
        error = "timeout"
    elif reason.startswith("was killed for exceeding the sandbox memory limit") or "memory cap" in reason:
        error = "memory"  # the kernel saw its cgroup's OOM kill (or the Wasm store's cap), not a guess
    elif "fuel" in reason:
        error = "fuel"
    elif "CPU limit" in reason:
        error = "cpu"
    else:
        error = "crash"
    where = "the Wasm sandbox" if kind == "wasm" else "the task's sandbox"
    return Failure(error, f"{where} {reason}")


@dataclass
class Attempt:
    n: int
    started: float
    duration_ms: int = 0
    error_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "error_type": self.error_type, "duration_ms": self.duration_ms}


def iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp * 1000) % 1000:03d}Z"


def build(
    *,
    name: str,
    task_id: str,
    sandbox: str,
    attempts: list[Attempt],
    started_at: float,
    duration_ms: int,
    result: dict[str, Any] | None,
    failure: Failure | None,
    fuel: int | None,
    peak_memory: int | None,
    cached: bool = False,
    host_requests: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One envelope; ``result`` is what the task's sandbox reported of its value (json, type, repr)."""
    value = None
    info: dict[str, Any] = {}
    if result is not None:
        value = result.get("json")
        info = {"result_type": str(result.get("type", "")), "result_repr": str(result.get("repr", ""))[:200]}
        info["result_json"] = "json" in result
    return {
        "success": failure is None,
        "result": value if failure is None else None,
        "error": failure.to_json() if failure is not None else None,
        "execution": {
            "task_name": name,
            "id": task_id,
            "sandbox": sandbox,
            "duration_ms": duration_ms,
            "retries": max(0, len(attempts) - 1),
            "attempts": [a.to_json() for a in attempts],
            "fuel_consumed": fuel,
            "peak_memory_bytes": peak_memory,
            "cached": cached,
            "host_requests": list(host_requests or ()),
            "started_at": iso(started_at),
            **info,
        },
    }


def schema() -> dict[str, Any]:
    """The JSON Schema every envelope satisfies (shipped with the package)."""
    text = resources.files("capsule_kernel.kernel.tasks").joinpath("envelope.schema.json").read_text()
    return json.loads(text)


# -- showing it -------------------------------------------------------------------------


def summary(envelope: dict[str, Any]) -> str:
    execution = envelope["execution"]
    parts = [
        f"task {execution['task_name']}",
        "succeeded" if envelope["success"] else f"failed ({envelope['error']['type']})",
        f"in {execution['duration_ms']} ms",
        f"{execution['sandbox']} sandbox",
        f"attempts {len(execution['attempts'])}",
    ]
    if execution.get("cached"):
        parts.append("cached: not run again (--rerun runs it)")
    if execution.get("fuel_consumed") is not None:
        parts.append(f"fuel {execution['fuel_consumed']:,}")
    if execution.get("peak_memory_bytes"):
        parts.append(f"peak memory {execution['peak_memory_bytes'] / 2**20:.1f} MiB")
    return ", ".join(parts)


def text(envelope: dict[str, Any]) -> str:
    lines = [summary(envelope)]
    if envelope["success"]:
        execution = envelope["execution"]
        shown = json.dumps(envelope["result"]) if execution.get("result_json") else execution.get("result_repr", "")
        lines.append(f"result: {shown[:500]}")
    else:
        traceback = envelope["error"]["traceback"]
        lines += [_ANSI.sub("", line) for line in traceback[-12:]] if traceback else []
        lines.append(f"error: {envelope['error']['message']}")
    return "\n".join(lines)


def card(envelope: dict[str, Any]) -> str:
    """A compact HTML card (JupyterLab and VS Code show it; text/plain is the fallback)."""
    execution = envelope["execution"]
    ok = envelope["success"]
    colour = "#2e7d32" if ok else "#c62828"
    if ok:
        detail = (
            json.dumps(envelope["result"])[:500] if execution.get("result_json") else execution.get("result_repr", "")
        )
        body = f"<code>{html.escape(detail)}</code>"
    else:
        error = envelope["error"]
        body = f"<b>{html.escape(error['type'])}</b>: {html.escape(error['message'][:500])}"
        if error["traceback"]:
            shown = "\n".join(_ANSI.sub("", line) for line in error["traceback"][-12:])
            body += f"<pre style='margin:2px 0'>{html.escape(shown)}</pre>"
    return (
        f'<div class="capsule-task" style="border-left:3px solid {colour};padding:2px 8px">'
        f"<div>{html.escape(summary(envelope))}</div><div>{body}</div></div>"
    )


def bundle(envelope: dict[str, Any]) -> dict[str, Any]:
    return {"text/plain": text(envelope), "text/html": card(envelope), "application/json": envelope}
