"""Kernel subshells (JEP 91) inside the subprocess sandbox: one thread per subshell.

Runs INSIDE the sandbox. ipykernel runs each subshell's requests on a thread
of its own, in the one namespace; so does the worker. The kernel opens a
subshell with a small number of its choosing (``subshell`` frames), sends
its cells (``subshell_execute``), comm messages and requests tagged with
that number, and the frame reader hands them to the subshell's thread at
once, even while the main shell runs a cell. Whatever the thread sends is
tagged with its number (worker_io), so the kernel files it under that
subshell's request.

Signals reach only the main thread, so a subshell's cell is stopped another
way: the kernel's ``interrupt`` or ``timeout`` raises KeyboardInterrupt or
CellTimeout in the thread (``PyThreadState_SetAsyncExc``). That takes effect
at the thread's next Python instruction; a thread blocked in C that never
returns is the kernel's to deal with (it stops the sandbox).

A subshell's cells are not stored in IPython's history and take no checkpoint
of their own: the main shell's next checkpoint holds what they changed.
"""

from __future__ import annotations

import asyncio
import ctypes
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

from capsule_kernel.inside.stops import CellTimeout, timeout_stop
from capsule_kernel.inside.worker.channel import serve_subshell


def _raise_in(thread: threading.Thread, exc_type: type[BaseException]) -> None:
    """Raise exc_type in another thread, at its next Python instruction."""
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type))


def _stop_class(base: type[BaseException], message: str) -> type[BaseException]:
    """A subclass of base whose instances say `message` (the asynchronous raise takes a class, not an instance)."""

    def __init__(self: BaseException, *args: Any) -> None:  # noqa: ARG001 - raised without arguments
        base.__init__(self, message)

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})


class SubshellThread:
    """One subshell: a thread with its own queue and asyncio loop (top-level await runs there)."""

    def __init__(self, tag: int, name: str, worker: Any) -> None:
        self.tag = tag
        self.name = name
        self.worker = worker
        self.inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._busy = threading.Lock()  # held while a message is handled: only then may a stop be raised
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "subshell_execute": self._execute,
            "comm": worker.comm,
            "request": worker.request,
        }
        self.thread = threading.Thread(target=self._run, name=f"capsule-subshell-{tag}", daemon=True)
        self.running = False
        self.limits: dict[str, Any] = {}  # those of its current or last cell (a timeout names them)

    def start(self) -> None:
        self.thread.start()

    def stop_cell(self, exc_type: type[BaseException]) -> None:
        """Raise exc_type in the subshell's cell, if one runs (between cells, nothing happens)."""
        if self.running:
            _raise_in(self.thread, exc_type)

    def _run(self) -> None:
        serve_subshell(self.tag)
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        while True:
            try:
                message = self.inbox.get()
                if message is None:
                    break
                handler = self._handlers.get(message["type"])
                if handler is None:
                    continue
                self.running = message["type"] == "subshell_execute"
                try:
                    handler(message)
                finally:
                    self.running = False
                    self.worker.flusher.flush_all()
            except KeyboardInterrupt:
                # A stop that landed as the work ended (it is asynchronous): the subshell goes on.
                continue
            except Exception:  # noqa: BLE001 - a subshell must outlive a failure in its machinery
                import traceback

                traceback.print_exc()
        self.loop.close()
        for stream in self.worker.flusher.streams:
            stream.drop_subshell(self.tag)

    def _execute(self, message: dict[str, Any]) -> None:
        """One cell, as the main shell runs one (worker.Worker.execute), answered with subshell_done."""
        shell = self.worker.shell
        shell.serve_request(message.get("parent_header") or {})
        shell.last_error = None
        code, silent = message["code"], bool(message.get("silent"))
        self.limits = dict(message.get("limits") or {})
        result = None
        try:
            try:
                transformed, before = shell.transform_cell(code), None
            except Exception:  # noqa: BLE001 - IPython shows it as the cell's error, as ipykernel does
                transformed, before = code, sys.exc_info()
            result = self.loop.run_until_complete(
                shell.run_cell_async(
                    code, store_history=False, silent=silent, transformed_cell=transformed,
                    preprocessing_exc_tuple=before,
                )
            )  # fmt: skip
        except KeyboardInterrupt as err:
            if result is None:
                shell.showtraceback((type(err), err, err.__traceback__))
        self.worker.flusher.flush_all()
        reply = self.worker.reply_for(result, message.get("user_expressions") or {}, shell.execution_count)
        from ipykernel.jsonutil import json_clean

        self.worker.channel.send({"type": "subshell_done", "subshell": self.tag, "reply": json_clean(reply)})


class Subshells:
    """The worker's subshells, fed by the frame reader thread (worker_io.FrameChannel.to_subshells)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.threads: dict[int, SubshellThread] = {}
        self._actions: dict[str, Callable[[int, dict[str, Any]], None]] = {
            "open": self._open,
            "close": self._close,
            "interrupt": lambda tag, message: self._stop(tag, KeyboardInterrupt),  # noqa: ARG005
            "timeout": self._timeout,
        }

    def take(self, message: dict[str, Any]) -> None:
        """A frame for a subshell (called on the reader thread: nothing here may block)."""
        tag = message["subshell"]
        if message["type"] == "subshell":
            action = self._actions.get(message["action"])
            if action is not None:
                action(tag, message)
            return
        subshell = self.threads.get(tag)
        if subshell is None:
            # Opened by the kernel's first message to it (the kernel opens before it sends).
            subshell = self._open(tag, {})
        subshell.inbox.put(message)

    def name_of(self, ident: int | None) -> str | None:
        """The frontend's id of the subshell running on this thread (None: the main shell)."""
        for subshell in self.threads.values():
            if subshell.thread.ident == ident:
                return subshell.name
        return None

    def names(self) -> list[str]:
        return [subshell.name for subshell in self.threads.values()]

    def _open(self, tag: int, message: dict[str, Any]) -> SubshellThread:
        subshell = self.threads.get(tag)
        if subshell is None:
            subshell = self.threads[tag] = SubshellThread(tag, str(message.get("name", tag)), self.worker)
            subshell.start()
        return subshell

    def _close(self, tag: int, message: dict[str, Any]) -> None:  # noqa: ARG002 - an action's signature
        """A deleted subshell: its running cell is interrupted, then its thread ends."""
        subshell = self.threads.pop(tag, None)
        if subshell is not None:
            subshell.stop_cell(KeyboardInterrupt)
            subshell.inbox.put(None)

    def _stop(self, tag: int, exc_type: type[BaseException]) -> None:
        subshell = self.threads.get(tag)
        if subshell is not None:
            subshell.stop_cell(exc_type)

    def _timeout(self, tag: int, message: dict[str, Any]) -> None:  # noqa: ARG002 - an action's signature
        subshell = self.threads.get(tag)
        if subshell is not None:
            stop = timeout_stop(subshell.limits)
            subshell.stop_cell(_stop_class(CellTimeout, str(stop)))


__all__ = ["Subshells"]
