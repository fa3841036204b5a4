"""Kernel subshells (JEP 91) through jupyter_client, as JupyterLab's subshell consoles use them.

A subshell's cell runs beside the main shell's, on a thread of the sandbox's
worker, in the one namespace; its outputs carry its request as their parent;
the kernel's interrupt and the wall-clock limit stop it; comm messages and
completion sent on a subshell are handled while the main shell is busy.
The replies are checked against the messaging spec's fields.
"""

from __future__ import annotations

import queue
import time
from typing import Any

import pytest

from tests.harness import DEFAULT_TIMEOUT, ExecResult, KernelHarness, Message, plain, wait_until
from tests.security.test_trust_boundary import FORGE


def create(kernel: KernelHarness) -> str:
    reply = kernel.control("create_subshell_request")
    assert reply["msg_type"] == "create_subshell_reply"
    assert reply["content"]["status"] == "ok"
    assert isinstance(reply["content"]["subshell_id"], str)
    return reply["content"]["subshell_id"]


def send(kernel: KernelHarness, msg_type: str, content: dict[str, Any], subshell_id: str | None) -> str:
    """A shell request addressed to a subshell (None: the main shell); returns its msg_id."""
    msg = kernel.kc.session.msg(msg_type, content)
    msg["header"]["subshell_id"] = subshell_id
    kernel.kc.shell_channel.send(msg)
    return msg["header"]["msg_id"]


