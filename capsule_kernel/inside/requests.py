"""The kernel's requests to an idle sandbox, answered through one table.

A ``request`` frame names a kind (complete, inspect, history, restore...);
each sandbox builds a table of the kinds it answers. An unknown kind or a
failing handler becomes an error reply, never the end of the sandbox, and
the reply always carries the request's id.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def error_content(err: BaseException) -> dict[str, Any]:
    return {"status": "error", "ename": type(err).__name__, "evalue": str(err), "traceback": []}


class RequestTable:
    """kind -> handler(args) -> reply content."""

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self.handlers = dict(handlers)

    def answer(self, message: dict[str, Any]) -> dict[str, Any]:
        """The ``reply`` frame for one ``request`` frame."""
        kind = message.get("kind")
        handler = self.handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            content = error_content(ValueError(f"unknown request {kind!r}"))
        else:
            try:
                content = handler(message.get("args") or {})
            except Exception as err:  # noqa: BLE001 - a failed completion must not end the sandbox
                content = error_content(err)
        return {"type": "reply", "id": message.get("id"), "content": content}
