"""The code that runs INSIDE the Wasm sandbox (CPython for WASI, no IPython).

Started by the host as the guest's main program. It speaks the same frames as
the subprocess worker, over a private channel: ``os.pread(0, ...)`` and
``os.pwrite(1, ...)``, two WASI calls no other code makes on a stream, which
the host shadows. Every time the guest waits for a frame, the host is at a
cell boundary: it tops up fuel and re-arms the deadline there.

A plain-Python cell runner stands in for IPython: the last expression becomes
an execute_result with the rich reprs objects offer, display() and
IPython.display's basic classes work (a small shim), print streams live,
input() asks the frontend, and errors come with a clean traceback.

Only the stdlib, cloudpickle and the pure-Python snapshot module are here.
"""

from __future__ import annotations

import ast
import base64
import builtins
import linecache
import os
import sys
import time
import traceback
import types
from typing import Any

from capsule_kernel.inside import snapshot, tasks
from capsule_kernel.inside.ledger import SnapshotLedger, clear_for_replace
from capsule_kernel.inside.requests import RequestTable
from capsule_kernel.inside.stops import CellTimeout
from capsule_kernel.inside.streams import FrameStream
from capsule_kernel.inside.wasm_guest.channel import Cancelled, Channel, raise_cancel
from capsule_kernel.inside.wasm_guest.completion import GuestCompletion

_STREAM_FLUSH_SECONDS = 0.005
_HIDDEN_NAMES = {"__name__", "__builtins__", "__doc__", "__loader__", "__spec__", "__package__", "In", "Out"}
_RED, _RESET = "\x1b[0;31m", "\x1b[0m"


class StdinNotImplementedError(RuntimeError):
    """input() in a cell whose frontend does not answer input requests."""


# -- the channel ---------------------------------------------------------------------


# -- output ----------------------------------------------------------------------------


class GuestStream(FrameStream):
    """sys.stdout / sys.stderr of the guest: flushed at newlines (no threads here), then any cancel is raised."""

    def __init__(self, name: str, guest: Guest) -> None:
        super().__init__(name, guest.channel.send)
        self._guest = guest
        self._last_flush = 0.0

    def written(self, text: str) -> None:
        if "\n" in text and time.monotonic() - self._last_flush >= _STREAM_FLUSH_SECONDS:
            self.flush()

    def flushed(self) -> None:
        self._last_flush = time.monotonic()
        self._guest.deliver_cancel()


_MIME_METHODS = (
    ("text/html", "_repr_html_"),
    ("text/markdown", "_repr_markdown_"),
    ("text/latex", "_repr_latex_"),
    ("image/svg+xml", "_repr_svg_"),
    ("image/png", "_repr_png_"),
    ("image/jpeg", "_repr_jpeg_"),
    ("application/json", "_repr_json_"),
)


