"""What a sandbox says, relayed to the frontend: outputs, comms, input() and in-cell %capsule lines.

Every event has already passed the frame vocabulary (sandbox/frames.py);
here each kind has one handler (a table, not a ladder), and what leaves for
iopub is rebuilt from the checked fields only. A %capsule line that comes
from inside a sandbox (IPython's relay, ``run_line_magic``, the Wasm guest)
is a request from untrusted code: it may run read-only subcommands, and a
privileged one only if it is a line the kernel itself parsed out of the
cell's source (magics.authority).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

import zmq

from capsule_kernel.kernel import magics
from capsule_kernel.kernel.magics.context import MagicContext
from capsule_kernel.kernel.sandbox.process import SandboxDied
from capsule_kernel.protocol import frames

if TYPE_CHECKING:
    from capsule_kernel.kernel.magics.authority import Authority

_INPUT_POLL_SECONDS = 0.01
# How long a comm message's callbacks may run before the kernel goes on with the next request.
_COMM_SETTLE_SECONDS = 60.0
# What a task's sandbox may show in its cell (no comms, stdin or %capsule: a task has none).
_TASK_OUTPUTS = frozenset({"stream", "display", "clear_output", "execute_result", "error"})
_RED = "\x1b[0;31m"
_RESET = "\x1b[0m"

# Comms a sandbox may hold open at once (widgets: one or a few per widget), and the longest id or
# target name kept for each: the kernel's table of open comms is bounded whatever a sandbox sends.
MAX_OPEN_COMMS = 10_000
MAX_COMM_ID = 256


def header_for_sandbox(msg: dict[str, Any]) -> dict[str, str]:
    """The header of the request being served, as the sandbox's get_parent() gives it (JSON, no key).

    Libraries file output by it (the ipywidgets Output widget captures the
    messages whose parent has this msg_id); it carries nothing secret.
    """
    return {str(key): str(value) for key, value in (msg.get("header") or {}).items()}


def error_content(ename: str, evalue: str) -> dict[str, Any]:
    return {"ename": ename, "evalue": evalue, "traceback": [f"{_RED}{ename}{_RESET}: {evalue}"]}


# What a reply may say of itself; everything else in it is rebuilt by the kernel.
_REPLY_STATUSES = ("ok", "error", "aborted")


def sanitized_reply(reply: dict[str, Any], count: int) -> dict[str, Any]:
    """A sandbox's reply, with what the kernel owns (the count, the status vocabulary) set by the kernel."""
    status = reply.get("status") if reply.get("status") in _REPLY_STATUSES else "error"
    clean = {key: value for key, value in reply.items() if isinstance(key, str)}
    clean.update(status=status, execution_count=count)
    clean.setdefault("user_expressions", {})
    clean.setdefault("payload", [])
    if not isinstance(clean["payload"], list) or not isinstance(clean["user_expressions"], dict):
        clean.update(payload=[], user_expressions={})
    if status == "error":
        clean.setdefault("ename", "Error")
        clean.setdefault("evalue", "")
        clean.setdefault("traceback", [])
    return clean


class RelayOwner(MagicContext, Protocol):
    """What the relay asks of the session that owns it (SessionController implements it).

    Named here, so the relay never imports the controller that imports it.
    """

    authority: Authority
    subshells: Any  # subshells.Subshells: count_of / parent_of
    cell_running: bool

    def side_task(self, coroutine: Coroutine[Any, Any, Any], *, cell_scoped: bool) -> None: ...
    async def sandbox_started(self) -> None: ...


