"""``%capsule`` magics: parsing, help and dispatch, run by the kernel.

A cell made only of ``%capsule`` lines is handled by the kernel without
touching the sandbox (so it works even while the sandbox is down). A
``%capsule`` line inside other code is sent back from the sandbox's IPython
to the kernel as a frame; authority.py decides whether it may run (read-only,
or a line of the cell's own source).
"""

from __future__ import annotations

from capsule_kernel.magics.commands import run, run_parsed
from capsule_kernel.magics.parser import MagicHelp, MagicUsageError

__all__ = ["MagicHelp", "MagicUsageError", "capsule_lines", "run", "run_parsed"]


def capsule_lines(code: str) -> list[str] | None:
    """The magic lines if the cell holds nothing but %capsule lines, else None.

    Raises MagicUsageError for a %%capsule cell whose subcommand takes no body.
    """
    lines = []
    all_lines = code.splitlines()
    first = next((line.strip() for line in all_lines if line.strip()), "")
    if first == "%%capsule" or first.startswith("%%capsule "):
        body = code.split(first, 1)[1].strip()
        if body:
            raise MagicUsageError(f"{first}: this subcommand takes no cell body")
        return [first[len("%%capsule") :].strip()]
    for raw in all_lines:
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped == "%capsule" or stripped.startswith("%capsule "):
            lines.append(stripped[len("%capsule") :].strip())
        else:
            return None
    return lines or None
