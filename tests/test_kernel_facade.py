"""get_ipython().kernel in the sandbox: what libraries use of ipykernel's kernel object, over frames.

The cells are the ones nbclient's and the classic notebook's own tests use
(update-display-id), and the ipywidgets Output widget; the attacks check that
the facade publishes only output, under the request being served.
"""

from __future__ import annotations

import ast
import queue
import time

DISPLAY_WITH_ID = """
ip = get_ipython()
from IPython.display import display
def display_with_id(obj, display_id, update=False, execute_result=False):
    iopub = ip.kernel.iopub_socket
    session = get_ipython().kernel.session
    data, md = ip.display_formatter.format(obj)
    transient = {'display_id': display_id}
    content = {'data': data, 'metadata': md, 'transient': transient}
    if execute_result:
        msg_type = 'execute_result'
        content['execution_count'] = ip.execution_count
    else:
        msg_type = 'update_display_data' if update else 'display_data'
    session.send(iopub, msg_type, content, parent=ip.parent_header)
"""


def test_the_kernel_object_names_the_request_being_served(kernel):
    result = kernel.execute(
        "k = get_ipython().kernel\n"
        "(k.get_parent()['header']['msg_id'], k._parent_header['header']['msg_type'], "
        "k.comm_manager is not None, k.shell is get_ipython(), k.session.key)"
    )
    assert result.status == "ok", result.texts()
    msg_id = result.reply["parent_header"]["msg_id"]
    assert ast.literal_eval(result.result_text) == (msg_id, "execute_request", True, True, b"")


def test_update_display_id_through_the_kernel_session(kernel):
    assert kernel.execute(DISPLAY_WITH_ID).status == "ok"
    first = kernel.execute("display('above')\ndisplay_with_id(1, 'here')\ndisplay('below')")
    shown = first.of_type("display_data")
    assert [m.content["data"]["text/plain"] for m in shown] == ["'above'", "1", "'below'"]
    assert shown[1].content["transient"] == {"display_id": "here"}
    second = kernel.execute(
        "display_with_id(2, 'here')\ndisplay_with_id(3, 'there')\ndisplay_with_id(4, 'here', update=True)\n"
        "display_with_id(9, 'result', execute_result=True)"
    )
    assert second.status == "ok", second.texts()
    kinds = [(m.msg_type, m.content["data"]["text/plain"], m.content["transient"]) for m in second.messages
             if m.msg_type in ("display_data", "update_display_data")]  # fmt: skip
    assert kinds == [
        ("display_data", "2", {"display_id": "here"}),
        ("display_data", "3", {"display_id": "there"}),
        ("update_display_data", "4", {"display_id": "here"}),
    ]
    results = second.of_type("execute_result")
    assert results and results[0].content["data"]["text/plain"] == "9"
    # Every one of them belongs to the cell that sent it.
    assert {m.raw["parent_header"]["msg_id"] for m in second.messages} == {second.reply["parent_header"]["msg_id"]}


def test_the_output_widget_captures_what_is_printed_inside_it(kernel):
    """The frontend's Output view captures messages whose parent is its msg_id: it must be this request's."""
    result = kernel.execute(
        "import ipywidgets as widgets\nout = widgets.Output()\ndisplay(out)\n"
        "with out:\n    print('inside the widget')\nprint('after the widget')"
    )
    assert result.status == "ok", result.texts()
    msg_id = result.reply["parent_header"]["msg_id"]
    out_id = next(
        m.content["comm_id"]
        for m in result.of_type("comm_open")
        if m.content["data"]["state"].get("_model_name") == "OutputModel"
    )
    sequence = []
    for m in result.messages:
        if m.msg_type == "comm_msg" and m.content["comm_id"] == out_id:
            state = m.content["data"].get("state", {})
            if "msg_id" in state:
                sequence.append(("capture", state["msg_id"]))
        elif m.msg_type == "stream":
            sequence.append(("print", m.content["text"].strip()))
    assert sequence == [
        ("capture", msg_id),
        ("print", "inside the widget"),
        ("capture", ""),
        ("print", "after the widget"),
    ], sequence


def _iopub_until_printed(kernel, msg_id: str, timeout: float = 30) -> list[dict]:
    got, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kernel.kc.get_iopub_msg(timeout=0.1)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        got.append(msg)
        if msg["msg_type"] == "stream":
            return got
    raise TimeoutError(f"no output for {msg_id}: {[m['msg_type'] for m in got]}")


def test_a_comm_callback_serves_the_comm_message_that_called_it(kernel):
    """Output from a widget callback between cells belongs to the frontend's comm message (as in ipykernel)."""
    setup = kernel.execute(
        "def on_open(comm, msg):\n"
        "    print('serving', get_ipython().kernel.get_parent()['header']['msg_id'])\n"
        "get_ipython().kernel.comm_manager.register_target('capsule.facade.test', on_open)"
    )
    assert setup.status == "ok", setup.texts()
    kernel.drain_iopub()
    msg = kernel.kc.session.msg("comm_open", {"comm_id": "facade-1", "target_name": "capsule.facade.test", "data": {}})
    kernel.kc.shell_channel.send(msg)
    printed = _iopub_until_printed(kernel, msg["header"]["msg_id"])[-1]
    assert printed["content"]["text"].strip() == f"serving {msg['header']['msg_id']}"


# -- attacks from inside the sandbox -------------------------------------------------------


def test_a_cell_cannot_file_output_under_another_request(kernel):
    """A forged parent is ignored: the output lands in the cell that sent it, nowhere else."""
    result = kernel.execute(
        "k = get_ipython().kernel\n"
        "k.session.send(k.iopub_socket, 'display_data', {'data': {'text/plain': 'forged'}, 'metadata': {}},"
        " parent={'header': {'msg_id': 'someone-elses-request', 'msg_type': 'execute_request'}})"
    )
    assert result.status == "ok", result.texts()
    forged = [m for m in result.of_type("display_data") if m.content["data"].get("text/plain") == "forged"]
    assert len(forged) == 1
    assert forged[0].raw["parent_header"]["msg_id"] == result.reply["parent_header"]["msg_id"]


def test_the_facade_publishes_only_output(kernel):
    """status, shell replies and other channels are refused with a clear error; nothing reaches iopub."""
    attempts = {
        "status": "k.session.send(k.iopub_socket, 'status', {'execution_state': 'idle'})",
        "reply": "k.session.send(k.iopub_socket, 'execute_reply', {'status': 'ok'})",
        "stdin stream": "k.session.send(k.iopub_socket, 'stream', {'name': 'stdin', 'text': 'x'})",
        "other socket": "k.session.send(object(), 'display_data', {'data': {}, 'metadata': {}})",
    }
    for what, line in attempts.items():
        result = kernel.execute(f"k = get_ipython().kernel\n{line}")
        assert result.status == "error", what
        assert result.error["ename"] == "ValueError", (what, result.error)
        published = {m.msg_type for m in result.messages} - {"error", "execute_input"}
        assert not published, (what, published)
