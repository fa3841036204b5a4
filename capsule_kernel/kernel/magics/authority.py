"""Which %capsule lines carry the user's authority, and which are only requests from a sandbox.

The kernel parses the cell source the frontend sent, once, with the parser
that runs the lines (parser.parse). A %capsule line that reaches the kernel
from inside a sandbox (IPython turns an in-cell ``%capsule`` line into a
``run_line_magic`` call, and so can any code the cell runs) is honoured only
if it is read-only, or if it is one of those lines of the cell's own source:
then the kernel's own parse of it runs, each at most once. A cell's code
cannot widen what its source says, and quoting tricks parse the same way on
both sides because the parse is the same.
"""

from __future__ import annotations

import argparse
import ast
from collections import Counter

from IPython.core.inputtransformer2 import TransformerManager

from capsule_kernel.kernel.magics.parser import MagicUsageError, parse
from capsule_kernel.protocol.limits import LIMIT_NAMES

# These replace the sandbox or its namespace: never from inside a running cell.
WHOLE_CELL = {"restore", "restart", "resume", "session", "mount", "gc", "task"}
_READ_ONLY = {"status", "log", "diff", "help", "tasks", "network"}


def read_only(args: argparse.Namespace) -> bool:
    """A subcommand that only shows: any code may ask for it."""
    command = args.command
    if command is None or command in _READ_ONLY:
        return True
    if command == "limits":
        return all(getattr(args, name) is None for name in LIMIT_NAMES)
    if command == "mode":
        return args.mode is None
    if command in ("mount", "session"):
        return getattr(args, "path", None) is None and getattr(args, "name", None) is None
    return False


def source_lines(code: str) -> list[str]:
    """The %capsule lines of this cell's source, as IPython will pass them to the magic.

    Only lines written with the ``%capsule`` escape count: an explicit
    ``get_ipython().run_line_magic(...)`` call is code, and what code asks
    for at run time is a request from inside the sandbox.
    """
    lines = []
    for raw in code.splitlines():
        stripped = raw.strip()
        if stripped != "%capsule" and not stripped.startswith("%capsule "):
            continue
        try:
            tree = ast.parse(TransformerManager().transform_cell(stripped))
        except (SyntaxError, ValueError, TypeError):
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "run_line_magic"
                and len(node.args) >= 2
                and all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in node.args[:2])
                and node.args[0].value == "capsule"
            ):
                lines.append(node.args[1].value)
    return lines


class Authority:
    """The privileged %capsule lines the running cell's source holds, parsed by the kernel."""

    def __init__(self) -> None:
        self._granted: Counter[str] = Counter()

    def begin_cell(self, code: str) -> None:
        self._granted = Counter(source_lines(code))

    def end_cell(self) -> None:
        self._granted = Counter()

    def from_sandbox(self, line: str) -> argparse.Namespace | None:
        """The parse to run for a line a sandbox relayed; MagicUsageError when it is not allowed.

        None: the line was help, which the caller shows.
        """
        args = parse(line)
        if read_only(args):
            return args
        if args.command in WHOLE_CELL:
            raise MagicUsageError(
                f"%capsule {args.command} replaces the sandbox's state, so it cannot run inside a cell "
                "with other code; put it in a cell of its own"
            )
        if self._granted[line] <= 0:
            raise MagicUsageError(
                f"%capsule {args.command}: refused: it came from code running inside the sandbox, not from a "
                "%capsule line of the cell (only status, log, diff, help and showing settings may be asked for "
                "from code)"
            )
        self._granted[line] -= 1
        return args
