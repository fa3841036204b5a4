"""Widgets (comms both ways), progress bars and matplotlib inline."""

from __future__ import annotations

import base64
import queue

from tests.harness import wait_until


def test_int_slider_comm_round_trip(kernel):
    result = kernel.execute("import ipywidgets as widgets\nslider = widgets.IntSlider(value=3)\nslider")
    opens = [m for m in result.of_type("comm_open") if m.content["target_name"] == "jupyter.widget"]
    slider_open = next(m for m in opens if m.content["data"]["state"].get("_model_name") == "IntSliderModel")
    assert slider_open.content["data"]["state"]["value"] == 3
    comm_id = slider_open.content["comm_id"]
    view = result.of_type("execute_result")[0].content["data"]["application/vnd.jupyter.widget-view+json"]
    assert view["model_id"] == comm_id

    # The frontend moves the slider: a comm_msg from the client side.
    update = kernel.kc.session.msg(
        "comm_msg", {"comm_id": comm_id, "data": {"method": "update", "state": {"value": 7}, "buffer_paths": []}}
    )
    kernel.kc.shell_channel.send(update)
    assert kernel.execute("slider.value").result_text == "7"

    # And the kernel side moves it back: the frontend hears about it.
    moved = kernel.execute("slider.value = 11")
    updates = [m.content for m in moved.of_type("comm_msg") if m.content["comm_id"] == comm_id]
    assert any(u["data"].get("state", {}).get("value") == 11 for u in updates)
    comm_info = kernel.request("comm_info", target_name="jupyter.widget")["content"]["comms"]
    assert comm_id in comm_info


def test_widget_callbacks_run_in_the_sandbox(kernel):
    result = kernel.execute(
        "import ipywidgets as widgets\nseen = []\nbox = widgets.IntText(value=1)\n"
        "box.observe(lambda change: seen.append(change['new']), names='value')\nbox"
    )
    comm_id = next(
        m.content["comm_id"]
        for m in result.of_type("comm_open")
        if m.content["data"]["state"].get("_model_name") == "IntTextModel"
    )
    msg = kernel.kc.session.msg(
        "comm_msg", {"comm_id": comm_id, "data": {"method": "update", "state": {"value": 5}, "buffer_paths": []}}
    )
    kernel.kc.shell_channel.send(msg)
    assert kernel.execute("seen").result_text == "[5]"


def test_a_callbacks_output_belongs_to_its_comm_message_not_to_the_next_cell(kernel):
    """The comm message is done (idle) only after its callbacks ran; what they print is never the next cell's.

    Failed before the kernel waited for the sandbox to settle the message: the next
    cell's execute_request went ahead, and the callback's print was filed under it.
    """
    result = kernel.execute(
        "import ipywidgets as widgets, time\nslow = widgets.IntText(value=1)\n"
        "def noisy(change):\n    time.sleep(0.3)\n    print('from the callback', change['new'])\n"
        "slow.observe(noisy, names='value')\nslow"
    )
    (comm_id,) = _model_ids(result, "IntTextModel")
    msg = _move(kernel, comm_id, 4)
    heard: list[dict] = []
    after = kernel.execute("print('the next cell')", on_any=heard.append)
    assert after.stdout == "the next cell\n"
    callback = [m for m in heard if m["msg_type"] == "stream" and "from the callback" in m["content"]["text"]]
    assert [m["parent_header"]["msg_id"] for m in callback] == [msg["header"]["msg_id"]]
    mine = [m for m in heard if m["parent_header"].get("msg_id") == msg["header"]["msg_id"]]
    statuses = [m for m in mine if m["msg_type"] == "status"]
    idle_at = heard.index(statuses[-1])
    assert statuses[-1]["content"]["execution_state"] == "idle" and heard.index(callback[0]) < idle_at


def test_tqdm_auto_is_a_widget_progress_bar(kernel):
    result = kernel.execute("from tqdm.auto import tqdm\nfor _ in tqdm(range(50)):\n    pass")
    assert result.status == "ok", result.texts()
    assert any(m.content["target_name"] == "jupyter.widget" for m in result.of_type("comm_open"))
    views = [
        m for m in result.of_type("display_data") if "application/vnd.jupyter.widget-view+json" in m.content["data"]
    ]
    assert views
    assert any(m.msg_type == "comm_msg" for m in result.messages)


