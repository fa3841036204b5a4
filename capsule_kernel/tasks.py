"""Tasks, as the notebook sees them: ``TaskFailed``, ``envelope(NAME)`` and the ``@task`` decorator.

Runs INSIDE the notebook's sandbox (``from capsule_kernel.tasks import task``).
The kernel runs every task in a sandbox of its own and binds its result to
NAME here, between cells, through a ``bind`` request (``bind`` below): the
value as the task's sandbox pickled it, loaded under the same trust rules as
a checkpoint (a value made in the Wasm sandbox loads outside it as data
only), and the task's envelope, which ``envelope(NAME)`` returns.
"""

from __future__ import annotations

import base64
from typing import Any

# The last envelope of each task this sandbox was told about (by the kernel's bind requests).
_ENVELOPES: dict[str, dict[str, Any]] = {}


class TaskFailed(Exception):
    """A task ended without success; ``envelope`` is its envelope (a dict)."""

    def __init__(self, envelope: dict[str, Any]) -> None:
        error = envelope.get("error") or {}
        name = envelope.get("execution", {}).get("task_name", "?")
        super().__init__(f"task {name} failed ({error.get('type')}): {error.get('message')}")
        self.envelope = envelope


def envelope(name: str) -> dict[str, Any]:
    """The envelope of the last run of task ``name`` in this notebook (KeyError if it never ended here)."""
    if name not in _ENVELOPES:
        raise KeyError(f"no envelope of a task named {name!r} has reached this sandbox yet")
    return _ENVELOPES[name]


def bind(namespace: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """The kernel's ``bind`` request: keep the envelope, and on success set NAME to the task's value."""
    name = args["name"]
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{name!r} is not a name")
    the_envelope = args.get("envelope")
    if isinstance(the_envelope, dict):
        _ENVELOPES[name] = the_envelope
    if not (isinstance(the_envelope, dict) and the_envelope.get("success")):
        return {"status": "ok", "bound": False}
    if isinstance(args.get("pickle"), str):
        from capsule_kernel.checkpoint import snapshot

        entry = {"made_in": args["made_in"]} if args.get("made_in") else {}
        try:
            namespace[name] = snapshot.load_bytes(entry, base64.b64decode(args["pickle"]), [])
        except Exception as err:  # noqa: BLE001 - any failure to load it is reported
            # Refused (a Wasm-made value that is not data) or unloadable here: its JSON form, if it has one.
            if not the_envelope["execution"].get("result_json"):
                raise ValueError(snapshot.explain_failure(err)) from None
            namespace[name] = the_envelope["result"]
    elif args.get("json"):
        namespace[name] = the_envelope["result"]
    else:
        return {"status": "error", "ename": "ValueError", "evalue": "no value came with it", "traceback": []}
    return {"status": "ok", "bound": True}
