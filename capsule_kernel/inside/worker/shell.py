"""IPython inside the subprocess sandbox, wired to the frame protocol.

Runs INSIDE the sandbox. Users keep what IPython gives them (magics, display
formatters, matplotlib inline, rich tracebacks, top-level await); every place
where stock ipykernel would talk ZeroMQ sends a data-only frame instead.
"""

from __future__ import annotations

import builtins
import errno
import getpass
import itertools
import os
import sys
import threading
import traceback
from types import TracebackType
from typing import Any

from comm.base_comm import BaseComm, CommManager
from ipykernel.compiler import XCachingCompiler
from ipykernel.jsonutil import encode_images, json_clean
from ipykernel.zmqshell import ZMQInteractiveShell
from IPython.core.displayhook import DisplayHook
from IPython.core.displaypub import DisplayPublisher
from IPython.core.error import StdinNotImplementedError, UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from traitlets import Any as AnyTrait
from traitlets import Type

from capsule_kernel.inside.worker.channel import FrameChannel, StreamFlusher, current_subshell
from capsule_kernel.inside.worker.facade import KernelFacade, parent_request
from capsule_kernel.protocol import frames
from capsule_kernel.protocol.limits import format_size


class SandboxDisplayPublisher(DisplayPublisher):
    """display(), update_display() and clear_output() as frames."""

    channel = AnyTrait()
    flusher = AnyTrait()

    def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs) -> None:  # noqa: ANN001, ARG002
        self.flusher.flush_all()
        self.channel.send(
            {
                "type": "display",
                "data": json_clean(encode_images(data)),
                "metadata": json_clean(metadata or {}),
                "transient": json_clean(transient or {}),
                "update": bool(update),
            }
        )

    def clear_output(self, wait: bool = False) -> None:
        self.flusher.flush_all()
        self.channel.send({"type": "clear_output", "wait": bool(wait)})


class SandboxDisplayHook(DisplayHook):
    """The value of a cell's last expression, sent as execute_result (one in the making per thread: subshells)."""

    channel = AnyTrait()
    flusher = AnyTrait()
    _local = AnyTrait()

    @property
    def _result(self) -> dict[str, Any]:
        if self._local is None:
            self._local = threading.local()
        return getattr(self._local, "result", {})

    @_result.setter
    def _result(self, value: dict[str, Any]) -> None:
        if self._local is None:
            self._local = threading.local()
        self._local.result = value

    def start_displayhook(self) -> None:
        self._result: dict[str, Any] = {"data": {}, "metadata": {}}

    def write_output_prompt(self) -> None:
        self._result["execution_count"] = self.prompt_count

    def write_format_data(self, format_dict, md_dict=None) -> None:  # noqa: ANN001
        self._result["data"] = json_clean(encode_images(format_dict))
        self._result["metadata"] = json_clean(md_dict or {})

    def finish_displayhook(self) -> None:
        self.flusher.flush_all()
        if self._result.get("data"):
            self.channel.send({"type": "execute_result", **self._result})
        self._result = {}


class SandboxComm(BaseComm):
    """A comm whose messages travel to the kernel as frames (ipywidgets uses this)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled from a checkpoint: dead until revive_comms reconnects or reopens it."""
        self.__dict__.update(state)
        _RESTORED_COMMS.append(self)

    def publish_msg(self, msg_type: str, data=None, metadata=None, buffers=None, **keys: Any) -> None:  # noqa: ANN001
        content = json_clean(dict(data=data, comm_id=self.comm_id, **keys))
        channel = _current_channel()
        channel.send(
            {
                "type": "comm",
                "msg_type": msg_type,
                "content": content,
                "metadata": json_clean(metadata or {}),
                "buffers": frames.pack_buffers(buffers),
            }
        )


_CHANNEL: FrameChannel | None = None
_COMM_MANAGER: CommManager | None = None
_RESTORED_COMMS: list[SandboxComm] = []


def _is_widget(value: Any) -> bool:
    widgets = sys.modules.get("ipywidgets")
    return widgets is not None and isinstance(value, widgets.Widget)