def test_text_progress_bars_update_in_place(kernel):
    result = kernel.execute(
        "from tqdm import tqdm\nimport time\nfor _ in tqdm(range(3), mininterval=0):\n    time.sleep(0.05)"
    )
    assert "\r" in result.stderr
    assert "3/3" in result.stderr


def test_matplotlib_inline_png(kernel):
    result = kernel.execute(
        "%matplotlib inline\nimport matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('capsule')\nplt.show()"
    )
    images = [m for m in result.of_type("display_data") if "image/png" in m.content["data"]]
    assert len(images) == 1
    png = base64.b64decode(images[0].content["data"]["image/png"])
    assert png.startswith(b"\x89PNG")


def test_matplotlib_figure_without_show(kernel):
    result = kernel.execute("import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.bar([1, 2], [3, 4]);")
    assert any("image/png" in m.content["data"] for m in result.of_type("display_data"))


def test_frontend_can_close_a_comm(kernel):
    result = kernel.execute(
        "from comm import create_comm\nclosed = []\nlink = create_comm(target_name='capsule.close')\n"
        "link.on_close(lambda msg: closed.append(msg['content']['data']))"
    )
    comm_id = result.of_type("comm_open")[0].content["comm_id"]
    close = kernel.kc.session.msg("comm_close", {"comm_id": comm_id, "data": {"why": "tab closed"}})
    kernel.kc.shell_channel.send(close)
    assert kernel.execute("closed").result_text == "[{'why': 'tab closed'}]"
    assert kernel.request("comm_info", target_name="capsule.close")["content"]["comms"] == {}


def test_frontend_opened_comm_reaches_a_registered_target(kernel):
    kernel.execute(
        "import comm\nopened = []\n"
        "comm.get_comm_manager().register_target('capsule.echo', lambda c, msg: opened.append(msg['content']['data']))"
    )
    opening = kernel.kc.session.msg("comm_open", {"comm_id": "abc123", "target_name": "capsule.echo", "data": {"x": 1}})
    kernel.kc.shell_channel.send(opening)
    assert kernel.execute("opened").result_text == "[{'x': 1}]"
    assert "abc123" in kernel.request("comm_info")["content"]["comms"]


def _settle(kernel) -> None:
    assert kernel.execute("%capsule log -n 1").status == "ok"


def _model_ids(result, model_name: str) -> list[str]:
    return [
        m.content["comm_id"]
        for m in result.of_type("comm_open")
        if m.content["data"]["state"].get("_model_name") == model_name
    ]


def _move(kernel, comm_id: str, value: int) -> dict:
    """The frontend moves a widget: a comm_msg update (returned: its header names it)."""
    update = kernel.kc.session.msg(
        "comm_msg", {"comm_id": comm_id, "data": {"method": "update", "state": {"value": value}, "buffer_paths": []}}
    )
    kernel.kc.shell_channel.send(update)
    return update


def test_widgets_work_again_after_the_sandbox_dies(fresh_kernel):
    """The page keeps its widget models through a sandbox death: the restored widgets answer them again."""
    kernel = fresh_kernel()
    made = kernel.execute(
        "import ipywidgets as widgets\nseen = []\nslider = widgets.IntSlider(value=3)\n"
        "slider.observe(lambda change: seen.append(change['new']), names='value')\nslider"
    )
    (slider_id,) = _model_ids(made, "IntSliderModel")
    _settle(kernel)
    died = kernel.execute("import os; os._exit(1)")
    assert "widgets reconnected to their views: slider" in died.texts(), died.texts()
    _move(kernel, slider_id, 7)  # the view on the page, moved after the crash
    assert kernel.execute("slider.value, seen").result_text == "(7, [7])"
    moved = kernel.execute("slider.value = 11")
    assert any(m.content["comm_id"] == slider_id for m in moved.of_type("comm_msg"))


