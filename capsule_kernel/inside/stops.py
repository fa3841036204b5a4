"""The exceptions a cell sees when it reaches a limit, in either sandbox.

They derive from KeyboardInterrupt so that ``except Exception`` in user code
does not swallow them, and they say which limit it was, with its value, in
the same words in both sandboxes. The namespace survives every one of them.
"""

from __future__ import annotations

from typing import Any

from capsule_kernel.protocol.limits import format_duration


class CellTimeout(KeyboardInterrupt):
    """The cell ran past the wall-clock limit (timeout)."""


class CPULimitExceeded(KeyboardInterrupt):
    """The cell used more CPU time than the cpu limit allows."""


def timeout_stop(limits: dict[str, Any]) -> CellTimeout:
    """The CellTimeout for the limits the cell ran under."""
    limit = format_duration(limits.get("timeout")) if limits.get("timeout") else "the deadline"
    return CellTimeout(f"the cell exceeded the sandbox wall-clock limit of {limit} (timeout); the namespace is kept")


def cpu_stop(limits: dict[str, Any]) -> CPULimitExceeded:
    """The CPULimitExceeded for the limits the cell ran under."""
    limit = format_duration(limits.get("cpu"))
    return CPULimitExceeded(f"the cell exceeded the sandbox CPU limit of {limit} (cpu); the namespace is kept")
