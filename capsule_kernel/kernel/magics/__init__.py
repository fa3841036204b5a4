"""``%capsule`` magics: parsing, help and dispatch, run by the kernel.

A cell made only of ``%capsule`` lines is handled by the kernel without
touching the sandbox (so it works even while the sandbox is down). A
``%capsule`` line inside other code is sent back from the sandbox's IPython
to the kernel as a frame; authority.py decides whether it may run (read-only,
or a line of the cell's own source).
"""

from __future__ import annotations

from capsule_kernel.kernel.magics.commands import run, run_parsed
from capsule_kernel.kernel.magics.parser import MagicHelp, MagicUsageError, parse

__all__ = ["MagicHelp", "MagicUsageError", "capsule_lines", "parse_task_line", "run", "run_parsed", "task_cell"]


def task_cell(code: str) -> tuple[str, str] | None:
    """(the line after %%capsule, the body) for a ``%%capsule task NAME ...`` cell with a body, else None."""
    head, _, body = code.lstrip("\n").partition("\n")
    head = head.strip()
    if not head.startswith("%%capsule task ") or not body.strip():
        return None
    line = head[len("%%capsule") :].strip()
    if line.split()[1:2] in (["wait"], ["cancel"]):
        return None
    return line, body


def parse_task_line(line: str) -> object:
    """The kernel's own parse of a task cell's first line (the same parser every %capsule line uses)."""
    args = parse(line)
    if getattr(args, "command", None) != "task":
        raise MagicUsageError(f"%%capsule {line}: not a task")
    if args.names:
        raise MagicUsageError(f"%%capsule task {args.name}: one NAME, then options (got {' '.join(args.names)})")
    return args


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