def _child_widgets(widget: Any) -> list[Any]:
    """The widgets a widget's state refers to (a box's children, a link's source...)."""
    found: list[Any] = []
    for key in getattr(widget, "keys", []):
        value = getattr(widget, key, None)
        values = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else [value]
        found.extend(item for item in values if _is_widget(item))
    return found


def keep_observers_in_checkpoints() -> None:
    """Pickled traitlets objects (widgets) keep the callbacks registered on them with `.observe()`.

    traitlets drops an instance's observers when it is pickled (the class's
    @observe handlers come back by themselves), so a widget restored after a
    crash would look alive and never call the notebook's callbacks. Here the
    instance's own observers are pickled with it; if one cannot be, the
    widget is listed as not saved, with the reason, instead of coming back
    silently deaf.
    """
    from traitlets import HasTraits
    from traitlets.traitlets import EventHandler

    plain_getstate = HasTraits.__getstate__

    def getstate(self: HasTraits) -> dict[str, Any]:
        state = plain_getstate(self)
        kept: dict[str, dict[str, list[Any]]] = {}
        for name, by_type in self._trait_notifiers.items():
            for kind, handlers in by_type.items():
                own = [handler for handler in handlers if not isinstance(handler, EventHandler)]
                if own:
                    kept.setdefault(name, {})[kind] = own
        state["_trait_notifiers"] = kept
        return state

    HasTraits.__getstate__ = getstate  # type: ignore[method-assign]


def _one_widget_per_model(comms: list[SandboxComm], named: list[Any]) -> dict[str, Any]:
    """One restored widget per model id, and every restored widget's references pointing at it.

    Each name is pickled on its own, so `box = VBox([slider])` comes back
    with a copy of `slider` inside it: two objects for one model on the
    page. The copy bound to a name wins; references held in the other
    widgets' traits (a box's children) are pointed at it, without a message
    to the frontend (the model ids do not change).
    """
    owners = [getattr(c._msg_callback, "__self__", None) for c in comms]
    widgets = [owner for owner in owners if _is_widget(owner)]
    bound = {id(value) for value in named}
    canonical: dict[str, Any] = {}
    for widget in widgets:
        model = widget._model_id
        if model not in canonical or (id(widget) in bound and id(canonical[model]) not in bound):
            canonical[model] = widget

    def same(value: Any) -> Any:
        if _is_widget(value) and value._model_id in canonical:
            return canonical[value._model_id]
        if isinstance(value, list | tuple):
            return type(value)(same(item) for item in value)
        if isinstance(value, dict):
            return {key: same(item) for key, item in value.items()}
        return value

    for widget in widgets:
        for key in getattr(widget, "keys", []):
            if key in widget._trait_values:
                widget._trait_values[key] = same(widget._trait_values[key])
    return canonical


def revive_comms(open_at_frontend: set[str], namespace: dict[str, Any], names: list[str]) -> dict[str, list[str]]:
    """Make the comms a restore brought back work again; name the widgets by what holds them.

    A comm the frontend still has open (this kernel's sandbox died and was
    replaced: the page kept its widget models) is registered again under its
    id, so the views on the page drive the restored widget and see its
    changes. A widget the frontend does not know (resumed in a new kernel)
    is opened again under its old id, children before the boxes that hold
    them; its old views belonged to the earlier kernel, so it must be
    displayed again. Any other comm of an earlier kernel stays closed.
    """
    comms, _RESTORED_COMMS[:] = list(_RESTORED_COMMS), []
    manager = _get_comm_manager()
    reconnected: set[str] = set()
    to_reopen: dict[str, Any] = {}
    canonical = _one_widget_per_model(comms, [namespace[name] for name in names if name in namespace])
    for restored in comms:
        owner = getattr(restored._msg_callback, "__self__", None)
        if restored._closed or (_is_widget(owner) and canonical.get(restored.comm_id) is not owner):
            continue
        if restored.comm_id in open_at_frontend:
            manager.register_comm(restored)
            if _is_widget(owner):
                owner.comm = None
                owner.comm = restored  # hooks its messages and lists it among the live widgets again
            reconnected.add(restored.comm_id)
        elif _is_widget(owner):
            to_reopen[restored.comm_id] = owner
        else:
            restored._closed = True
    reopened: set[str] = set()

    def reopen(widget: Any) -> None:
        if widget._model_id in reopened:
            return
        reopened.add(widget._model_id)
        for child in _child_widgets(widget):
            if child.comm is not None and child.comm.comm_id in to_reopen:
                reopen(child)
        widget.comm = None
        widget.open()

    for widget in to_reopen.values():
        reopen(widget)

    def holding(ids: set[str]) -> list[str]:
        return sorted(
            name
            for name in names
            if _is_widget(namespace.get(name))
            and namespace[name].comm is not None
            and namespace[name].comm.comm_id in ids
        )

    return {"reconnected": holding(reconnected), "reopened": holding(reopened)}