def mime_bundle(value: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The representations an object offers, as IPython's display formatter would collect them."""
    data: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    method = getattr(value, "_repr_mimebundle_", None)
    if callable(method) and not isinstance(value, type):
        produced = method()
        if isinstance(produced, tuple):
            produced, metadata = produced[0], dict(produced[1] or {})
        data.update(produced or {})
    for mime, name in _MIME_METHODS:
        method = getattr(value, name, None)
        if mime in data or not callable(method) or isinstance(value, type):
            continue
        produced = method()
        if produced is None:
            continue
        if isinstance(produced, tuple):
            produced, metadata[mime] = produced
        if isinstance(produced, bytes):
            produced = base64.b64encode(produced).decode("ascii")
        data[mime] = produced
    data.setdefault("text/plain", repr(value))
    return data, metadata


# -- the IPython stand-ins ---------------------------------------------------------------


class GuestShell:
    """get_ipython() for transformed cells: %capsule goes to the kernel, the rest is refused."""

    def __init__(self, guest: Guest) -> None:
        self._guest = guest

    def run_line_magic(self, name: str, line: str) -> None:
        if name != "capsule":
            raise NotImplementedError(
                f"%{name}: IPython magics are not available in the Wasm sandbox (only %capsule); "
                "run %capsule mode subprocess for the full IPython"
            )
        self._guest.capsule_magic(line, None)

    def capsule_task(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        """A @task request to the kernel, through the host (capsule_kernel.tasks)."""
        guest = self._guest
        guest.flush()
        request_id = guest.request_id()
        guest.channel.send({"type": "task", "id": request_id, "action": action, "args": args})
        try:
            return guest.channel.wait_for("task_reply", request_id)["content"]
        except Cancelled as err:
            raise_cancel(err.why, guest.limits)
            raise

    def run_cell_magic(self, name: str, line: str, cell: str) -> None:
        if name != "capsule":
            raise NotImplementedError(f"%%{name}: IPython cell magics are not available in the Wasm sandbox")
        self._guest.capsule_magic(line, cell)

    def system(self, command: str) -> None:
        raise PermissionError(f"!{command}: the Wasm sandbox cannot run shell commands (it has no processes)")

    getoutput = system


def _refuse(what: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> Any:  # noqa: ARG001
        raise PermissionError(f"{what} is not possible in the Wasm sandbox; use %capsule mode subprocess")

    return refused


def _lock_down() -> None:
    """Turn the runtime's vague failures (Errno 58, AttributeError) into clear ones."""
    for name in ("system", "popen", "fork", "execv", "execve", "spawnv", "posix_spawn"):
        setattr(os, name, _refuse(f"os.{name}() (starting processes)"))
    import threading

    threading.Thread.start = _refuse("starting a thread")  # type: ignore[method-assign]
    try:
        import socket
    except ImportError:
        return
    socket.socket = _refuse("opening a socket (there is no network)")  # type: ignore[misc, assignment]
    socket.create_connection = _refuse("opening a connection (there is no network)")


# -- the guest ---------------------------------------------------------------------------


class Guest(GuestCompletion):
    def __init__(self) -> None:
        self.channel = Channel()
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        self.limits: dict[str, Any] = {}
        self.allow_stdin = False
        self.history: list[tuple[int, str]] = []
        self.out: dict[int, Any] = {}
        self.execution_count = 1
        self.ledger = SnapshotLedger()
        self.requests = RequestTable(
            {
                "complete": lambda args: self.complete(args["code"], int(args["cursor_pos"])),
                "inspect": lambda args: self.inspect(
                    args["code"], int(args["cursor_pos"]), int(args.get("detail_level", 0))
                ),
                "history": self.history_reply,
                "store_history": self.store_history,
                "names": lambda args: {"names": snapshot.saveable_names(self.namespace, self._hidden)},  # noqa: ARG005
                "restore": lambda args: self.restore(args["entries"], bool(args.get("replace"))),
                "forget_digests": self.forget_digests,
                "bind": lambda args: tasks.bind(self.namespace, args),
            }
        )
        self.snapshots = bool(os.environ.get("CAPSULE_SNAPSHOTS"))
        self._next_id = 0
        self.in_cell = False
        self.stdout = GuestStream("stdout", self)
        self.stderr = GuestStream("stderr", self)
        sys.stdout, sys.stderr = self.stdout, self.stderr
        self.shell = GuestShell(self)
        tasks.SHELL = self.shell
        self.namespace["get_ipython"] = lambda: self.shell
        self.namespace["display"] = self.display
        self.namespace["Out"] = self.out
        builtins.input = self.input  # type: ignore[assignment]
        self._sleep = time.sleep
        time.sleep = self.sleep  # type: ignore[assignment]
        _lock_down()
        self._hidden = set(self.namespace) | _HIDDEN_NAMES

    # -- talking to the host during a cell --------------------------------------------

    def deliver_cancel(self) -> None:
        """Raise the interrupt or timeout the host announced, inside the cell."""
        why, self.channel.cancelled = self.channel.cancelled, None
        if why and self.in_cell:
            raise_cancel(why, self.limits)

    def request_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def flush(self) -> None:
        self.stdout.flush()
        self.stderr.flush()

    def sleep(self, seconds: float) -> None:
        self.flush()
        try:
            self._sleep(seconds)
        except OSError:
            # wasi-libc reports any poll_oneoff failure as ENOTSUP; the host
            # cut the sleep short to stop the cell, and says why on the channel.
            self.channel.send({"type": "sleep_ended"})
            self.deliver_cancel()
            raise

    def input(self, prompt: object = "") -> str:
        self.flush()
        if not self.allow_stdin:
            raise StdinNotImplementedError("input() was called, but this frontend does not support input requests")
        request_id = self.request_id()
        self.channel.send({"type": "input_request", "id": request_id, "prompt": str(prompt), "password": False})
        try:
            reply = self.channel.wait_for("input_reply", request_id)
        except Cancelled as err:
            raise_cancel(err.why, self.limits)
        return str(reply.get("value", ""))

    def capsule_magic(self, line: str, cell: str | None) -> None:
        self.flush()
        request_id = self.request_id()
        self.channel.send({"type": "magic", "id": request_id, "line": line, "cell": cell})
        try:
            reply = self.channel.wait_for("magic_reply", request_id)
        except Cancelled as err:
            raise_cancel(err.why, self.limits)
        if not reply.get("ok", True):
            raise RuntimeError(reply.get("error", "%capsule failed"))

    def display(
        self,
        *values: Any,
        raw: bool = False,
        metadata: dict[str, Any] | None = None,
        display_id: str | bool | None = None,
        update: bool = False,
        clear: bool = False,  # noqa: ARG002 - IPython's signature
    ) -> Any:
        self.flush()
        if display_id is True:
            display_id = f"capsule-wasm-{time.time_ns()}"
        for value in values:
            if raw:
                data, meta = dict(value), dict(metadata or {})
            else:
                data, meta = mime_bundle(value)
                meta.update(metadata or {})
            transient = {"display_id": display_id} if display_id else {}
            self.channel.send(
                {"type": "display", "data": data, "metadata": meta, "transient": transient, "update": update}
            )
        return DisplayHandle(self, display_id) if display_id else None

    def clear_output(self, wait: bool = False) -> None:
        self.flush()
        self.channel.send({"type": "clear_output", "wait": wait})

    # -- cells ------------------------------------------------------------------------

    def execute(self, message: dict[str, Any]) -> None:
        self.limits = dict(message.get("limits", self.limits))
        self.allow_stdin = bool(message.get("allow_stdin"))
        count = int(message.get("execution_count", self.execution_count))
        silent = bool(message.get("silent"))
        store_history = bool(message.get("store_history", not silent))
        code = message["code"]
        if store_history:
            self.history.append((count, message.get("raw_code") or code))
        error = None
        self.in_cell = True
        try:
            self.run(code, count, silent)
            self.flush()
            self.deliver_cancel()
        except BaseException as exc:  # noqa: BLE001 - every failure of the cell is the user's error, shown
            error = self.show_error(exc)
        finally:
            self.in_cell = False
            self.channel.cancelled = None
        self.flush()
        reply: dict[str, Any] = {"execution_count": count, "payload": []}
        if error is None:
            reply["status"] = "ok"
            reply["user_expressions"] = self.user_expressions(message.get("user_expressions") or {})
        else:
            reply.update(status="error", user_expressions={}, **error)
        self.channel.send({"type": "cell_end"})
        snapshot_sent = None
        if error is None and not silent and self.snapshots:
            snapshot_sent = self.snapshot(count, list(message.get("snapshot_candidates", [])))
        if store_history:
            self.execution_count = count + 1
        self.channel.send({"type": "done", "reply": reply, "snapshot_sent": snapshot_sent})

    def run(self, code: str, count: int, silent: bool) -> None:
        filename = f"<cell {count}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
        tree = ast.parse(code, filename=filename)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr) and not silent:
            last = ast.Expression(tree.body.pop().value)
        flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        body = compile(tree, filename, "exec", flags=flags, dont_inherit=True)
        # Fuel is counted from here: the cell's own work, not our frame parsing.
        self.channel.send({"type": "cell_start"})
        self._run_code(body)
        if last is not None:
            value = self._run_code(compile(last, filename, "eval", flags=flags, dont_inherit=True))
            self.display_result(value, count)

    def _run_code(self, code: types.CodeType) -> Any:
        result = eval(code, self.namespace)
        if code.co_flags & 0x80:  # CO_COROUTINE: the cell awaited at top level
            import asyncio

            result = asyncio.run(result)
        return result

    def display_result(self, value: Any, count: int) -> None:
        if value is None:
            return
        data, metadata = mime_bundle(value)
        self.flush()
        self.channel.send({"type": "execute_result", "data": data, "metadata": metadata, "execution_count": count})
        self.out[count] = value
        self.namespace["___"] = self.namespace.get("__")
        self.namespace["__"] = self.namespace.get("_")
        self.namespace["_"] = value
        self.namespace[f"_{count}"] = value

    def show_error(self, exc: BaseException) -> dict[str, Any]:
        self.flush()
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, CellTimeout):
            lines = [f"{_RED}KeyboardInterrupt{_RESET}: the cell was interrupted; the namespace is kept"]
        else:
            frames = traceback.extract_tb(exc.__traceback__)
            # Drop this module's frames: the user's code starts at the first cell frame.
            first = next((i for i, frame in enumerate(frames) if frame.filename.startswith("<cell")), len(frames))
            summary = traceback.StackSummary.from_list(frames[first:])
            lines = []
            if summary:
                lines.append("Traceback (most recent call last):\n" + "".join(summary.format()).rstrip("\n"))
            if isinstance(exc, SyntaxError):
                lines.append("".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n"))
            else:
                lines.append(f"{_RED}{type(exc).__name__}{_RESET}: {exc}")
        error = {"ename": type(exc).__name__, "evalue": str(exc), "traceback": lines}
        self.channel.send({"type": "error", **error})
        return error

    def user_expressions(self, expressions: dict[str, str]) -> dict[str, Any]:
        results = {}
        for key, expression in expressions.items():
            try:
                value = eval(expression, self.namespace)
                data, metadata = mime_bundle(value)
                results[key] = {"status": "ok", "data": data, "metadata": metadata}
            except Exception as err:  # noqa: BLE001 - reported per expression, as IPython does
                results[key] = {"status": "error", "ename": type(err).__name__, "evalue": str(err), "traceback": []}
        return results

    # -- snapshots --------------------------------------------------------------------

    def snapshot(self, count: int, candidates: list[str]) -> int | None:
        """Pickle what may have changed; the host stores the bytes. Returns count if one was sent."""
        ledger = self.ledger
        plan = snapshot.changed_names(
            self.namespace, self._hidden, ledger.ids, ledger.sizes, ledger.digests, candidates
        )
        if plan is None:
            return None
        todo, removed, current, aliases = plan
        previous = {name: ledger.digests[name] for name in todo if name in ledger.digests}
        entries = {}
        try:
            for name, entry, data, buffers in snapshot.pickled(self.namespace, todo, previous, aliases=aliases):
                if data is not None:
                    entry["data"] = base64.b64encode(data).decode("ascii")
                    entry["buffer_data"] = [base64.b64encode(b.raw()).decode("ascii") for b in buffers]
                entries[name] = entry
        except BaseException as err:  # noqa: BLE001 - a failed snapshot is reported, never fatal
            self.channel.send({"type": "snapshot_failed", "execution_count": count, "reason": f"{err!r}"})
            ledger.ids = {}
            return None
        self.channel.send({"type": "snapshot_data", "execution_count": count, "entries": entries, "removed": removed})
        ledger.learn({name: (entry.get("digest"), entry.get("size", 0)) for name, entry in entries.items()}, removed)
        ledger.ids = current
        return count

    def restore(self, entries: dict[str, Any], replace: bool) -> dict[str, Any]:
        if replace:
            clear_for_replace(self.namespace, snapshot.saveable_names(self.namespace, self._hidden), entries)

        def load_one(entry: dict[str, Any]) -> Any:
            data = base64.b64decode(entry["data"]) if "data" in entry else None
            buffers = [base64.b64decode(b) for b in entry.get("buffer_data", [])]
            return snapshot.load_bytes(entry, data, buffers)

        def explain(err: BaseException) -> str:
            if isinstance(err, ModuleNotFoundError):
                return f"needs the module {err.name!r}, which the Wasm sandbox does not have"
            return snapshot.explain_failure(err)

        restored, failed = snapshot.load_all(entries, self.namespace, load_one, merge=not replace, explain=explain)
        self.ledger.restored(entries, restored, self.namespace, replace=replace)
        return {"restored": sorted(restored), "failed": failed}

    # -- requests ---------------------------------------------------------------------

    def request(self, message: dict[str, Any]) -> None:
        reply = self.requests.answer(message)
        self.flush()
        self.channel.send(reply)

    def history_reply(self, args: dict[str, Any]) -> dict[str, Any]:
        n = args.get("n") or len(self.history)
        rows = [[0, count, source] for count, source in self.history[-n:]]
        return {"status": "ok", "history": rows if args.get("hist_access_type") == "tail" else []}

    def store_history(self, args: dict[str, Any]) -> dict[str, Any]:
        self.history.append((int(args["execution_count"]), args["code"]))
        self.execution_count = int(args["execution_count"]) + 1
        return {"status": "ok"}

    def forget_digests(self, args: dict[str, Any]) -> dict[str, Any]:  # noqa: ARG002 - a request handler
        self.ledger.forget()
        return {"status": "ok"}

    # -- loop -------------------------------------------------------------------------

    def serve(self) -> None:
        self.channel.send({"type": "ready", "python": sys.version.split()[0], "pid": 0})
        while True:
            try:
                message = self.channel.receive()
            except Cancelled:
                continue  # an interrupt between cells: nothing to interrupt
            kind = message.get("type")
            if kind in ("shutdown", "eof"):
                return
            if kind == "execute":
                self.execute(message)
            elif kind == "request":
                self.request(message)
            elif kind == "limits":
                self.limits = dict(message.get("limits", {}))


class DisplayHandle:
    """What display(..., display_id=True) returns, as in IPython."""

    def __init__(self, guest: Guest, display_id: str) -> None:
        self._guest = guest
        self.display_id = display_id

    def update(self, value: Any) -> None:
        self._guest.display(value, display_id=self.display_id, update=True)

    def display(self, value: Any) -> None:
        self._guest.display(value, display_id=self.display_id)


GUEST: Guest | None = None


def main() -> None:
    global GUEST
    GUEST = Guest()
    GUEST.serve()
