"""CapsuleKernel: the face the frontends see, on ipykernel's kernelbase. The protocol face only.

One short handler per request, as kernelbase intends. Everything behind them
belongs to the session controller (session/controller.py): the sandboxes,
restore and resume, the cell lifecycle. This process never runs user code:
execution, completion, inspection and history are answered by a sandbox, and
what comes back is checked JSON that is only forwarded.

The operator's options are traitlets here (``--CapsuleKernel.mode=wasm`` in a
kernelspec's argv, ``c.CapsuleKernel.limits = {"memory": "1GB"}`` in a
Jupyter config file); policy.py layers them over capsule.toml and CAPSULE_*.
"""

from __future__ import annotations

import asyncio
import contextvars
import signal
import sys
import time
from typing import Any

from ipykernel.kernelbase import Kernel
from IPython.core.inputtransformer2 import TransformerManager
from traitlets import Bool, CaselessStrEnum, Dict, List, Unicode

from capsule_kernel import __version__
from capsule_kernel.kernel.ipython_profile import profile_for_sandbox
from capsule_kernel.kernel.policy import MODE_ORDER, WIDENABLE, KernelOptions, Policy
from capsule_kernel.kernel.session.controller import Cell, SessionController
from capsule_kernel.kernel.session.relay import header_for_sandbox
from capsule_kernel.kernel.settings import sandbox_ipython_config
from capsule_kernel.protocol import crash_points

_REQUEST_WAIT_SECONDS = 30.0
# Set in the context of a comm message kernelbase dispatches while the main shell is busy.
_CONCURRENT: contextvars.ContextVar[bool] = contextvars.ContextVar("capsule_concurrent_comm", default=False)
# The main shell's cell whose reply execute_request is sending (crash points name it): per request,
# since a subshell's request may begin while the main shell's reply is on its way.
_REPLYING: contextvars.ContextVar[int] = contextvars.ContextVar("capsule_replying", default=-1)
# A subshell's request before any on the main shell (which begins the controller) waits this long for it.
_BEGIN_WAIT_SECONDS = 30.0