def _current_channel() -> FrameChannel:
    assert _CHANNEL is not None, "the sandbox worker is not initialised"
    return _CHANNEL


def _create_comm(*args: Any, **kwargs: Any) -> BaseComm:
    return SandboxComm(*args, **kwargs)


def _get_comm_manager() -> CommManager:
    global _COMM_MANAGER
    if _COMM_MANAGER is None:
        _COMM_MANAGER = CommManager()
    return _COMM_MANAGER


@magics_class
class CapsuleMagics(Magics):
    """%capsule inside a cell with other code: the kernel runs it and answers."""

    _ids = itertools.count(1)

    @line_cell_magic
    def capsule(self, line: str, cell: str | None = None) -> None:
        shell: SandboxShell = self.shell  # type: ignore[assignment]
        shell.refuse_on_subshell("%capsule")
        shell.flusher.flush_all()
        request_id = next(self._ids)
        shell.channel.send({"type": "magic", "id": request_id, "line": line, "cell": cell})
        reply = shell.wait_reply("magic_reply", request_id)
        if not reply.get("ok"):
            raise UsageError(reply.get("error") or "%capsule failed")

    @line_magic
    def subshell(self, line: str) -> None:  # noqa: ARG002 - a magic's signature
        """List the kernel's subshells, as ipykernel's %subshell does."""
        shell: SandboxShell = self.shell  # type: ignore[assignment]
        subshells = shell.subshells
        ident = threading.current_thread().ident
        print(f"subshell id: {subshells.name_of(ident) if subshells else None}")
        print(f"thread id: {ident}")
        print(f"main thread id: {threading.main_thread().ident}")
        print(f"pid: {os.getpid()}")
        print(f"thread count: {threading.active_count()}")
        print(f"subshell list: {subshells.names() if subshells else []}")


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # capsule_kernel/


