"""`get_ipython().kernel` inside the subprocess sandbox: what libraries reach for, over frames.

Runs INSIDE the sandbox. Under stock ipykernel, libraries (the ipywidgets
Output widget, display helpers, bokeh, plotly) take the shell's `kernel` and
call `kernel.session.send(kernel.iopub_socket, ...)`, `kernel.get_parent()`
or `kernel.comm_manager`. The sandbox has no ZeroMQ socket and never sees
the kernel's signing key, so this facade turns each iopub message into the
output frame that carries it (one table, `_IOPUB_FRAMES`): the kernel checks
the frame like any other and publishes it under the request it is serving.
Whatever parent a caller names is ignored (a cell cannot file output under
another request), and messages that are not output are refused with an error
that says what the sandbox may send.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ipykernel.jsonutil import encode_images, json_clean

from capsule_kernel.protocol import frames


class IOPubFacade:
    """Stands where ipykernel's iopub socket is; only the facade's session can send on it."""

    def __repr__(self) -> str:
        return "<capsule sandbox iopub: messages become output frames>"


def _display(update: bool) -> Callable[[dict[str, Any], list[Any]], dict[str, Any]]:
    def frame(content: dict[str, Any], buffers: list[Any]) -> dict[str, Any]:  # noqa: ARG001
        return {
            "type": "display",
            "data": json_clean(encode_images(content.get("data") or {})),
            "metadata": json_clean(content.get("metadata") or {}),
            "transient": json_clean(content.get("transient") or {}),
            "update": update,
        }

    return frame


def _stream(content: dict[str, Any], buffers: list[Any]) -> dict[str, Any]:  # noqa: ARG001
    name = content.get("name")
    if name not in ("stdout", "stderr"):
        raise ValueError(f"a stream message must name stdout or stderr, not {name!r}")
    return {"type": "stream", "name": name, "text": str(content.get("text", ""))}


def _execute_result(content: dict[str, Any], buffers: list[Any]) -> dict[str, Any]:  # noqa: ARG001
    return {
        "type": "execute_result",
        "data": json_clean(encode_images(content.get("data") or {})),
        "metadata": json_clean(content.get("metadata") or {}),
        "execution_count": int(content.get("execution_count") or 0),
        "transient": json_clean(content.get("transient") or {}),
    }


def _error(content: dict[str, Any], buffers: list[Any]) -> dict[str, Any]:  # noqa: ARG001
    return {
        "type": "error",
        "ename": str(content.get("ename", "Error")),
        "evalue": str(content.get("evalue", "")),
        "traceback": [str(line) for line in content.get("traceback") or []],
    }


def _clear_output(content: dict[str, Any], buffers: list[Any]) -> dict[str, Any]:  # noqa: ARG001
    return {"type": "clear_output", "wait": bool(content.get("wait", False))}


def _comm(msg_type: str) -> Callable[[dict[str, Any], list[Any]], dict[str, Any]]:
    def frame(content: dict[str, Any], buffers: list[Any]) -> dict[str, Any]:
        return {
            "type": "comm",
            "msg_type": msg_type,
            "content": json_clean(content),
            "metadata": {},
            "buffers": frames.pack_buffers(buffers),
        }

    return frame


# The iopub messages a cell may publish, each as the frame that carries it to the kernel.
_IOPUB_FRAMES: dict[str, Callable[[dict[str, Any], list[Any]], dict[str, Any]]] = {
    "display_data": _display(update=False),
    "update_display_data": _display(update=True),
    "execute_result": _execute_result,
    "stream": _stream,
    "error": _error,
    "clear_output": _clear_output,
    "comm_open": _comm("comm_open"),
    "comm_msg": _comm("comm_msg"),
    "comm_close": _comm("comm_close"),
}


class SessionFacade:
    """jupyter_client's Session as far as a cell uses it: `msg` builds, `send` publishes output."""

    def __init__(self, channel: Any, flusher: Any) -> None:
        self._channel = channel
        self._flusher = flusher
        self.session = uuid.uuid4().hex
        self.username = "capsule"
        self.key = b""  # the kernel's key never enters the sandbox

    def msg_header(self, msg_type: str) -> dict[str, Any]:
        return {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "username": self.username,
            "session": self.session,
            "date": datetime.now(UTC).isoformat(),
            "version": "5.3",
        }

    def msg(
        self,
        msg_type: str,
        content: dict[str, Any] | None = None,
        parent: dict[str, Any] | None = None,
        header: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        header = header or self.msg_header(msg_type)
        parent_header = (parent or {}).get("header", parent or {})
        return {
            "header": header,
            "msg_id": header["msg_id"],
            "msg_type": header["msg_type"],
            "parent_header": parent_header,
            "content": content if content is not None else {},
            "metadata": metadata or {},
        }

    def send(
        self,
        stream: Any,
        msg_or_type: dict[str, Any] | str,
        content: dict[str, Any] | None = None,
        parent: dict[str, Any] | None = None,
        ident: Any = None,  # noqa: ARG002 - the kernel picks the topic
        buffers: list[Any] | None = None,
        track: bool = False,  # noqa: ARG002
        header: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Publish an output message; the kernel files it under the request it is serving."""
        if not isinstance(stream, IOPubFacade):
            raise ValueError("in the capsule sandbox, messages can only be sent to kernel.iopub_socket")
        msg = msg_or_type if isinstance(msg_or_type, dict) else self.msg(msg_or_type, content, parent, header, metadata)
        msg_type = str(msg.get("msg_type") or msg.get("header", {}).get("msg_type", ""))
        to_frame = _IOPUB_FRAMES.get(msg_type)
        if to_frame is None:
            raise ValueError(
                f"the capsule sandbox does not publish {msg_type!r} messages; it publishes {', '.join(_IOPUB_FRAMES)}"
            )
        frame = to_frame(dict(msg.get("content") or {}), list(buffers or msg.get("buffers") or []))
        self._flusher.flush_all()  # printed text first, as it was written before this message
        self._channel.send(frame)
        return msg


class KernelFacade:
    """What `get_ipython().kernel` is in the sandbox: output and comms over frames, the request being served."""

    implementation = "capsule"
    _supports_kernel_subshells = False
    eventloop = None

    def __init__(self, shell: Any, channel: Any, flusher: Any, comm_manager: Any) -> None:
        self.shell = shell
        self.session = SessionFacade(channel, flusher)
        self.iopub_socket = IOPubFacade()
        self.comm_manager = comm_manager
        self.log = logging.getLogger("capsule.sandbox")

    def get_parent(self, channel: str | None = None) -> dict[str, Any]:  # noqa: ARG002 - one parent here
        """The request being served (a cell's execute_request, or the frontend's comm message)."""
        return self.shell.get_parent()

    @property
    def _parent_header(self) -> dict[str, Any]:
        return self.get_parent()

    @property
    def execution_count(self) -> int:
        return int(self.shell.execution_count)

    def send_response(
        self,
        stream: Any,
        msg_or_type: dict[str, Any] | str,
        content: dict[str, Any] | None = None,
        ident: Any = None,
        buffers: list[Any] | None = None,
        track: bool = False,
        header: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        channel: str | None = None,
    ) -> dict[str, Any]:
        return self.session.send(
            stream, msg_or_type, content, self.get_parent(channel), ident, buffers, track, header, metadata
        )


def parent_request(header: dict[str, Any]) -> dict[str, Any]:
    """The request a frame names, shaped as ipykernel's parent (what `get_parent()` returns there)."""
    header = {str(key): str(value) for key, value in header.items()}
    return {
        "header": header,
        "msg_id": header.get("msg_id", ""),
        "msg_type": header.get("msg_type", ""),
        "parent_header": {},
        "metadata": {},
        "content": {},
    }