def test_a_buttons_on_click_works_after_the_sandbox_dies(fresh_kernel):
    kernel = fresh_kernel()
    made = kernel.execute(
        "import ipywidgets as widgets\nclicks = []\nbutton = widgets.Button(description='go')\n"
        "button.on_click(lambda b: clicks.append(b.description))\nbutton"
    )
    (button_id,) = _model_ids(made, "ButtonModel")
    _settle(kernel)
    kernel.execute("import os; os._exit(1)")
    click = kernel.kc.session.msg(
        "comm_msg", {"comm_id": button_id, "data": {"method": "custom", "content": {"event": "click"}}}
    )
    kernel.kc.shell_channel.send(click)
    # The callback runs in the new sandbox and appends to the notebook's own list.
    assert kernel.execute("clicks").result_text == "['go']"


def test_widgets_resumed_in_a_new_kernel_are_opened_again(fresh_kernel, tmp_path):
    """A new kernel's page has no models for them: they are opened again (children first) and named."""
    env = {"CAPSULE_SESSION": f"widgets-{tmp_path.name}"}
    first = fresh_kernel(env=env)
    made = first.execute(
        "import ipywidgets as widgets\nslider = widgets.IntSlider(value=5)\nbox = widgets.VBox([slider])\nbox"
    )
    (slider_id,) = _model_ids(made, "IntSliderModel")
    (box_id,) = _model_ids(made, "VBoxModel")
    _settle(first)
    first.close()

    second = fresh_kernel(env=env)
    resumed = second.execute("%capsule resume")
    assert "widgets opened again: box, slider" in resumed.texts(), resumed.texts()
    assert "display them again" in resumed.texts()
    opened = [m.content for m in resumed.of_type("comm_open") if m.content["target_name"] == "jupyter.widget"]
    order = [c["comm_id"] for c in opened]
    assert order.index(slider_id) < order.index(box_id)  # a box's state names its children: they come first
    box_state = next(c for c in opened if c["comm_id"] == box_id)["data"]["state"]
    assert box_state["children"] == [f"IPY_MODEL_{slider_id}"]
    assert next(c for c in opened if c["comm_id"] == slider_id)["data"]["state"]["value"] == 5
    _move(second, slider_id, 8)
    # One object per model: the box holds the slider the name holds (each name is saved on its own).
    assert second.execute("slider.value, box.children[0] is slider").result_text == "(8, True)"


def test_comm_messages_during_start_up_and_cells_keep_every_parent_apart(fresh_kernel):
    """JupyterLab opens its widget comm while the sandbox starts and Run All sends cells at once.

    Each cell's busy and idle carry its own parent (JupyterLab marks a cell done only
    on its idle), and what a comm message's handling prints carries the comm's.
    Failed before: the idle of the first cell came under the comm_open's parent, and
    the comm_open's error under the comm_msg's.
    """
    kernel = fresh_kernel()
    kc = kernel.kc
    opened = kc.session.msg("comm_open", {"comm_id": "ctl", "target_name": "jupyter.widget.control", "data": {}})
    kc.shell_channel.send(opened)
    cells = [kc.execute("print('cell one')"), kc.execute("print('cell two')")]
    message = kc.session.msg("comm_msg", {"comm_id": "ctl", "data": {"method": "request_states"}})
    kc.shell_channel.send(message)
    names = {opened["header"]["msg_id"]: "comm_open", message["header"]["msg_id"]: "comm_msg"}
    names.update({cells[0]: "cell1", cells[1]: "cell2"})
    seen: list[tuple[str, str, str]] = []

    def idle_twice() -> bool:
        try:
            msg = kc.get_iopub_msg(timeout=0.1)
        except queue.Empty:
            return False
        owner = names.get(msg["parent_header"].get("msg_id"), "?")
        text = msg["content"].get("execution_state") or msg["content"].get("text", "")
        seen.append((owner, msg["msg_type"], text))
        return ("cell2", "status", "idle") in seen

    wait_until(idle_twice, timeout=60, interval=0, what="the second cell's idle")
    for cell in ("cell1", "cell2"):
        assert (cell, "status", "busy") in seen and (cell, "status", "idle") in seen, seen
    streams = {(owner, text) for owner, kind, text in seen if kind == "stream"}
    assert ("cell1", "cell one\n") in streams and ("cell2", "cell two\n") in streams
    assert ("comm_open", "No such comm target registered: jupyter.widget.control\n") in streams, streams
    assert not [text for owner, text in streams if owner.startswith("cell") and "comm" in text]
