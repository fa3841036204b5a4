"""Which notebook a session belongs to, as the frontend says it (never as a sandbox says it).

VS Code's Jupyter extension names the notebook only in the start-up code it
sends, ``__vsc_ipynb_file__ = ...``. The kernel reads that from the source the
frontend sent, statically: a string, or ``os.path.join(os.getcwd(), 'nb.ipynb')``
as the extension writes it. What the code does when it runs cannot move a
notebook's checkpoints into another session.
"""

from __future__ import annotations

import ast
from pathlib import Path

_NAME = "__vsc_ipynb_file__"


def _static_path(node: ast.expr, cwd: Path) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and not node.keywords:
        if node.func.attr == "getcwd" and not node.args:
            return str(cwd)
        if node.func.attr == "join" and node.args:
            parts = [_static_path(arg, cwd) for arg in node.args]
            if all(isinstance(part, str) for part in parts):
                return str(Path(*parts))  # type: ignore[arg-type]
    return None


def frontend_notebook_path(code: str, cwd: Path) -> str | None:
    """The notebook path a frontend's start-up code assigns to __vsc_ipynb_file__, if it does so statically."""
    if _NAME not in code:
        return None
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == _NAME
        ):
            return _static_path(node.value, cwd)
    return None