def without_capsule_tail(tb: TracebackType | None) -> TracebackType | None:
    """The traceback cut after its last frame outside capsule_kernel (the user's, IPython's or a library's)."""
    last_outside = None
    entry = tb
    while entry is not None:
        if not os.path.abspath(entry.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
            last_outside = entry
        entry = entry.tb_next
    if last_outside is not None:
        last_outside.tb_next = None
    return tb


class SandboxShell(ZMQInteractiveShell):
    """IPython's kernel shell, with outputs and input going through frames.

    Subclassing ipykernel's ZMQInteractiveShell (without its kernel) keeps the
    pager payloads, shell-escape piping and exit handling users know, and lets
    libraries that look for a Jupyter kernel (tqdm.auto, rich, plotly...)
    recognise one.
    """

    displayhook_class = Type(SandboxDisplayHook)
    display_pub_class = Type(SandboxDisplayPublisher)

    channel = AnyTrait()
    flusher = AnyTrait()
    limits: dict[str, Any] = {}
    allow_stdin = False
    quiet = False  # start-up code (the profile): errors are collected, not shown
    subshells: Any = None  # worker_subshells.Subshells: %subshell lists them

    def __init__(self, *, channel: FrameChannel, flusher: StreamFlusher, **kwargs: Any) -> None:
        super().__init__(channel=channel, flusher=flusher, **kwargs)
        for hook in (self.display_pub, self.displayhook):
            hook.channel = channel
            hook.flusher = flusher
        self.set_custom_exc((MemoryError, OSError, RuntimeError), _explain_limit_error)
        self.register_magics(CapsuleMagics)
        self._reply_ids = itertools.count(1)

    @property
    def last_error(self) -> dict[str, Any] | None:
        """The error the current thread's cell showed (the main shell's and each subshell's are apart)."""
        return getattr(self.__dict__.get("_errors"), "error", None)

    @last_error.setter
    def last_error(self, value: dict[str, Any] | None) -> None:
        self.__dict__.setdefault("_errors", threading.local()).error = value

    @staticmethod
    def refuse_on_subshell(what: str) -> None:
        """What waits on the kernel's answer to the main shell's cell is not for a subshell's cell."""
        if current_subshell() is not None:
            raise UsageError(f"{what} is not available in a subshell; run it on the notebook's main shell")

    def set_parent(self, parent: dict[str, Any]) -> None:
        """The request being served (get_parent(), kernel.get_parent()); outputs are filed by the kernel."""
        self.parent_header = parent

    def serve_request(self, header: dict[str, Any]) -> None:
        """The kernel now serves the request with this header (a cell, or a comm message between cells)."""
        self.set_parent(parent_request(header))

    def enable_gui(self, gui: str | None = None) -> None:
        if gui not in (None, "inline"):
            raise UsageError(f"GUI event loop {gui!r} is not available in the capsule sandbox; use inline")

    def ask_exit(self) -> None:
        """exit() asks the frontend; the sandbox itself keeps serving."""
        self.payload_manager.write_payload({"source": "ask_exit", "keepkernel": False})

    def _update_exit_now(self, change: Any) -> None:
        """ZMQInteractiveShell stops its kernel's loop here; there is none."""

    def run_cell(self, *args: Any, **kwargs: Any):  # noqa: ANN201
        self.last_error = None
        return super().run_cell(*args, **kwargs)

    def _get_exc_info(self, exc_tuple=None):  # noqa: ANN001 - IPython's signature
        """IPython's exception triple, without the frames Capsule added at its end.

        A limit is raised from the worker's signal handlers (the wall-clock
        timer, the CPU watch) on top of the user's frames; the traceback
        shows where the user's code was, not the handler.
        """
        etype, value, tb = super()._get_exc_info(exc_tuple)
        return etype, value, without_capsule_tail(tb)

    def _showtraceback(self, etype, evalue, stb) -> None:  # noqa: ANN001
        self.flusher.flush_all()
        self.last_error = {"ename": etype.__name__, "evalue": str(evalue), "traceback": list(stb)}
        if not self.quiet:
            self.channel.send({"type": "error", **json_clean(self.last_error)})

    # -- input() and other waits on the kernel --------------------------------

    def wait_reply(self, kind: str, request_id: int) -> dict[str, Any]:
        """Block the cell until the kernel answers; KeyboardInterrupt aborts."""
        while True:
            reply = self.channel.replies.get()
            if reply["type"] == "eof":
                raise SystemExit(0)
            if reply["type"] == kind and reply.get("id") == request_id:
                return reply

    def capsule_task(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        """A @task request to the kernel (capsule_kernel.tasks); blocks the cell until it answers."""
        self.refuse_on_subshell("@task")
        self.flusher.flush_all()
        request_id = next(self._reply_ids)
        self.channel.send({"type": "task", "id": request_id, "action": action, "args": args})
        return self.wait_reply("task_reply", request_id)["content"]

    def request_input(self, prompt: str = "", password: bool = False) -> str:
        what = "getpass" if password else "input"
        if current_subshell() is not None:
            raise StdinNotImplementedError(f"{what}() is not available in a subshell; use the notebook's main shell")
        if not self.allow_stdin:
            raise StdinNotImplementedError(f"{what}() was called, but this frontend does not support input requests.")
        self.flusher.flush_all()
        request_id = next(self._reply_ids)
        self.channel.send({"type": "input_request", "id": request_id, "prompt": str(prompt), "password": password})
        value = self.wait_reply("input_reply", request_id).get("value", "")
        if value == "\x04":
            raise EOFError
        return value


_PROCESS_FUNCTIONS = {
    "fork",
    "_fork_exec",
    "fork_exec",
    "_execute_child",
    "posix_spawn",
    "start_new_thread",
    "_start_new_thread",
}


def _raised_in(tb, names: set[str]) -> bool:  # noqa: ANN001
    return any(frame.f_code.co_name in names for frame, _ in traceback.walk_tb(tb))


def limit_explanation(limits: dict[str, Any], value: BaseException, tb) -> str | None:  # noqa: ANN001
    """If the error is a sandbox limit being hit, say which one, in words."""
    if isinstance(value, MemoryError) and limits.get("memory"):
        detail = f" ({value})" if str(value) else ""
        return (
            f"the cell exceeded the sandbox memory limit of {format_size(limits['memory'])}{detail}; "
            "raise it with %capsule limits --memory SIZE"
        )
    if isinstance(value, OSError) and value.errno == errno.EMFILE and limits.get("files"):
        return (
            f"{value.strerror}: the sandbox allows {limits['files']} open files (files limit); "
            "raise it with %capsule limits --files N"
        )
    hit_procs = (isinstance(value, OSError) and value.errno == errno.EAGAIN and _raised_in(tb, _PROCESS_FUNCTIONS)) or (
        isinstance(value, RuntimeError) and "can't start new thread" in str(value)
    )
    if hit_procs and limits.get("procs"):
        what = value.strerror if isinstance(value, OSError) else str(value)
        return (
            f"{what}: the sandbox allows {limits['procs']} processes and threads (procs limit); "
            "raise it with %capsule limits --procs N"
        )
    return None


def _explain_limit_error(shell: SandboxShell, etype, value, tb, tb_offset=None):  # noqa: ANN001
    """Errors caused by a sandbox limit name the limit, so users know what to raise."""
    explanation = limit_explanation(shell.limits, value, tb)
    if explanation is not None:
        value = etype(value.errno, explanation) if isinstance(value, OSError) else etype(explanation)
    shell.showtraceback((etype, value, tb), tb_offset=tb_offset)


def install(channel: FrameChannel, flusher: StreamFlusher, ipython: dict[str, Any] | None = None) -> SandboxShell:
    """Create the shell (with the client's IPython configuration); input(), getpass and comms use frames."""
    global _CHANNEL
    _CHANNEL = channel
    import comm

    comm.create_comm = _create_comm
    comm.get_comm_manager = _get_comm_manager

    from traitlets.config import Config

    config = Config(ipython or {})
    # IPython's default colour scheme ("neutral"), as ipykernel keeps it: readable on light and
    # dark notebook themes alike ("linux" is for dark terminals: near-white on JupyterLab's light theme).
    # ipykernel's compiler: cells are named as ipykernel names them, so tracebacks read exactly as
    # stock ("Cell In[2], line 4", blank context lines shown).
    shell = SandboxShell.instance(channel=channel, flusher=flusher, config=config, compiler_class=XCachingCompiler)
    shell.history_manager.db_cache_size = 0
    # get_ipython().kernel, as libraries expect under ipykernel (kernel_facade.py).
    shell.kernel = KernelFacade(shell, channel, flusher, _get_comm_manager())

    def _input(prompt: object = "") -> str:
        return shell.request_input(str(prompt))

    def _getpass(prompt: str = "Password: ", stream: Any = None) -> str:  # noqa: ARG001
        return shell.request_input(prompt, password=True)

    keep_observers_in_checkpoints()
    builtins.input = _input
    getpass.getpass = _getpass
    sys.displayhook = shell.displayhook
    return shell


def comm_manager() -> CommManager:
    return _get_comm_manager()