class CapsuleKernel(Kernel):
    implementation = "capsule"
    implementation_version = __version__
    banner = (
        f"Capsule {__version__}: every cell runs in a sandbox (Python {sys.version.split()[0]}).\n"
        "%capsule help lists the controls."
    )
    language_info = {
        "name": "python",
        "version": sys.version.split()[0],
        "mimetype": "text/x-python",
        "file_extension": ".py",
        "pygments_lexer": "ipython3",
        "codemirror_mode": {"name": "ipython", "version": 3},
        "nbconvert_exporter": "python",
    }
    help_links = [
        {"text": "Python Reference", "url": "https://docs.python.org/3/"},
        {"text": "IPython Reference", "url": "https://ipython.readthedocs.io/en/stable/"},
        {"text": "Capsule kernel", "url": "https://pypi.org/project/capsule-kernel/"},
    ]

    mode = CaselessStrEnum(
        list(MODE_ORDER), default_value=None, allow_none=True, config=True, help="where cells run (the operator's)"
    )
    lock_mode = Bool(None, allow_none=True, config=True, help="a notebook may not change the routing mode")
    limits = Dict(config=True, help='limits, e.g. {"memory": "1GB", "timeout": "10m"} (the operator\'s ceilings)')
    network = Unicode(
        None, allow_none=True, config=True, help='on, off, or the allowed hosts: "pypi.org,*.example.com" (limits)'
    )
    notebook_may_widen = List(
        Unicode(), default_value=None, allow_none=True, config=True, help=f"what a notebook may widen: {WIDENABLE}"
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._aborted_before_reply: set[str | None] = set()  # shells whose queue is aborted already
        options = KernelOptions(
            mode=self.mode,
            lock_mode=self.lock_mode,
            limits=dict(self.limits) | ({} if self.network is None else {"network": self.network}),
            notebook_may_widen=tuple(self.notebook_may_widen) if self.notebook_may_widen is not None else None,
        )
        self.controller = SessionController(self, Policy.load(options=options))
        # The client's IPython configuration and the user's profile, for the sandbox's shell.
        self.controller.ipython_config = sandbox_ipython_config(self.config)
        startup_dir = getattr(getattr(self.parent, "profile_dir", None), "startup_dir", None)
        shell_app, problems = profile_for_sandbox(self.config, startup_dir)
        self.controller.ipython_config["InteractiveShellApp"] = shell_app
        self.controller.note_profile_problems(problems)
        self._meta: dict[str, dict[str, Any]] = {}  # msg_id -> the execute reply's capsule metadata
        self._completeness = TransformerManager()
        for msg_type in ("comm_open", "comm_msg", "comm_close"):
            self.shell_handlers[msg_type] = self._forward_comm

    # -- start-up and signals ----------------------------------------------------------

    def start(self) -> None:
        super().start()
        # In signal interrupt mode Jupyter sends SIGINT to this process: pass it
        # on to the cell instead of raising KeyboardInterrupt in the kernel.
        signal.signal(signal.SIGINT, lambda *_: self.controller.interrupt())

    async def dispatch_shell(self, msg: Any, /, *args: Any, **kwargs: Any) -> None:
        """Every main shell request runs on the shell's loop: the controller begins there, at the first one.

        Frontends ask kernel_info first thing, so the sandbox starts then. It
        must not begin from a timer on the main IOLoop: ipykernel runs shell
        handlers on another loop, and a sandbox started on the wrong one made
        the first cell after JupyterLab's Restart fail with "attached to a
        different loop" whenever the browser's kernel_info came late. A
        subshell's requests run on its own thread and loop; their handlers
        hop to the controller's (_in_controller).
        """
        if kwargs.get("subshell_id") is None:
            await self.controller.begin()
        if kwargs.get("concurrent"):
            _CONCURRENT.set(True)  # in the comm's own context copy (kernelbase.shell_main)
        await super().dispatch_shell(msg, *args, **kwargs)

    def _subshell_id(self) -> str | None:
        """The subshell the request being handled was sent to (None: the main shell)."""
        return self.get_parent("shell").get("header", {}).get("subshell_id")

    async def _in_controller(self, coroutine: Any) -> Any:
        """Await a controller coroutine on the controller's loop, from whichever loop this handler runs on."""
        loop = self.controller.loop
        waited = 0.0
        while loop is None and waited < _BEGIN_WAIT_SECONDS:
            await asyncio.sleep(0.05)  # a subshell's request before the main shell's first one
            waited += 0.05
            loop = self.controller.loop
        if loop is None:
            coroutine.close()
            raise RuntimeError("the kernel has not started its sandbox yet: send a request on the main shell first")
        if loop is asyncio.get_running_loop():
            return await coroutine
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, loop))

    def pre_handler_hook(self) -> None:
        """kernelbase would make SIGINT raise here; ours is forwarded instead."""

    def post_handler_hook(self) -> None:
        """See pre_handler_hook."""

    # -- execution count ---------------------------------------------------------------

    @property
    def execution_count(self) -> int:
        """The number the next stored cell gets; the sandbox's IPython agrees."""
        return self.controller.next_count

    @execution_count.setter
    def execution_count(self, value: int) -> None:
        """kernelbase increments for every non-silent cell; we count like IPython."""

    # -- execute -----------------------------------------------------------------------

    async def do_execute(
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict[str, str] | None = None,
        allow_stdin: bool = False,
        *,
        cell_meta: dict[str, Any] | None = None,  # noqa: ARG002
        cell_id: str | None = None,  # noqa: ARG002
    ) -> dict[str, Any]:
        started = time.perf_counter()
        subshell_id = self._subshell_id()
        if subshell_id is not None:
            reply = await self._execute_on_subshell(subshell_id, code, silent, user_expressions or {}, started)
        else:
            reply = await self._execute_on_main(code, silent, store_history, user_expressions, allow_stdin, started)
        if reply.get("status") == "error" and not silent:
            await self._abort_queued_before_reply(subshell_id)
        return reply

    async def _execute_on_main(
        self, code: str, silent: bool, store_history: bool, user_expressions: dict[str, str] | None,
        allow_stdin: bool, started: float,
    ) -> dict[str, Any]:  # fmt: skip
        controller = self.controller
        # Comm messages that came while the last cell ran are handled first, each under its own message;
        # the lane keeps the others from changing whose outputs these are until the cell has ended.
        relay = controller.relay
        await relay.deliver_held_comms()
        async with relay.lane:
            relay.parent = self.get_parent("shell")
            # Side tasks run outside this handler's context: remember who asked.
            relay.stdin_ident = self._get_shell_context_var(self._shell_parent_ident)
            count = controller.next_count
            cell = Cell(
                code, silent, store_history, user_expressions or {}, allow_stdin, count,
                parent_header=header_for_sandbox(relay.parent),
            )  # fmt: skip
            try:
                reply, meta = await controller.execute(cell)
            except Exception as err:
                self.log.exception("capsule kernel error while executing a cell")
                reply = relay.fail(count, "CapsuleKernelError", f"internal error in the capsule kernel: {err!r}")
                meta = {"sandbox": "kernel", "mode": "error", "reason": "internal error"}
        if relay.held_comms:
            # Those that came during the cell: now, even if no other request comes.
            controller.side_task(relay.deliver_held_comms(), cell_scoped=False)
        if not silent and store_history:
            controller.next_count = count + 1
        else:
            reply["execution_count"] = count - 1  # as IPython answers: the last stored cell's number
        meta["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
        self._meta[self.get_parent("shell")["header"].get("msg_id")] = meta
        crash_points.reach("kernel.before_reply", count)
        _REPLYING.set(count)  # seen by execute_request, which awaited this in the same context
        return reply

    async def _abort_queued_before_reply(self, subshell_id: str | None) -> None:
        """Abort the requests queued behind a failed cell, before its reply goes out, not after.

        kernelbase sends the error reply and only then marks the queue aborting and
        posts, from the shell channel thread, the marker that ends the aborting. A
        client that answers the reply at once (an agent, a CI retry) can get its next
        request in ahead of that marker, and it is aborted though it was sent after
        the error was known. Here the marker is in the queue before the reply is sent:
        what was queued behind the failed cell is aborted, what comes after its reply runs.
        """
        if not self.shell_channel_thread or not self.get_parent("shell").get("content", {}).get("stop_on_error", True):
            return
        super()._abort_queues(subshell_id)
        loop = asyncio.get_running_loop()
        posted = loop.create_future()
        # The shell channel thread runs its callbacks in order: this one runs after the marker is posted.
        self.shell_channel_thread.io_loop.add_callback(
            lambda: loop.call_soon_threadsafe(lambda: posted.done() or posted.set_result(None))
        )
        await posted
        self._aborted_before_reply.add(subshell_id)

    def _abort_queues(self, subshell_id: str | None = None) -> None:
        """kernelbase calls this after an error reply; a no-op when it was done before the reply."""
        if subshell_id in self._aborted_before_reply:
            self._aborted_before_reply.discard(subshell_id)
            return
        super()._abort_queues(subshell_id)

    async def execute_request(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        """kernelbase's, which sends the reply; then the crash point just after it (protocol/crash_points.py)."""
        replying = _REPLYING.set(-1)
        try:
            await super().execute_request(stream, ident, parent)
            crash_points.reach("kernel.after_reply", _REPLYING.get())
        finally:
            _REPLYING.reset(replying)

    async def _execute_on_subshell(
        self, subshell_id: str, code: str, silent: bool, expressions: dict[str, str], started: float
    ) -> dict[str, Any]:
        """A cell sent to a subshell (JEP 91): it runs beside the main shell's, in the same namespace."""
        parent = self.get_parent("shell")
        subshells = self.controller.subshells
        try:
            reply = await self._in_controller(subshells.execute(subshell_id, parent, code, silent, expressions))
        except Exception as err:
            self.log.exception("capsule kernel error while executing a subshell's cell")
            reply = {"status": "error", "execution_count": subshells.next_count(subshell_id) - 1,
                     "user_expressions": {}, "payload": [], "ename": "CapsuleKernelError",
                     "evalue": f"internal error in the capsule kernel: {err!r}", "traceback": []}  # fmt: skip
        meta = {"sandbox": "subprocess", "mode": "subshell", "reason": "sent to a subshell",
                "duration_ms": round((time.perf_counter() - started) * 1000, 3)}  # fmt: skip
        self._meta[parent["header"].get("msg_id")] = meta
        return reply

    def _publish_execute_input(self, code: str, parent: dict[str, Any], execution_count: int) -> None:
        """A subshell's cells are numbered on their own (JEP 91)."""
        subshell_id = parent.get("header", {}).get("subshell_id")
        if subshell_id is not None:
            execution_count = self.controller.subshells.next_count(subshell_id)
        super()._publish_execute_input(code, parent, execution_count)

    def finish_metadata(
        self,
        parent: dict[str, Any],
        metadata: dict[str, Any],
        reply_content: dict[str, Any],
    ) -> dict[str, Any]:
        metadata["status"] = reply_content.get("status")
        # Per request: a subshell's cell ends while the main shell's runs.
        metadata["capsule"] = self._meta.pop(parent["header"].get("msg_id"), {})
        return metadata

    # -- comms from the frontend -------------------------------------------------------

    async def _forward_comm(self, stream: Any, ident: Any, msg: dict[str, Any]) -> None:  # noqa: ARG002
        """A frontend's comm message: to the sandbox, on its subshell or between the main shell's cells.

        One that kernelbase dispatches beside a running handler (the main
        shell is busy) is only handed over: kernelbase puts back the parent it
        saw when the message came once this returns, and a long wait here would
        put it back over the next request's (whose idle status then never
        reaches the frontend under its own parent).
        """
        subshell_id = msg["header"].get("subshell_id")
        if subshell_id is None and _CONCURRENT.get():
            self.controller.side_task(self.controller.relay.forward_comm(msg), cell_scoped=False)
        elif subshell_id is None:
            await self.controller.relay.forward_comm(msg)
        else:
            await self._in_controller(self.controller.subshells.forward_comm(subshell_id, msg))

    async def comm_info_request(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        assert self.session is not None
        target = parent["content"].get("target_name")
        comms = self.controller.relay.comms
        listed = {cid: {"target_name": name} for cid, name in comms.items() if target in (None, name)}
        self.session.send(stream, "comm_info_reply", {"status": "ok", "comms": listed}, parent, ident)

    # -- introspection (answered by the sandbox) ---------------------------------------

    async def do_complete(self, code: str, cursor_pos: int | None) -> dict[str, Any]:
        cursor = len(code) if cursor_pos is None else cursor_pos
        fallback = {"status": "ok", "matches": [], "cursor_start": cursor, "cursor_end": cursor, "metadata": {}}
        args = {"code": code, "cursor_pos": cursor}
        return await self._ask("complete", args, fallback)

    async def _ask(self, kind: str, args: dict[str, Any], fallback: dict[str, Any]) -> dict[str, Any]:
        """A request the sandbox answers; on a subshell, that subshell's thread answers it at once."""
        subshell_id = self._subshell_id()
        if subshell_id is None:
            return await self.controller.ask(kind, args, fallback, _REQUEST_WAIT_SECONDS)
        ask = self.controller.subshells.ask(subshell_id, kind, args, fallback, _REQUEST_WAIT_SECONDS)
        return await self._in_controller(ask)

    async def do_inspect(
        self, code: str, cursor_pos: int, detail_level: int = 0, omit_sections: Any = ()
    ) -> dict[str, Any]:
        args = {
            "code": code,
            "cursor_pos": cursor_pos,
            "detail_level": detail_level,
            "omit_sections": list(omit_sections),
        }
        fallback = {"status": "ok", "data": {}, "metadata": {}, "found": False}
        return await self._ask("inspect", args, fallback)

    async def do_history(
        self,
        hist_access_type: str,
        output: bool,
        raw: bool,
        session: int | None = None,
        start: int | None = None,
        stop: int | None = None,
        n: int | None = None,
        pattern: str | None = None,
        unique: bool = False,
    ) -> dict[str, Any]:
        args = {
            "hist_access_type": hist_access_type,
            "output": output,
            "raw": raw,
            "session": session or 0,
            "start": start or 0,
            "stop": stop,
            "n": n,
            "pattern": pattern,
            "unique": unique,
        }
        return await self._ask("history", args, {"status": "ok", "history": []})

    async def do_is_complete(self, code: str) -> dict[str, Any]:
        # Parsing only: safe to do here, and answers even while a cell runs.
        status, indent = self._completeness.check_complete(code)
        reply: dict[str, Any] = {"status": status}
        if status == "incomplete":
            reply["indent"] = " " * (indent or 0)
        return reply

    # -- control -----------------------------------------------------------------------

    async def interrupt_request(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        assert self.session is not None
        self.controller.interrupt()
        self.session.send(stream, "interrupt_reply", {"status": "ok"}, parent, ident=ident)

    async def shutdown_request(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        """kernelbase's shutdown, but the loops stop after this message is done.

        kernelbase stops the shell loop while the control thread is still
        flushing after the handler; the main thread then closes the iopub
        thread under it and the control thread can block for ever on a send
        (the frontend then kills the kernel after its timeout). Stopping the
        loops from a callback on the control loop runs after that flush.
        """
        assert self.session is not None
        content = await self.do_shutdown(parent["content"]["restart"])
        self.session.send(stream, "shutdown_reply", content, parent, ident=ident)
        self._shutdown_message = self.session.msg("shutdown_reply", content, parent)
        await self._at_shutdown()
        control_loop = self.control_stream.io_loop if self.control_stream else None
        shell_loop = self.shell_stream.io_loop if self.shell_stream else None

        def stop_loops() -> None:
            for loop in {shell_loop, self.io_loop} - {None}:
                loop.add_callback(loop.stop)
            if control_loop is not None:
                control_loop.stop()

        if control_loop is not None:
            control_loop.add_callback(stop_loops)
        else:
            stop_loops()

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        # Called on the control thread; the sandboxes live on the shell loop.
        loop = self.controller.loop
        if loop is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self.controller.stop(restart=restart), loop)
            try:
                await asyncio.wait_for(asyncio.wrap_future(future), timeout=10)
            except (TimeoutError, Exception):
                self.log.exception("sandbox did not stop cleanly; killing it")
                self.controller.kill_all()
        else:
            self.controller.kill_all()
        return {"status": "ok", "restart": restart}

    async def do_debug_request(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "response",
            "request_seq": msg.get("seq", 0),
            "success": False,
            "command": msg.get("command", ""),
            "message": "the capsule kernel does not support the debugger",
        }

    @property
    def kernel_info(self) -> dict[str, Any]:
        info = super().kernel_info
        # No debugger; kernel subshells, as ipykernel's (session/subshells.py).
        info["supported_features"] = [f for f in info.get("supported_features", []) if f != "debugger"]
        return info

    # -- subshells (JEP 91): kernelbase creates and deletes them; the sandbox follows ---------

    async def create_subshell_request(self, socket: Any, ident: Any, parent: dict[str, Any]) -> None:
        manager = self.shell_channel_thread.manager
        before = set(manager.list_subshell())
        await super().create_subshell_request(socket, ident, parent)
        for subshell_id in set(manager.list_subshell()) - before:
            self._tell_controller(self.controller.subshells.created, subshell_id)

    async def delete_subshell_request(self, socket: Any, ident: Any, parent: dict[str, Any]) -> None:
        await super().delete_subshell_request(socket, ident, parent)
        subshell_id = parent.get("content", {}).get("subshell_id")
        if isinstance(subshell_id, str):
            self._tell_controller(self.controller.subshells.deleted, subshell_id)

    def _tell_controller(self, method: Any, *args: Any) -> None:
        """Run a controller coroutine on its loop, from the control thread, without waiting for it."""
        loop = self.controller.loop
        if loop is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(method(*args), loop)
