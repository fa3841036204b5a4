"""Which sandbox runs a cell, and why, from the analyzer's plan.

Three routing modes. ``subprocess``: every cell runs in the CPython child.
``wasm``: every cell runs in the Wasm sandbox, and a cell it cannot run (a
native extension import, a shell escape) is refused with the reason and the
way out. ``auto``: cells Wasm can run (pure Python, stdlib imports, no
network, no shell, no IPython magics, no values it cannot load) go to Wasm;
the rest to the subprocess sandbox. The reason lands in execute_reply
metadata either way.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass

from capsule_kernel.kernel.analyzer import ExecutionPlan

ROUTING_MODES = ("subprocess", "wasm", "auto")
REFUSED = "refused"

# Stdlib modules the WASI build of CPython lacks (measured on the default runtime).
WASM_MISSING_STDLIB = frozenset(
    {
        "ctypes", "curses", "ensurepip", "fcntl", "grp", "idlelib", "lib2to3", "lzma", "mmap", "multiprocessing",
        "pty", "pwd", "readline", "resource", "rlcompleter", "ssl", "syslog", "termios", "tkinter", "tty",
        "turtle", "turtledemo", "venv", "webbrowser",
    }
)  # fmt: skip
# Importable in Wasm, but only to fail: there are no sockets, threads or processes.
WASM_USELESS_STDLIB = frozenset(
    {
        "socket", "socketserver", "http", "urllib", "ftplib", "smtplib", "poplib", "imaplib", "xmlrpc",
        "subprocess", "threading", "concurrent", "selectors", "asyncio", "signal", "wsgiref",
    }
)  # fmt: skip
# Beyond the stdlib, what the guest library offers (a small IPython.display stand-in).
WASM_PROVIDED = frozenset({"IPython", "IPython.display", "cloudpickle"})
# Top-level modules whose values a Wasm guest can unpickle (it has the stdlib and cloudpickle).
_WASM_VALUE_MODULES = frozenset(sys.stdlib_module_names) - WASM_MISSING_STDLIB | {"builtins", "__main__"}


@dataclass(frozen=True)
class Route:
    sandbox: str  # "subprocess", "wasm", or REFUSED
    reason: str


def wasm_obstacles(plan: ExecutionPlan, value_types: Mapping[str, str] | None = None) -> list[str]:
    """Why the Wasm sandbox cannot run this cell; empty when it can."""
    problems = []
    for module in sorted(plan.imports):
        top = module.split(".")[0]
        if module in WASM_PROVIDED:
            continue
        if top in WASM_MISSING_STDLIB:
            problems.append(f"it imports {module}, which the WASI build of CPython does not have")
        elif top not in sys.stdlib_module_names:
            problems.append(
                f"it imports {module}, which is not in the standard library (native extension modules such as "
                "numpy cannot load in Wasm)"
            )
    if plan.uses_shell:
        problems.append("it runs shell commands (!cmd or %system), and Wasm has no processes")
    other_magics = [magic for magic in plan.magics if magic.lstrip("%") != "capsule"]
    if other_magics:
        problems.append(f"it uses IPython magics ({', '.join(other_magics)}), and Wasm has no IPython")
    for name, type_name in sorted((value_types or {}).items()):
        top = type_name.split(".")[0]
        if "." in type_name and top not in _WASM_VALUE_MODULES:
            problems.append(f"it uses {name}, a {type_name} that Wasm cannot load")
    return problems


def route(plan: ExecutionPlan, routing_mode: str = "subprocess", value_types: Mapping[str, str] | None = None) -> Route:
    """Decide where the cell runs; `value_types` maps names the cell reads to their types, when known."""
    if routing_mode not in ROUTING_MODES:
        raise ValueError(f"unknown routing mode {routing_mode!r} (available: {', '.join(ROUTING_MODES)})")
    if routing_mode == "subprocess":
        if plan.syntax_error:
            return Route("subprocess", "syntax error: IPython in the sandbox reports it")
        return Route("subprocess", "routing mode is subprocess")
    if plan.syntax_error:
        return Route("wasm" if routing_mode == "wasm" else "subprocess", "syntax error: the sandbox reports it")
    problems = wasm_obstacles(plan, value_types if routing_mode == "auto" else None)
    if routing_mode == "wasm":
        if problems:
            return Route(REFUSED, "; ".join(problems))
        return Route("wasm", "routing mode is wasm")
    if problems:
        return Route("subprocess", "auto: " + "; ".join(problems))
    useless = sorted(m for m in plan.imports if m.split(".")[0] in WASM_USELESS_STDLIB)
    if useless:
        return Route("subprocess", f"auto: it imports {', '.join(useless)} (network, threads or processes)")
    return Route("wasm", "auto: pure Python with standard-library imports only")
