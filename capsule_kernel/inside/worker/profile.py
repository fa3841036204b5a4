"""Runs IN the worker: the user's IPython profile, applied as ipykernel applies it to its shell.

The kernel read the sources (capsule_kernel/ipython_profile.py); here they
run, once per sandbox, before its first cell: extensions, startup files,
exec_lines, exec_files, in IPython's order. Names they define are hidden
from `%who` and from checkpoints, as ipykernel hides its initial namespace
(every new sandbox runs them again). A failure is collected as one line,
never raised: the sandbox starts anyway and the kernel shows the lines with
the first cell.
"""

from __future__ import annotations

from typing import Any


def _failure(what: str, err: BaseException) -> str:
    return f"{what}: {type(err).__name__}: {err}"[:300]


def _run_source(shell: Any, item: dict[str, Any], what: str) -> str | None:
    name, source = str(item.get("name", "?")), str(item.get("source", ""))
    if item.get("ipy"):
        result = shell.run_cell(source, store_history=False, silent=True)
        error = result.error_before_exec or result.error_in_exec
        return None if error is None else _failure(f"{what} {name}", error)
    namespace = shell.user_ns
    had_file, previous = "__file__" in namespace, namespace.get("__file__")
    namespace["__file__"] = name
    try:
        exec(compile(source, name, "exec"), namespace)  # the user's own startup code, in the sandbox
    except BaseException as err:  # noqa: BLE001 - a broken startup file must not stop the sandbox
        return _failure(f"{what} {name}", err)
    finally:
        if had_file:
            namespace["__file__"] = previous
        else:
            namespace.pop("__file__", None)
    return None


def apply(shell: Any, app: dict[str, Any]) -> list[str]:
    """Apply the profile's part for the sandbox; return one line per failure (none is shown as output)."""
    shell.quiet = True
    try:
        return _apply(shell, app)
    finally:
        shell.quiet = False


def _apply(shell: Any, app: dict[str, Any]) -> list[str]:
    problems: list[str | None] = []
    for name in app.get("extensions", []):
        try:
            shell.extension_manager.load_extension(str(name))
        except BaseException as err:  # noqa: BLE001 - as IPython: a bad extension is reported, not fatal
            problems.append(_failure(f"extension {name}", err))
    for item in app.get("startup", []):
        problems.append(_run_source(shell, item, "startup file"))
    for line in app.get("exec_lines", []):
        result = shell.run_cell(str(line), store_history=False, silent=True)
        error = result.error_before_exec or result.error_in_exec
        if error is not None:
            problems.append(_failure(f"exec_lines {str(line)[:60]!r}", error))
    for item in app.get("exec_files", []):
        problems.append(_run_source(shell, item, "exec_files entry"))
    shell.user_ns_hidden.update(shell.user_ns)
    return [problem for problem in problems if problem]
