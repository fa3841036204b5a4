"""The code that runs INSIDE the subprocess sandbox.

Started by the kernel as ``python -P -m capsule_kernel.inside.worker.worker CONFIG``
inside bubblewrap, with the frame pipe on two inherited descriptors. It is
confined before its first instruction (``confinement.py``, on the kernel's
side) and never confines itself; it starts IPython and serves frames:
execute, request (complete / inspect / history), comm, shutdown.

While idle the worker ignores interrupts; while a cell runs, SIGINT raises
KeyboardInterrupt, SIGUSR2 raises CellTimeout and SIGXCPU raises
CPULimitExceeded, all in the cell, so the namespace survives every one of them.
"""

from __future__ import annotations

import faulthandler
import json
import os
import queue
import signal
import sys
import time
import traceback
from typing import Any

from capsule_kernel.inside import snapshot
from capsule_kernel.inside.requests import RequestTable
from capsule_kernel.inside.stops import cpu_stop, timeout_stop


class Worker:
    """The serve loop; one instance per sandbox process."""

    def __init__(self, config: dict[str, Any]) -> None:
        from capsule_kernel.inside.worker import shell as worker_shell
        from capsule_kernel.inside.worker.channel import FrameChannel, ProtocolStream, StreamFlusher

        self.config = config
        self.channel = FrameChannel(config["read_fd"], config["write_fd"])
        self.flusher = StreamFlusher()
        sys.stdout = ProtocolStream("stdout", self.channel, self.flusher, 1)
        sys.stderr = ProtocolStream("stderr", self.channel, self.flusher, 2)
        ipython = dict(config.get("ipython") or {})
        profile = dict(ipython.pop("InteractiveShellApp", {}))
        self.shell = worker_shell.install(self.channel, self.flusher, ipython)
        self.shell.limits = dict(config.get("limits", {}))
        self.comms = worker_shell.comm_manager()
        from capsule_kernel.inside.worker.snapshots import Snapshotter

        chunk_fd = config.get("chunk_fd")
        source = None
        if chunk_fd is not None:
            from capsule_kernel.inside.worker.chunks import KernelChunks

            source = KernelChunks(chunk_fd)
        self.snapshots = Snapshotter(self.shell, self.channel, config.get("spool"), config.get("report_fd"), source)
        self.snapshots.max_delay, self.snapshots.max_cells = config["coalesce"]
        from capsule_kernel.inside import tasks
        from capsule_kernel.inside.worker import answers as worker_requests

        tasks.SHELL = self.shell

        self.requests = RequestTable(
            {
                **worker_requests.table(self.shell, self.comms),
                "names": lambda args: {"names": self.snapshots.names()},  # noqa: ARG005
                "restore": self._restore,
                "forget_digests": self._forget_digests,
                "bind": lambda args: tasks.bind(self.shell.user_ns, args),
                # Answered once everything sent before it on its thread was handled and its output flushed.
                "settled": lambda args: {"status": "ok"},  # noqa: ARG005
            }
        )
        from capsule_kernel.inside.worker.subshells import Subshells

        self.subshells = Subshells(self)
        self.shell.subshells = self.subshells
        self.channel.to_subshells = self.subshells.take
        self.channel.start()
        self.flusher.start()
        # The user's IPython profile, as ipykernel applies it (worker_profile.py); failures go with "ready".
        from capsule_kernel.inside.worker import profile as worker_profile

        self.profile_problems = worker_profile.apply(self.shell, profile)

    # -- signals ---------------------------------------------------------------

    def _interrupts_raise(self) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGUSR2, self._on_timeout)
        signal.signal(signal.SIGXCPU, self._on_cpu_limit)

    @staticmethod
    def _interrupts_ignored() -> None:
        for signum in (signal.SIGINT, signal.SIGUSR2, signal.SIGXCPU):
            signal.signal(signum, lambda *_: None)

    def _on_timeout(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        raise timeout_stop(self.shell.limits)

    def _on_cpu_limit(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        raise cpu_stop(self.shell.limits)

    # -- loop ------------------------------------------------------------------

    def serve(self) -> None:
        self._interrupts_ignored()
        ready: dict[str, Any] = {"type": "ready", "pid": os.getpid(), "python": sys.version.split()[0]}
        if self.profile_problems:
            ready["problems"] = self.profile_problems
        self.channel.send(ready)
        handlers = {
            "execute": self.execute,
            "request": self.request,
            "comm": self.comm_between_cells,
            "limits": self.update_limits,
        }
        while True:
            message = self._next_message()
            kind = message["type"]
            if kind == "eof":
                # The kernel died. The deferred cells' snapshot was just forked
                # (_next_message); let chained children learn their predecessors'
                # digests, then go: the journal in the spool is for the next kernel.
                self.snapshots.wait()
                break
            if kind == "shutdown":
                # A clean stop keeps every cell's state: the deferred cells' snapshot was
                # just forked (_next_message); the kernel reads the reports before it reaps.
                self.snapshots.wait()
                break
            handler = handlers.get(kind)
            if handler is None or self.channel.kernel_gone.is_set():
                # Sent before the kernel died, never started: nobody would read the answer, and
                # a cell run now would run twice (the resume runs it again: it never replied).
                continue
            try:
                handler(message)
            except KeyboardInterrupt:
                # An interrupt that arrived just as the work finished.
                pass
            finally:
                self._interrupts_ignored()
                self.flusher.flush_all()
        self.flusher.flush_all()

    def _next_message(self) -> dict[str, Any]:
        """The next frame from the kernel; with cells deferred, their coalesced snapshot comes first when due.

        Due: after worker_snapshots.IDLE_SECONDS with nothing to do, before anything but a
        cell (a request may read or replace the namespace; a shutdown must not
        lose the last cells; an end of file means the kernel died, and this
        snapshot is what the next kernel adopts), or before a cell once the
        deferred ones are overdue.
        """
        snapshots = self.snapshots
        while snapshots.deferred:
            try:
                message = self.channel.inbox.get(timeout=snapshots.idle_seconds)
            except queue.Empty:
                if not snapshots.busy:
                    snapshots.flush()
                continue
            if message["type"] != "execute" or snapshots.overdue():
                snapshots.flush()
            return message
        return self.channel.inbox.get()

    def update_limits(self, message: dict[str, Any]) -> None:
        self.shell.limits = dict(message["limits"])
        _move_soft_limits(self.shell.limits)

    def execute(self, message: dict[str, Any]) -> None:
        shell = self.shell
        # The cell's budget starts now, on the kernel's clocks.
        self.channel.send({"type": "started", "execution_count": int(message.get("execution_count", 0))})
        shell.limits = dict(message.get("limits", shell.limits))
        _move_soft_limits(shell.limits)
        shell.allow_stdin = bool(message.get("allow_stdin"))
        shell.serve_request(message.get("parent_header") or {})
        shell.execution_count = int(message.get("execution_count", shell.execution_count))
        silent = bool(message.get("silent"))
        store_history = bool(message.get("store_history", not silent))
        result = None
        began = time.monotonic()
        try:
            self._interrupts_raise()
            if self.channel.kernel_gone.is_set():
                raise KeyboardInterrupt  # the kernel died as the cell was taken (its interrupt came too early)
            result = shell.run_cell(message["code"], store_history=store_history, silent=silent)
        except KeyboardInterrupt as err:
            if result is None:
                shell.showtraceback((type(err), err, err.__traceback__))
        finally:
            self._interrupts_ignored()
        self.flusher.flush_all()
        reply = self.reply_for(result, message.get("user_expressions") or {}, shell.execution_count - 1, main=True)
        self.flusher.flush_all()
        from ipykernel.jsonutil import json_clean

        ran = time.monotonic() - began
        action, names, plan = "none", [], None
        count = int(message.get("execution_count", 0))
        if reply["status"] == "ok" and not silent:
            candidates = snapshot.names_changed_by(
                self.shell.user_ns, message.get("snapshot_candidates", []), message.get("snapshot_peeks", [])
            )
            action, names, plan = self.snapshots.after_cell(count, candidates, ran)
        elif not silent:
            self.snapshots.abandon(count)  # coalescing: what was deferred cannot be saved as it was
        # The cell's state is held before its reply leaves: in the journal already ("taken"),
        # or by a forked child (its pid follows the reply: the kernel waits for its report).
        child = self.snapshots.take(count, plan, names) if action == "take" and plan else None
        # "snapshot": a checkpoint of this cell follows, so the kernel can wait for it;
        # "deferred": a coalesced snapshot will cover it (worker_snapshots).
        done = {"type": "done", "reply": json_clean(reply), "snapshot": count if plan else None}
        if action == "defer":
            done["deferred"] = True
        self.channel.send(done)
        if child is not None:
            self.snapshots.announce(count, child)

    def reply_for(self, result: Any, expressions: dict[str, str], count: int, *, main: bool = False) -> dict[str, Any]:
        """The execute reply for a cell that ran (on the main shell, or on a subshell's thread)."""
        shell = self.shell
        reply: dict[str, Any] = {"execution_count": count}
        error = shell.last_error
        if result is not None and result.success and error is None:
            reply["status"] = "ok"
            try:
                if main:
                    self._interrupts_raise()
                reply["user_expressions"] = shell.user_expressions(expressions)
            except KeyboardInterrupt:
                reply["user_expressions"] = {}
            finally:
                if main:
                    self._interrupts_ignored()
        else:
            if error is None:
                # IPython shows some errors (UsageError) without a traceback.
                exc = result and (result.error_before_exec or result.error_in_exec)
                error = {
                    "ename": type(exc).__name__ if exc else "Error",
                    "evalue": str(exc or "the cell failed"),
                    "traceback": [],
                }
            reply.update(status="error", user_expressions={}, **error)
        reply["payload"] = shell.payload_manager.read_payload()
        shell.payload_manager.clear_payload()
        return reply

    def _restore(self, args: dict[str, Any]) -> dict[str, Any]:
        """Load checkpoint entries; widgets among them work again (worker_shell.revive_comms)."""
        from capsule_kernel.inside.worker import shell as worker_shell

        result = self.snapshots.restore(args["entries"], replace=bool(args.get("replace")))
        if worker_shell._RESTORED_COMMS:
            open_comms = {str(comm_id) for comm_id in args.get("open_comms", [])}
            result["widgets"] = worker_shell.revive_comms(open_comms, self.shell.user_ns, result["restored"])
        return result

    def _forget_digests(self, args: dict[str, Any]) -> dict[str, Any]:  # noqa: ARG002 - a request handler
        """A new session starts: its first checkpoint saves every name."""
        self.snapshots.forget()
        return {"status": "ok"}

    def request(self, message: dict[str, Any]) -> None:
        from ipykernel.jsonutil import json_clean

        reply = self.requests.answer(message)
        self.channel.send({**reply, "content": json_clean(reply["content"])})

    def comm_between_cells(self, message: dict[str, Any]) -> None:
        """A comm message on the main shell: its callback may be interrupted like a cell."""
        try:
            self._interrupts_raise()
            self.comm(message)
        finally:
            self._interrupts_ignored()

    def comm(self, message: dict[str, Any]) -> None:
        """Hand a comm message to its comm (on the main thread, or on the subshell's it came on)."""
        from capsule_kernel.protocol import frames

        msg = {
            "header": {"msg_type": message["msg_type"]},
            "content": message.get("content", {}),
            "metadata": message.get("metadata", {}),
            "buffers": frames.unpack_buffers(message.get("buffers")),
        }
        handler = getattr(self.comms, message["msg_type"], None)
        if handler is None:
            return
        if "parent_header" in message:
            # What the callback displays or prints belongs to this comm message (an Output widget keys on it).
            self.shell.serve_request(message["parent_header"])
        try:
            handler(None, None, msg)
        except BaseException:  # noqa: BLE001 - a widget callback failing is the user's error, shown as such
            traceback.print_exc()


def _move_soft_limits(limits: dict[str, Any]) -> None:
    """Soft RLIMIT_AS / RLIMIT_NOFILE follow %capsule limits, below the hard limits set at launch.

    The kernel cannot change a running sandbox's rlimits (it runs as another
    user), so the worker moves its own soft limits; the hard limits, and the
    cgroup that caps the whole sandbox, stay the kernel's.
    """
    import resource

    for name, which in (("memory", resource.RLIMIT_AS), ("files", resource.RLIMIT_NOFILE)):
        soft, hard = resource.getrlimit(which)
        value = limits.get(name)
        wanted = resource.RLIM_INFINITY if value is None else int(value)
        if hard != resource.RLIM_INFINITY:
            wanted = hard if wanted == resource.RLIM_INFINITY else min(wanted, hard)
        if wanted != soft:
            try:
                resource.setrlimit(which, (wanted, hard))
            except (ValueError, OSError):
                pass


def _crash_file(spool: str | None) -> Any:
    from capsule_kernel.protocol.frames import CRASH_FILE

    if spool:
        try:
            return open(os.path.join(spool, CRASH_FILE), "w")  # open for the process's life
        except OSError:
            pass
    return sys.__stderr__


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    config = json.loads(argv[0])
    channels = (config["read_fd"], config["write_fd"], config.get("report_fd"), config.get("chunk_fd"))
    if config.get("supervised", True):
        from capsule_kernel.inside.worker.supervisor import supervise

        supervise(tuple(fd for fd in channels if fd is not None))
    # A segfault writes the Python stack to CRASH_FILE in the spool, which the
    # kernel reads when the sandbox has died: the notebook gets a summary of it
    # (the user's frames), %capsule status --last-crash the whole dump. Without
    # a spool it goes to the raw stderr, which the kernel forwards.
    faulthandler.enable(file=_crash_file(config.get("spool")), all_threads=False)
    for fd in channels:
        if fd is None:
            continue
        # Shell commands started by cells must not hold the frame pipe open.
        os.set_inheritable(fd, False)
    proxy = config.get("proxy")
    if isinstance(proxy, dict):
        # network = [hosts]: the sandbox's loopback proxy port, carried to the kernel's proxy.
        from capsule_kernel.inside.worker import proxy_relay

        proxy_relay.start(str(proxy.get("socket")), int(proxy.get("port", 0)))
    Worker(config).serve()


if __name__ == "__main__":
    main()
