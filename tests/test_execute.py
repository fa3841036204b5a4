"""Execute semantics through a real kernel: results, errors, counts, metadata."""

from __future__ import annotations

import sys

import pytest

from tests.harness import plain


def test_kernel_info_describes_capsule_and_python(kernel):
    reply = kernel.request("kernel_info")
    content = reply["content"]
    assert content["implementation"] == "capsule"
    assert content["language_info"]["name"] == "python"
    assert content["language_info"]["version"] == sys.version.split()[0]
    assert content["language_info"]["pygments_lexer"] == "ipython3"
    assert content["language_info"]["codemirror_mode"] == {"name": "ipython", "version": 3}
    assert content["language_info"]["file_extension"] == ".py"
    assert content["language_info"]["mimetype"] == "text/x-python"
    assert "debugger" not in content.get("supported_features", [])
    assert "kernel subshells" in content.get("supported_features", [])  # tests/test_subshells.py
    assert content["help_links"]
    assert "sandbox" in content["banner"]


def test_cells_run_in_another_process_and_keep_state(kernel):
    import os

    pid = kernel.sandbox_pid()
    assert pid != os.getpid()
    assert kernel.execute("shared = [1, 2]").status == "ok"
    result = kernel.execute("shared.append(3); shared")
    assert result.result_text == "[1, 2, 3]"


def test_execute_result_and_counts(kernel):
    first = kernel.execute("40 + 2")
    assert first.result_text == "42"
    count = first.content["execution_count"]
    assert first.of_type("execute_result")[0].content["execution_count"] == count
    second = kernel.execute("'x'")
    assert second.content["execution_count"] == count + 1


def test_error_has_ipython_traceback_and_reply_matches(kernel):
    result = kernel.execute("def f():\n    return 1/0\nf()")
    assert result.status == "error"
    assert result.content["ename"] == "ZeroDivisionError"
    error = result.error
    assert error["ename"] == "ZeroDivisionError"
    joined = plain("\n".join(error["traceback"]))
    assert "f()" in joined and "ZeroDivisionError" in joined


def test_syntax_error_reported_as_ipython_does(kernel):
    result = kernel.execute("def broken(:\n    pass")
    assert result.status == "error"
    assert result.content["ename"] == "SyntaxError"
    assert "SyntaxError" in "\n".join(result.error["traceback"])


def test_silent_execution_has_no_result_and_keeps_the_count(kernel):
    before = kernel.execute("1").content["execution_count"]
    silent = kernel.execute("silent_value = 7\nsilent_value", silent=True)
    assert silent.status == "ok"
    assert silent.of_type("execute_result") == []
    assert silent.of_type("execute_input") == []
    after = kernel.execute("silent_value")
    assert after.result_text == "7"
    assert after.content["execution_count"] == before + 1


def test_store_history_false_does_not_bump_count(kernel):
    before = kernel.execute("1").content["execution_count"]
    quiet = kernel.execute("hidden = 1", store_history=False)
    assert quiet.content["execution_count"] == before  # as IPython answers: the last stored cell's number
    assert kernel.execute("hidden").content["execution_count"] == before + 1


def test_user_expressions_are_evaluated_after_success(kernel):
    result = kernel.execute("ue = 21", user_expressions={"double": "ue * 2", "bad": "1/0"})
    expressions = result.content["user_expressions"]
    assert expressions["double"]["status"] == "ok"
    assert expressions["double"]["data"]["text/plain"] == "42"
    assert expressions["bad"]["status"] == "error"


def test_stop_on_error_aborts_queued_cells(kernel):
    kc = kernel.kc
    failing = kc.execute("raise ValueError('stop here')")
    queued = kc.execute("never_defined_because_aborted = 1")
    assert kernel.shell_reply(failing)["content"]["status"] == "error"
    assert kernel.shell_reply(queued)["content"]["status"] == "aborted"
    kernel.drain_iopub()
    assert kernel.execute("'never_defined_because_aborted' in dir()").result_text == "False"


def test_a_cell_sent_after_an_error_reply_is_never_aborted(kernel):
    """An agent answers an error at once: its next cell runs, as the error is already known.

    kernelbase marks the queue aborting after it sends the error reply, so a request
    that comes back fast can land in the abort window (seen in CI once, after a
    sandbox was killed). Each round also queues a cell behind the failing one, so
    the abort still happens where it should.
    """
    kc = kernel.kc
    for round_ in range(25):
        failing = kc.execute(f"raise ValueError('round {round_}')")
        queued = kc.execute("behind = 1")
        assert kernel.shell_reply(failing)["content"]["status"] == "error"
        after = kc.execute(f"after = {round_}")
        assert kernel.shell_reply(queued)["content"]["status"] == "aborted"
        assert kernel.shell_reply(after)["content"]["status"] == "ok", f"round {round_}"
    kernel.drain_iopub()
    assert kernel.execute("after, 'behind' in dir()").result_text == "(24, False)"


