"""Live output and input(): what a person watching the notebook sees."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_stdout_streams_while_the_cell_runs(kernel):
    """A line a second shows up a line a second, not all at the end."""
    code = "import time\nfor i in range(4):\n    print('tick', i)\n    time.sleep(1)"
    result = kernel.execute(code)
    ticks = [m for m in result.of_type("stream") if "tick" in m.content["text"]]
    assert len(ticks) >= 3, [m.content for m in result.of_type("stream")]
    first_tick = ticks[0].received
    assert result.replied - first_tick > 2.0
    assert result.stdout == "".join(f"tick {i}\n" for i in range(4))


def test_stdout_and_stderr_are_separate_streams(kernel):
    result = kernel.execute("import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"


def test_output_written_below_python_reaches_the_notebook(kernel):
    """C extensions and shell commands write to the raw descriptors."""
    result = kernel.execute("import os\nos.write(1, b'raw-out\\n')\nos.write(2, b'raw-err\\n')")
    assert "raw-out" in result.stdout
    assert "raw-err" in result.stderr
    shell = kernel.execute("!echo from-the-shell")
    assert "from-the-shell" in shell.stdout


def test_a_line_written_below_python_in_pieces_arrives_as_one_message(kernel):
    """faulthandler (a crash's stack) writes each line in pieces: a line is never split across messages.

    Fails without the line buffering of the raw pipes (checked): three messages.
    """
    code = (
        "import os, time\n"
        "for piece in (b'  File \"cell\", ', b'line 3 ', b'in <module>\\n'):\n"
        "    os.write(2, piece)\n"
        "    time.sleep(0.02)\n"
    )
    result = kernel.execute(code)
    lines = [m.content["text"] for m in result.of_type("stream") if m.content["name"] == "stderr"]
    assert lines == ['  File "cell", line 3 in <module>\n'], lines
    partial = kernel.execute("import os\nos.write(1, b'a prompt without a line end: ')")
    assert partial.stdout == "a prompt without a line end: "  # still shown, a moment later


def test_many_small_writes_arrive_complete_and_in_order(kernel):
    result = kernel.execute("for i in range(5000):\n    print(i)")
    assert result.stdout == "".join(f"{i}\n" for i in range(5000))
    # Coalesced into far fewer messages than writes.
    assert len(result.of_type("stream")) < 2000


def test_output_order_between_prints_and_displays(kernel):
    result = kernel.execute("from IPython.display import display\nprint('before')\ndisplay('shown')\nprint('after')")
    kinds = [
        (m.msg_type, m.content.get("text") or m.content.get("data", {}).get("text/plain"))
        for m in result.messages
        if m.msg_type in ("stream", "display_data")
    ]
    assert kinds == [("stream", "before\n"), ("display_data", "'shown'"), ("stream", "after\n")]


def test_input_goes_through_the_stdin_channel(kernel):
    prompts = []

    def answer(request):
        prompts.append(request)
        return "Ada"

    result = kernel.execute("name = input('Your name? ')\nprint('hello', name)", stdin_answer=answer)
    assert result.status == "ok"
    assert prompts[0]["prompt"] == "Your name? "
    assert prompts[0]["password"] is False
    assert "hello Ada" in result.stdout


def test_getpass_asks_for_a_password(kernel):
    prompts = []

    def answer(request):
        prompts.append(request)
        return "s3cret"

    result = kernel.execute("import getpass\nsecret = getpass.getpass('Key: ')\nlen(secret)", stdin_answer=answer)
    assert result.result_text == "6"
    assert prompts[0]["password"] is True


def test_input_without_stdin_support_fails_clearly(kernel):
    result = kernel.execute("input('x')", allow_stdin=False)
    assert result.status == "error"
    assert result.content["ename"] == "StdinNotImplementedError"
    assert "does not support input requests" in result.content["evalue"]
