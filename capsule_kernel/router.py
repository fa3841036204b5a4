"""Which sandbox runs a cell, and why, from the analyzer's plan.

Only the subprocess sandbox exists so far; the router still records its
reason for every cell (it lands in execute_reply metadata) so that adding the
Wasm sandbox changes a decision table, not the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from capsule_kernel.analyzer import ExecutionPlan

ROUTING_MODES = ("subprocess",)


@dataclass(frozen=True)
class Route:
    sandbox: str
    reason: str


def route(plan: ExecutionPlan, routing_mode: str = "subprocess") -> Route:
    """Decide where the cell runs."""
    if routing_mode != "subprocess":
        raise ValueError(f"unknown routing mode {routing_mode!r} (available: {', '.join(ROUTING_MODES)})")
    if plan.syntax_error:
        return Route("subprocess", "syntax error: IPython in the sandbox reports it")
    return Route("subprocess", "routing mode is subprocess")