class Relay:
    """The kernel's iopub and stdin, as the session controller and its sandboxes use them."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel  # the protocol face: session, sockets, parent headers
        self.parent: dict[str, Any] = {}
        self.stdin_ident: Any = b""
        self.outputs: Counter[str] = Counter()
        self.comms: dict[str, str] = {}
        self._comms_full_said = False
        self._prompting = False  # an input_request is open on the frontend's stdin channel
        self.controller: RelayOwner | None = None
        self._uncounted = False  # publishing a subshell's output: not the main cell's
        self._lane: asyncio.Lock | None = None  # made on the controller's loop, when first needed
        self.held_comms: list[dict[str, Any]] = []
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "stream": lambda e: self.publish("stream", {"name": e["name"], "text": e["text"]}),
            "display": self._display,
            "clear_output": lambda e: self.publish("clear_output", {"wait": e["wait"]}),
            # transient: a display id, so that update_display_data can replace the result later.
            "execute_result": lambda e: self.publish(
                "execute_result", {k: e[k] for k in ("data", "metadata", "execution_count", "transient") if k in e}
            ),
            "error": lambda e: self.publish("error", {k: e[k] for k in ("ename", "evalue", "traceback")}),
            "comm": self._comm,
            "input_request": self._input_request,
            "magic": lambda e: self._side(self._answer_magic(e)),
            "task": lambda e: self._side(self._answer_task(e)),
        }

    # -- to the frontend -----------------------------------------------------------------

    def publish(self, msg_type: str, content: dict[str, Any], **extra: Any) -> None:
        self.publish_for(msg_type, content, self.parent, **extra)

    def publish_for(self, msg_type: str, content: dict[str, Any], parent: dict[str, Any], **extra: Any) -> None:
        """Publish under a given parent (a background task's output belongs to the cell that started it)."""
        kernel = self.kernel
        if parent is self.parent and not self._uncounted:
            self.outputs[msg_type] += 1
        kernel.session.send(kernel.iopub_socket, msg_type, content, parent, ident=kernel._topic(msg_type), **extra)

    def note(self, text: str) -> None:
        """A warning from Capsule (stderr: frontends show it as one)."""
        self.publish("stream", {"name": "stderr", "text": text})

    def info(self, text: str) -> None:
        """News from Capsule that is not a problem (stdout: shown as plain output, not as a warning)."""
        self.publish("stream", {"name": "stdout", "text": text})

    def fail(self, count: int, ename: str, evalue: str, parent: dict[str, Any] | None = None) -> dict[str, Any]:
        """Publish an error output (under the cell's parent, or the one given) and build the matching reply."""
        content = error_content(ename, evalue)
        self.publish_for("error", content, self.parent if parent is None else parent)
        return {"status": "error", "execution_count": count, "user_expressions": {}, "payload": [], **content}

    def show(self, bundles: list[dict[str, str]]) -> None:
        for bundle in bundles:
            self.publish("display_data", {"data": bundle, "metadata": {}, "transient": {}})

    # -- from a sandbox ------------------------------------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        tag = event.get("subshell")
        if tag is None:
            self._handlers[event["type"]](event)
            return
        # A subshell's output (its number checked by the sandbox's reader): filed under the request it
        # serves, numbered with its own count, and not counted among the main cell's outputs.
        assert self.controller is not None
        subshells = self.controller.subshells
        if event["type"] == "execute_result":
            event = {**event, "execution_count": subshells.count_of(tag)}
        saved, self.parent, self._uncounted = self.parent, subshells.parent_of(tag), True
        try:
            self._handlers[event["type"]](event)
        finally:
            self.parent, self._uncounted = saved, False

    def on_event_for(self, event: dict[str, Any], parent: dict[str, Any]) -> None:
        """An output event of a task's sandbox, shown in the cell that ran the task (outputs only)."""
        if event["type"] in _TASK_OUTPUTS:
            saved, self.parent = self.parent, parent
            try:
                self._handlers[event["type"]](event)
            finally:
                self.parent = saved

    def _display(self, event: dict[str, Any]) -> None:
        msg_type = "update_display_data" if event.get("update") else "display_data"
        self.publish(msg_type, {"data": event["data"], "metadata": event["metadata"], "transient": event["transient"]})

    def _comm(self, event: dict[str, Any]) -> None:
        msg_type, content = event["msg_type"], event["content"]
        if msg_type not in ("comm_open", "comm_msg", "comm_close"):
            return
        if msg_type == "comm_open":
            comm_id = str(content.get("comm_id"))[:MAX_COMM_ID]
            if comm_id not in self.comms and len(self.comms) >= MAX_OPEN_COMMS:
                # The kernel remembers every open comm (to reopen after a restart): a bounded table.
                if not self._comms_full_said:
                    self._comms_full_said = True
                    self.note(f"Capsule: {MAX_OPEN_COMMS} comms are open; this sandbox's next comm_open is dropped\n")
                return
            self.comms[comm_id] = str(content.get("target_name", ""))[:MAX_COMM_ID]
        elif msg_type == "comm_close":
            self.comms.pop(str(content.get("comm_id"))[:MAX_COMM_ID], None)
        try:
            buffers = frames.unpack_buffers(event.get("buffers"))
        except frames.ProtocolError:
            return
        self.publish(msg_type, content, metadata=event.get("metadata"), buffers=buffers)

    def _side(self, coroutine: Any) -> None:
        assert self.controller is not None
        self.controller.side_task(coroutine, cell_scoped=True)

    def _input_request(self, event: dict[str, Any]) -> None:
        """One prompt at a time, as input() blocks its thread: a sandbox's flood of requests is dropped."""
        if self._prompting:
            # Answered at once with an empty line (no thread waits forever); nothing more is queued.
            self.kernel.log.warning("an input_request while a prompt is open: answered with an empty line")
            sandbox = self.controller.sandbox if self.controller is not None else None
            if sandbox is not None:
                with contextlib.suppress(SandboxDied):
                    sandbox.send({"type": "input_reply", "id": event["id"], "value": ""})
            return
        self._prompting = True
        self._side(self._answer_input(event))

    async def _answer_input(self, event: dict[str, Any]) -> None:
        try:
            await self._prompt(event)
        finally:
            self._prompting = False

    async def _prompt(self, event: dict[str, Any]) -> None:
        """Relay input()/getpass from the sandbox to the frontend's stdin channel."""
        kernel = self.kernel
        assert self.controller is not None
        sandbox = self.controller.sandbox
        socket = kernel.stdin_socket
        while True:  # purge stale replies
            try:
                socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
        content = {"prompt": event["prompt"], "password": event["password"]}
        kernel.session.send(socket, "input_request", content, self.parent, ident=self.stdin_ident)
        while True:
            if socket.poll(0):
                _, reply = kernel.session.recv(socket, zmq.NOBLOCK)
                if reply is not None:
                    break
            await asyncio.sleep(_INPUT_POLL_SECONDS)
        value = reply.get("content", {}).get("value", "")
        if sandbox is not None:
            with contextlib.suppress(SandboxDied):
                sandbox.send({"type": "input_reply", "id": event["id"], "value": str(value)})

    async def _answer_magic(self, event: dict[str, Any]) -> None:
        """A %capsule line from inside a cell: read-only, or a line of the cell's own source."""
        controller = self.controller
        assert controller is not None
        sandbox = controller.sandbox
        answer: dict[str, Any] = {"type": "magic_reply", "id": event["id"], "ok": True}
        try:
            if event.get("cell") is not None:
                raise magics.MagicUsageError(f"%%capsule {event['line']}: this subcommand takes no cell body")
            args = controller.authority.from_sandbox(event["line"])
            if args is not None:
                self.show(await magics.run_parsed(controller, args))
        except magics.MagicHelp as help_text:
            self.show([{"text/plain": str(help_text)}])
        except magics.MagicUsageError as err:
            answer.update(ok=False, error=str(err))
        if sandbox is not None:
            with contextlib.suppress(SandboxDied):
                sandbox.send(answer)

    async def _answer_task(self, event: dict[str, Any]) -> None:
        """A @task call from inside a cell: a request from untrusted code, checked by the scheduler."""
        controller = self.controller
        assert controller is not None
        sandbox = controller.sandbox
        if sandbox is None:
            return
        content = await controller.tasks.answer(event["action"], event["args"], sandbox.kind)
        with contextlib.suppress(SandboxDied):
            sandbox.send({"type": "task_reply", "id": event["id"], "content": content})

    # -- from the frontend ---------------------------------------------------------------

    async def forward_comm(self, msg: dict[str, Any], *, sandbox: Any = None, subshell: int | None = None) -> None:
        """A comm message from the frontend, to the sandbox that holds the comms.

        One sent on a subshell (JupyterLab sends widget messages so) is
        handled on that subshell's thread in the sandbox at once, even while a
        cell runs. One on the main shell is handled between cells, as a
        blocking cell makes ipykernel handle it: it waits for the cell to end
        (``held_comms``), and cells wait for it (``lane``), so each one's
        callbacks print under its own message, never under a cell's. One that
        arrives while the sandbox is starting (a frontend opens the widget
        control comm as soon as it connects) waits for it.
        """
        controller = self.controller
        assert controller is not None
        if subshell is not None:
            await self._deliver_comm(msg, sandbox or controller.sandbox, subshell)
            return
        self.held_comms.append(msg)
        if not controller.cell_running:
            await self.deliver_held_comms()

    async def deliver_held_comms(self) -> None:
        """The main shell's comm messages not handled yet, in the order they came, between cells."""
        controller = self.controller
        assert controller is not None
        async with self.lane:
            while self.held_comms:
                msg = self.held_comms.pop(0)
                self.parent = msg
                await controller.sandbox_started()
                await self._deliver_comm(msg, controller.sandbox, None)

    @property
    def lane(self) -> asyncio.Lock:
        """Held by a main-shell comm message while the sandbox handles it, and by a cell until it is running."""
        if self._lane is None:
            self._lane = asyncio.Lock()
        return self._lane

    async def _deliver_comm(self, msg: dict[str, Any], sandbox: Any, subshell: int | None) -> None:
        """Send one comm message to the sandbox and wait until its callbacks ran (or refuse it)."""
        msg_type = msg["header"]["msg_type"]
        content = msg["content"]
        comm_id = str(content.get("comm_id"))
        if sandbox is None or not sandbox.alive:
            # Refused as ipykernel refuses an unknown target: a comm_open is answered with its
            # comm_close, so the frontend does not wait for an answer that never comes.
            self.kernel.log.warning("refusing %s: the sandbox is not running", msg_type)
            if msg_type == "comm_open":
                self.publish_for("comm_close", {"comm_id": comm_id, "data": {}}, msg)
            return
        if msg_type == "comm_open":
            self.comms[comm_id] = str(content.get("target_name", ""))
        elif msg_type == "comm_close":
            self.comms.pop(comm_id, None)
        buffers = [bytes(b) for b in msg.get("buffers") or []]
        frame = {
            "type": "comm",
            "msg_type": msg_type,
            "content": content,
            "metadata": msg.get("metadata", {}),
            "buffers": frames.pack_buffers(buffers),
            "parent_header": header_for_sandbox(msg),  # the request the sandbox now serves
        }
        if subshell is not None:
            frame["subshell"] = subshell
        with contextlib.suppress(SandboxDied):
            sandbox.send(frame)
            # As ipykernel, the message is done (and idle published) once its callbacks ran: what they
            # print belongs to it, not to the request that comes next, and a frontend that waits for
            # idle before its next update (ipywidgets' throttle) waits for the sandbox.
            with contextlib.suppress(TimeoutError):
                await sandbox.request("settled", {}, timeout=_COMM_SETTLE_SECONDS, subshell=subshell)