def execute(kernel: KernelHarness, code: str, subshell_id: str | None, **content: Any) -> str:
    body = {"code": code, "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False}
    return send(kernel, "execute_request", {**body, **content}, subshell_id)


def collect_many(kernel: KernelHarness, msg_ids: list[str], timeout: float = DEFAULT_TIMEOUT) -> dict[str, ExecResult]:
    """Replies and iopub messages of several requests in flight at once (each until its idle and reply)."""
    results = {msg_id: ExecResult(reply={}) for msg_id in msg_ids}
    idle: set[str] = set()
    deadline = time.monotonic() + timeout
    while not (idle == set(msg_ids) and all(r.reply for r in results.values())):
        if time.monotonic() > deadline:
            raise TimeoutError({m: [x.msg_type for x in r.messages] for m, r in results.items()})
        try:
            reply = kernel.kc.get_shell_msg(timeout=0.01)
            parent = reply["parent_header"].get("msg_id")
            if parent in results:
                results[parent].reply = reply
                results[parent].replied = time.monotonic()
        except queue.Empty:
            pass
        try:
            msg = kernel.kc.get_iopub_msg(timeout=0.01)
        except queue.Empty:
            continue
        parent = msg["parent_header"].get("msg_id")
        if parent not in results:
            continue
        if msg["msg_type"] == "status":
            if msg["content"]["execution_state"] == "idle":
                idle.add(parent)
            continue
        results[parent].messages.append(Message(msg["msg_type"], msg["content"], time.monotonic(), msg))
    return results


def run(kernel: KernelHarness, code: str, subshell_id: str | None, timeout: float = DEFAULT_TIMEOUT) -> ExecResult:
    msg_id = execute(kernel, code, subshell_id)
    return collect_many(kernel, [msg_id], timeout)[msg_id]


@pytest.fixture
def subshell_kernel(fresh_kernel):
    kernel = fresh_kernel()
    yield kernel


def test_subshells_are_advertised_created_listed_and_deleted_as_the_spec_says(subshell_kernel):
    kernel = subshell_kernel
    info = kernel.request("kernel_info")
    assert "kernel subshells" in info["content"]["supported_features"]
    listed = kernel.control("list_subshell_request")
    assert listed["msg_type"] == "list_subshell_reply"
    assert listed["content"] == {"status": "ok", "subshell_id": []}
    threads = int(run(kernel, "import threading; print(threading.active_count())", None).stdout)
    first, second = create(kernel), create(kernel)
    assert first != second
    assert sorted(kernel.control("list_subshell_request")["content"]["subshell_id"]) == sorted([first, second])
    # Each subshell is a thread of the sandbox's worker, as of ipykernel's kernel process.
    wait_until(
        lambda: int(run(kernel, "print(threading.active_count())", None).stdout) == threads + 2,
        what="two more threads in the sandbox",
    )
    shown = plain(run(kernel, "%subshell", first).stdout)
    assert f"subshell id: {first}" in shown
    assert first in shown.split("subshell list:")[1] and second in shown.split("subshell list:")[1]
    assert "subshell id: None" in plain(run(kernel, "%subshell", None).stdout)
    deleted = kernel.control("delete_subshell_request", {"subshell_id": first})
    assert deleted["msg_type"] == "delete_subshell_reply"
    assert deleted["content"]["status"] == "ok"
    assert kernel.control("list_subshell_request")["content"]["subshell_id"] == [second]
    wait_until(
        lambda: int(run(kernel, "print(threading.active_count())", None).stdout) == threads + 1,
        what="the deleted subshell's thread to end",
    )
    # A request to a subshell that is gone is answered with an error, as ipykernel answers it.
    gone = kernel.shell_reply(execute(kernel, "1", first))
    assert gone["content"]["status"] == "error"


def test_a_subshell_runs_beside_the_main_shell_in_the_same_namespace(subshell_kernel):
    kernel = subshell_kernel
    subshell = create(kernel)
    assert run(kernel, "import threading\nmeet = threading.Barrier(2, timeout=30)", None).status == "ok"
    # A barrier of two opens only if both cells run at the same time.
    main = execute(kernel, "meet.wait()\nprint('main passed')\nseen_by_main = made_in_subshell", None)
    side = execute(
        kernel,
        "made_in_subshell = 'from the subshell'\nmeet.wait()\nprint('subshell passed')\n"
        "import threading\nthreading.current_thread() is threading.main_thread()",
        subshell,
    )
    results = collect_many(kernel, [main, side])
    assert results[main].status == "ok", results[main].texts()
    assert results[side].status == "ok", results[side].texts()
    # Each cell's output belongs to its own request: nothing of one shows in the other.
    assert results[main].stdout == "main passed\n"
    assert results[side].stdout == "subshell passed\n"
    assert results[side].result_text == "False"  # not the main thread
    for message in results[side].messages:
        assert message.raw["parent_header"]["subshell_id"] == subshell
    # The subshell counts its own cells; the main shell's count goes on undisturbed.
    assert results[side].content["execution_count"] == 1
    assert results[side].of_type("execute_input")[0].content["execution_count"] == 1
    assert results[side].of_type("execute_result")[0].content["execution_count"] == 1
    again = run(kernel, "seen_by_main", None)
    assert again.result_text == "'from the subshell'"
    assert again.content["execution_count"] == results[main].content["execution_count"] + 1
    assert run(kernel, "2 + 2", subshell).content["execution_count"] == 2


def test_errors_displays_and_stop_on_error_stay_in_their_subshell(subshell_kernel):
    kernel = subshell_kernel
    subshell = create(kernel)
    # Top-level await runs on the subshell's own loop, as in ipykernel's test of the same.
    failing = execute(kernel, "import asyncio\nawait asyncio.sleep(0.5)\n1/0", subshell)
    aborted = execute(kernel, "print('never')", subshell)
    main = execute(kernel, "from IPython.display import display, HTML\ndisplay(HTML('<b>main</b>'))", None)
    results = collect_many(kernel, [failing, aborted, main])
    assert results[failing].status == "error"
    assert results[failing].error["ename"] == "ZeroDivisionError"
    assert results[aborted].status == "aborted"
    assert "never" not in results[aborted].texts()
    assert results[main].status == "ok"
    assert results[main].of_type("display_data")[0].content["data"]["text/html"] == "<b>main</b>"
    assert not results[main].of_type("error")
    # The abort is over: the subshell's next cell runs.
    assert run(kernel, "print('after')", subshell).stdout == "after\n"


def test_interrupt_stops_a_subshells_cell_and_the_namespace_survives(subshell_kernel):
    kernel = subshell_kernel
    subshell = create(kernel)
    run(kernel, "kept = 'here'", None)
    pid = kernel.sandbox_pid()
    spinning = execute(kernel, "spins = 0\nwhile True:\n    spins += 1", subshell)
    wait_until(lambda: "spins" in run(kernel, "print(list(globals()))", None).stdout, what="the loop to start")
    kernel.km.interrupt_kernel()
    result = collect_many(kernel, [spinning], timeout=30)[spinning]
    assert result.status == "error"
    assert result.error["ename"] == "KeyboardInterrupt"
    assert run(kernel, "kept", None).result_text == "'here'"
    assert kernel.sandbox_pid() == pid  # the same sandbox: nothing was killed
    spins = int(run(kernel, "print(spins)", None).stdout)
    assert int(run(kernel, "print(spins)", None).stdout) == spins  # the loop stopped


def test_the_wall_clock_limit_stops_a_subshells_cell(subshell_kernel):
    kernel = subshell_kernel
    subshell = create(kernel)
    assert run(kernel, "%capsule limits --timeout 2s", None).status == "ok"
    pid = kernel.sandbox_pid()
    result = run(kernel, "ticks = 0\nwhile True:\n    ticks += 1", subshell, timeout=30)
    assert result.status == "error"
    assert result.error["ename"] == "CellTimeout", result.texts()
    assert "wall-clock limit of 2 s" in result.error["evalue"]
    ticks = int(run(kernel, "print(ticks)", None).stdout)
    assert int(run(kernel, "print(ticks)", None).stdout) == ticks  # stopped, not still counting
    assert kernel.sandbox_pid() == pid


@pytest.mark.slow
def test_a_subshells_cell_blocked_past_its_limit_takes_the_sandbox_down_not_the_kernel(subshell_kernel):
    kernel = subshell_kernel
    subshell = create(kernel)
    run(kernel, "kept = 'saved'", None)
    assert run(kernel, "%capsule log -n 1", None).status == "ok"  # its checkpoint is recorded
    assert run(kernel, "%capsule limits --timeout 2s", None).status == "ok"
    pid = kernel.sandbox_pid()
    # time.sleep blocks in C: an asynchronous exception cannot reach it until it returns.
    result = run(kernel, "import time\ntime.sleep(600)", subshell, timeout=60)
    assert result.status == "error"
    assert result.error["ename"] == "SandboxDied", result.texts()
    assert "did not stop" in result.error["evalue"]
    wait_until(lambda: not _alive(pid), what="the blocked sandbox to be gone")
    assert run(kernel, "kept", None).result_text == "'saved'"  # a fresh sandbox, restored
    assert kernel.sandbox_pid() != pid


def _alive(pid: int) -> bool:
    from capsule_kernel.protocol.deaths import process_exists

    return process_exists(pid)


def test_deleting_a_busy_subshell_stops_its_cell(subshell_kernel):
    kernel = subshell_kernel
    subshell = create(kernel)
    execute(kernel, "laps = 0\nwhile True:\n    laps += 1", subshell)
    wait_until(lambda: "laps" in run(kernel, "print(list(globals()))", None).stdout, what="the loop to start")
    assert kernel.control("delete_subshell_request", {"subshell_id": subshell})["content"]["status"] == "ok"

    def stopped() -> bool:
        first = run(kernel, "print(laps)", None).stdout
        return first == run(kernel, "print(laps)", None).stdout

    wait_until(stopped, what="the deleted subshell's loop to stop")


def test_completion_and_comms_on_a_subshell_are_answered_while_the_main_shell_is_busy(subshell_kernel):
    kernel = subshell_kernel
    widgets = create(kernel)
    opened = run(kernel, "import ipywidgets as w\nslider = w.IntSlider(value=1)\nslider", None)
    comm_id = next(
        m.content["comm_id"]
        for m in opened.of_type("comm_open")
        if m.content["data"]["state"].get("_model_name") == "IntSliderModel"
    )
    waiting = execute(
        kernel,
        "import time\nstart = time.monotonic()\n"
        "while slider.value != 9 and time.monotonic() - start < 30:\n    time.sleep(0.02)\n"
        "print('slider at', slider.value)",
        None,
    )
    # The main shell is busy in that loop: the subshell answers completion meanwhile...
    completing = send(kernel, "complete_request", {"code": "slid", "cursor_pos": 4}, widgets)
    reply = kernel.shell_reply(completing, timeout=20)
    assert "slider" in reply["content"]["matches"]
    # ...and takes the frontend's widget update, which the running cell then sees.
    update = {"comm_id": comm_id, "data": {"method": "update", "state": {"value": 9}, "buffer_paths": []}}
    send(kernel, "comm_msg", update, widgets)
    result = collect_many(kernel, [waiting])[waiting]
    assert result.stdout == "slider at 9\n"


def test_what_waits_on_the_kernel_is_refused_on_a_subshell_with_a_clear_error(subshell_kernel):
    kernel = subshell_kernel
    subshell = create(kernel)
    magic = run(kernel, "%capsule status", subshell)
    assert magic.status == "error"
    # IPython shows a UsageError as one line on stderr, without a traceback (as on the main shell).
    assert "not available in a subshell" in magic.content["evalue"]
    assert "UsageError: %capsule is not available in a subshell" in magic.stderr
    asked = run(kernel, "input('name? ')", subshell)
    assert asked.error["ename"] == "StdinNotImplementedError"
    assert "subshell" in asked.error["evalue"]
    assert run(kernel, "print('still fine')", subshell).stdout == "still fine\n"


def test_the_wasm_mode_refuses_subshells_clearly(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_MODE": "wasm"})
    subshell = create(kernel)
    result = run(kernel, "x = 1", subshell)
    assert result.status == "error"
    assert result.error["ename"] == "SubshellUnavailable"
    assert "Wasm" in result.error["evalue"]
    assert run(kernel, "print('main works')", None).stdout == "main works\n"


# -- attacks from inside the sandbox ----------------------------------------------------


def test_output_for_a_subshell_the_sandbox_was_never_given_is_a_violation(subshell_kernel):
    """Fails without the check in SandboxProcess._dispatch: the forged text was published (checked)."""
    kernel = subshell_kernel
    kernel.execute("kept = 'before'")
    assert kernel.execute("%capsule log -n 1").status == "ok"
    published: list[str] = []
    attack = kernel.execute(
        FORGE + "forge({'type': 'stream', 'name': 'stdout', 'text': 'FORGED-OUTPUT', 'subshell': 7})\n"
        "import time\nfor _ in range(300):\n    time.sleep(0.1)",
        on_any=lambda msg: published.append(msg["msg_type"] + str(msg["content"])),
    )
    assert attack.content["ename"] == "SandboxProtocolError", attack.texts()
    assert "subshell 7" in attack.content["evalue"]
    # Nothing on iopub carried it, under any parent.
    outputs = [text for text in published if not text.startswith("execute_input")]
    assert outputs and not [text for text in outputs if "FORGED-OUTPUT" in text]
    assert kernel.execute("kept").result_text == "'before'"


def test_a_forged_subshell_done_answers_no_cell(subshell_kernel):
    """A 'subshell_done' for a subshell whose cell is not running ends the sandbox; no reply is forged."""
    kernel = subshell_kernel
    subshell = create(kernel)
    assert run(kernel, "1", subshell).status == "ok"  # subshell 1 exists in this sandbox, idle
    kernel.execute("kept = 'before'")
    assert kernel.execute("%capsule log -n 1").status == "ok"
    forged_reply = {"status": "ok", "execution_count": 99, "user_expressions": {}, "payload": []}
    attack = kernel.execute(
        FORGE + f"forge({{'type': 'subshell_done', 'subshell': 1, 'reply': {forged_reply!r}}})\n"
        "import time\nfor _ in range(300):\n    time.sleep(0.1)"
    )
    assert attack.content["ename"] == "SandboxProtocolError", attack.texts()
    assert "ran no cell" in attack.content["evalue"]
    assert kernel.execute("kept").result_text == "'before'"
    assert run(kernel, "2", subshell).content["execution_count"] == 2  # the count was not forged


def test_what_a_subshell_changed_in_place_is_in_the_main_shells_next_checkpoint(subshell_kernel):
    """A large value changed in place on a subshell is looked at by the next checkpoint, though no cell named it.

    Failed before the kernel passed the subshell's names on: the checkpoint skipped
    the unchanged-looking 8 MB array, and after a crash it came back all zeros.
    """
    kernel = subshell_kernel
    subshell = create(kernel)
    run(kernel, "import numpy as np\nbig = np.zeros(10**6)", None)
    assert run(kernel, "%capsule log -n 1", None).status == "ok"  # big is checkpointed, zeros
    assert run(kernel, "big[0] = 42.0", subshell).status == "ok"
    run(kernel, "unrelated = 1", None)
    assert run(kernel, "%capsule log -n 1", None).status == "ok"
    died = run(kernel, "import os\nos._exit(1)", None)
    assert died.error["ename"] == "SandboxDied"
    assert run(kernel, "print(big[0], unrelated)", None).stdout == "42.0 1\n"
