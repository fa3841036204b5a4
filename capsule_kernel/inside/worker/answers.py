"""Answers to the kernel's introspection requests, computed INSIDE the sandbox.

Completion and inspection need the live namespace, and history lives in the
shell's history database, so the worker answers them the way ipykernel's
IPythonKernel does, and the kernel only forwards the reply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from IPython.core.completer import provisionalcompleter, rectify_completions
from IPython.utils.tokenutil import token_at_cursor

_TYPES_KEY = "_jupyter_types_experimental"


def complete(shell: Any, code: str, cursor_pos: int | None) -> dict[str, Any]:
    if cursor_pos is None:
        cursor_pos = len(code)
    with provisionalcompleter():
        completions = list(rectify_completions(code, shell.Completer.completions(code, cursor_pos)))
    if completions:
        start, end = completions[0].start, completions[0].end
    else:
        start = end = cursor_pos
    return {
        "matches": [c.text for c in completions],
        "cursor_start": start,
        "cursor_end": end,
        "metadata": {
            _TYPES_KEY: [
                {"start": c.start, "end": c.end, "text": c.text, "type": c.type, "signature": c.signature}
                for c in completions
            ]
        },
        "status": "ok",
    }


def inspect(shell: Any, code: str, cursor_pos: int, detail_level: int = 0, omit_sections: Any = ()) -> dict[str, Any]:
    name = token_at_cursor(code, cursor_pos)
    reply: dict[str, Any] = {"status": "ok", "data": {}, "metadata": {}, "found": False}
    try:
        bundle = shell.object_inspect_mime(name, detail_level=detail_level, omit_sections=tuple(omit_sections))
    except KeyError:
        return reply
    if not shell.enable_html_pager:
        bundle.pop("text/html", None)
    reply["data"] = bundle
    reply["found"] = True
    return reply


def history(
    shell: Any,
    hist_access_type: str,
    output: bool = False,
    raw: bool = True,
    session: int = 0,
    start: int = 0,
    stop: int | None = None,
    n: int | None = None,
    pattern: str | None = None,
    unique: bool = False,
    **_: Any,
) -> dict[str, Any]:
    manager = shell.history_manager
    if hist_access_type == "tail":
        rows = manager.get_tail(n or 10, raw=raw, output=output, include_latest=True)
    elif hist_access_type == "range":
        # IPython numbers the current session 0 in its in-memory rows; frontends
        # (and the tail/search replies) use the real session number.
        rows = [
            (row[0] or manager.session_number, *row[1:])
            for row in manager.get_range(session, start, stop, raw=raw, output=output)
        ]
    elif hist_access_type == "search":
        rows = manager.search(pattern or "*", raw=raw, output=output, n=n, unique=unique)
    else:
        rows = []
    return {"status": "ok", "history": [list(row) for row in rows]}


def store_history(shell: Any, execution_count: int, code: str) -> dict[str, Any]:
    """A cell the kernel answered itself (%capsule lines) still belongs in IPython's history,
    under the number the frontend showed."""
    count = int(execution_count)
    shell.history_manager.store_inputs(count, code, code)
    shell.execution_count = count + 1
    return {"status": "ok"}


def comm_info(comms: Any, target_name: str | None = None) -> dict[str, Any]:
    comms_info = {
        comm_id: {"target_name": comm.target_name}
        for comm_id, comm in comms.comms.items()
        if target_name is None or comm.target_name == target_name
    }
    return {"status": "ok", "comms": comms_info}


def table(shell: Any, comms: Any) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    """The kinds the worker's shell answers (inside.requests.RequestTable adds the snapshot's)."""
    return {
        "complete": lambda args: complete(shell, args["code"], args.get("cursor_pos")),
        "inspect": lambda args: inspect(
            shell, args["code"], args["cursor_pos"], args.get("detail_level", 0), args.get("omit_sections", ())
        ),
        "history": lambda args: history(shell, **args),
        "store_history": lambda args: store_history(shell, args["execution_count"], args["code"]),
        "comm_info": lambda args: comm_info(comms, args.get("target_name")),
    }