def test_stop_on_error_false_keeps_running(kernel):
    kc = kernel.kc
    failing = kc.execute("raise ValueError('go on')", stop_on_error=False)
    queued = kc.execute("went_on = True")
    assert kernel.shell_reply(failing)["content"]["status"] == "error"
    assert kernel.shell_reply(queued)["content"]["status"] == "ok"
    kernel.drain_iopub()


def test_reply_metadata_says_where_and_how(kernel):
    meta = kernel.execute("import asyncio\nawait asyncio.sleep(0)").metadata["capsule"]
    assert meta["sandbox"] == "subprocess"
    assert meta["mode"] == "top-level-await"
    assert meta["reason"]
    assert meta["duration_ms"] >= 0
    assert kernel.execute("async def g():\n    return 1").metadata["capsule"]["mode"] == "async-def"
    assert kernel.execute("x_sync = 1").metadata["capsule"]["mode"] == "sync"


def test_top_level_await(kernel):
    result = kernel.execute(
        "import asyncio\nasync def answer():\n    await asyncio.sleep(0.01)\n    return 42\nawait answer()"
    )
    assert result.result_text == "42"


def test_rich_display_update_and_clear(kernel):
    code = (
        "from IPython.display import display, HTML, Markdown, clear_output\n"
        "handle = display(HTML('<b>one</b>'), display_id=True)\n"
        "handle.update(HTML('<b>two</b>'))\n"
        "display(Markdown('*md*'))\n"
        "clear_output(wait=True)\n"
    )
    result = kernel.execute(code)
    displays = result.of_type("display_data")
    assert displays[0].content["data"]["text/html"] == "<b>one</b>"
    display_id = displays[0].content["transient"]["display_id"]
    updates = result.of_type("update_display_data")
    assert updates[0].content["transient"]["display_id"] == display_id
    assert updates[0].content["data"]["text/html"] == "<b>two</b>"
    assert displays[1].content["data"]["text/markdown"] == "*md*"
    assert result.of_type("clear_output")[0].content["wait"] is True


def test_ipython_magics_and_pager_payload(kernel):
    assert kernel.execute("%time 1+1").status == "ok"
    result = kernel.execute("len?")
    payload = result.content["payload"]
    assert payload and payload[0]["source"] == "page"
    assert "Return the number of items" in payload[0]["data"]["text/plain"]


def test_set_next_input_payload(kernel):
    result = kernel.execute("get_ipython().set_next_input('print(1)')")
    assert result.content["payload"][0] == {"source": "set_next_input", "text": "print(1)", "replace": False}


def test_vscode_startup_code_runs_silently(kernel):
    """What VS Code's Jupyter extension sends before the first cell."""
    startup = [
        "%config Completer.use_jedi = False",
        "%matplotlib inline",
        "import os as __VSCODE_os\n"
        "__vsc_ipynb_file__ = __VSCODE_os.path.join(__VSCODE_os.getcwd(), 'nb.ipynb')\n"
        "del __VSCODE_os",
        "try:\n    import IPython\n    __VSCODE_ip = IPython.get_ipython()\n"
        "    __VSCODE_ip.__class__.__name__\nexcept Exception:\n    pass",
    ]
    before = kernel.execute("1").content["execution_count"]
    for code in startup:
        result = kernel.execute(code, silent=False, store_history=False)
        assert result.status == "ok", result.texts()
        assert result.error is None
    for code in startup:
        assert kernel.execute(code, silent=True).status == "ok"
    assert kernel.execute("__vsc_ipynb_file__.endswith('nb.ipynb')").content["execution_count"] == before + 1


def test_a_failing_analysis_never_blocks_a_cell(kernel):
    """Odd input the analyzer cannot parse still gets IPython's verdict."""
    result = kernel.execute("x = \x00")
    assert result.status == "error"


@pytest.mark.parametrize("code", ["print('a', flush=True)", "import sys; sys.stderr.write('b')"])
def test_outputs_are_sent_before_the_reply(kernel, code):
    """Rule 4: the kernel sends every output of a cell before its execute_reply.

    iopub and shell are separate sockets, so arrival order at the client proves
    nothing; the send times the kernel stamps in each header do.
    """
    result = kernel.execute(code)
    outputs = result.of_type("stream")
    assert outputs
    reply_sent = result.reply["header"]["date"]
    assert all(m.raw["header"]["date"] <= reply_sent for m in outputs)
