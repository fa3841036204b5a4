"""Driving real capsule kernels through jupyter_client, the way frontends do.

Every wait polls a channel with a deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import os
import queue
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager

DEFAULT_TIMEOUT = 60.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def plain(text: str) -> str:
    """Text without terminal colour codes."""
    return _ANSI.sub("", text)


@dataclass
class Message:
    msg_type: str
    content: dict[str, Any]
    received: float
    raw: dict[str, Any]


@dataclass
class ExecResult:
    reply: dict[str, Any]
    messages: list[Message] = field(default_factory=list)
    started: float = 0.0
    replied: float = 0.0

    @property
    def status(self) -> str:
        return self.reply["content"]["status"]

    @property
    def content(self) -> dict[str, Any]:
        return self.reply["content"]

    @property
    def metadata(self) -> dict[str, Any]:
        return self.reply["metadata"]

    def of_type(self, msg_type: str) -> list[Message]:
        return [m for m in self.messages if m.msg_type == msg_type]

    def stream(self, name: str = "stdout") -> str:
        return "".join(m.content["text"] for m in self.of_type("stream") if m.content["name"] == name)

    @property
    def stdout(self) -> str:
        return self.stream("stdout")

    @property
    def stderr(self) -> str:
        return self.stream("stderr")

    @property
    def error(self) -> dict[str, Any] | None:
        errors = self.of_type("error")
        return errors[-1].content if errors else None

    @property
    def result_text(self) -> str | None:
        results = self.of_type("execute_result")
        return results[-1].content["data"].get("text/plain") if results else None

    def texts(self) -> str:
        """Every piece of text the cell showed, for assertions on wording."""
        parts = [self.stdout, self.stderr]
        for m in self.messages:
            if m.msg_type in ("display_data", "execute_result"):
                parts.append(m.content["data"].get("text/plain", ""))
            elif m.msg_type == "error":
                parts.append(f"{m.content['ename']}: {m.content['evalue']}")
        return "\n".join(parts)


class KernelHarness:
    def __init__(self, km: KernelManager) -> None:
        self.km = km
        self.kc = km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=DEFAULT_TIMEOUT)

    def close(self) -> None:
        self.kc.stop_channels()
        if self.km.is_alive():
            self.km.shutdown_kernel(now=False)
        else:
            # A kernel the test killed: close the manager's own sockets too, or zmq's context
            # waits for them when the test process exits.
            self.km.cleanup_resources()

    def drain_iopub(self) -> None:
        while True:
            try:
                self.kc.get_iopub_msg(timeout=0.05)
            except queue.Empty:
                return

    def execute(
        self,
        code: str,
        timeout: float = DEFAULT_TIMEOUT,
        stdin_answer: Callable[[dict[str, Any]], str] | None = None,
        on_message: Callable[[Message], None] | None = None,
        on_any: Callable[[dict[str, Any]], None] | None = None,
        **kwargs: Any,
    ) -> ExecResult:
        if stdin_answer is not None:
            kwargs["allow_stdin"] = True
        started = time.monotonic()
        msg_id = self.kc.execute(code, **kwargs)
        return self.collect(msg_id, started, timeout, stdin_answer, on_message, on_any)

    def collect(
        self,
        msg_id: str,
        started: float,
        timeout: float = DEFAULT_TIMEOUT,
        stdin_answer: Callable[[dict[str, Any]], str] | None = None,
        on_message: Callable[[Message], None] | None = None,
        on_any: Callable[[dict[str, Any]], None] | None = None,
    ) -> ExecResult:
        """The reply and iopub messages of one request; on_any sees every iopub message, whoever's it is."""
        deadline = started + timeout
        result = ExecResult(reply={}, started=started)
        idle = False
        while not (idle and result.reply):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no idle/reply for {msg_id} within {timeout} s; got {[m.msg_type for m in result.messages]}"
                )
            if stdin_answer is not None:
                try:
                    request = self.kc.get_stdin_msg(timeout=0.01)
                    self.kc.input(stdin_answer(request["content"]))
                except queue.Empty:
                    pass
            if not result.reply:
                try:
                    # No wait here: a cell with thousands of outputs would cost 10 ms per message.
                    reply = self.kc.get_shell_msg(timeout=0)
                    if reply["parent_header"].get("msg_id") == msg_id:
                        result.reply = reply
                        result.replied = time.monotonic()
                except queue.Empty:
                    pass
            if not idle:
                try:
                    msg = self.kc.get_iopub_msg(timeout=0.02)
                except queue.Empty:
                    continue
                if on_any is not None:
                    on_any(msg)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "status":
                    idle = msg["content"]["execution_state"] == "idle"
                    continue
                message = Message(msg["msg_type"], msg["content"], time.monotonic(), msg)
                result.messages.append(message)
                if on_message is not None:
                    on_message(message)
        return result

    def request(self, method: str, *args: Any, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> dict[str, Any]:
        msg_id = getattr(self.kc, method)(*args, **kwargs)
        return self.shell_reply(msg_id, timeout)

    def shell_reply(self, msg_id: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                reply = self.kc.get_shell_msg(timeout=0.1)
            except queue.Empty:
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply
        raise TimeoutError(f"no shell reply to {msg_id}")

    def control(self, msg_type: str, content: dict[str, Any] | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict:
        """Send a request on the control channel and return its reply."""
        msg = self.kc.session.msg(msg_type, content or {})
        self.kc.control_channel.send(msg)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                reply = self.kc.control_channel.get_msg(timeout=0.1)
            except queue.Empty:
                continue
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                return reply
        raise TimeoutError(f"no {msg_type} reply within {timeout} s")

    def sandbox_pid(self) -> int:
        """The host pid of the sandbox's worker (inside its PID namespace it has another)."""
        status = self.execute("%capsule status").texts()
        match = re.search(r"^pid\s+(\d+)", status, re.MULTILINE)
        if match is None:
            raise AssertionError(f"no pid in %capsule status:\n{status}")
        return int(match.group(1))

    def printed(self, msg_id: str, text: str) -> bool:
        """The next iopub message (within 0.1 s) is `text` on a stream of request `msg_id`: a wait_until predicate."""
        try:
            msg = self.kc.get_iopub_msg(timeout=0.1)
        except queue.Empty:
            return False
        mine = msg["parent_header"].get("msg_id") == msg_id
        return mine and msg["msg_type"] == "stream" and text in msg["content"]["text"]


def wait_until(
    predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not met within {timeout} s")


def start_kernel(
    kernel_name: str = "capsule",
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> KernelHarness:
    full_env = dict(os.environ)
    full_env.update(env or {})
    for attempt in range(3):
        km = KernelManager(kernel_name=kernel_name)
        km.start_kernel(env=full_env, cwd=str(cwd) if cwd else None)
        try:
            return KernelHarness(km)
        except RuntimeError:
            # jupyter_client picks free TCP ports before the kernel binds them; with tests
            # on two workers another kernel can take one in between ("Address already in
            # use"), and the kernel dies before its kernel_info reply. Start it again.
            if km.is_alive() or attempt == 2:
                raise
            km.cleanup_resources()
    raise AssertionError("unreachable")
