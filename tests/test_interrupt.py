"""Interrupts: KeyboardInterrupt in the cell, the namespace lives."""

from __future__ import annotations

import pytest

from tests.harness import wait_until


def interrupt_once_running(kernel):
    """An on_message hook that interrupts as soon as the cell says it runs."""
    sent: list[bool] = []

    def on_message(message) -> None:
        if message.msg_type == "stream" and "running" in message.content["text"] and not sent:
            sent.append(True)
            kernel.km.interrupt_kernel()

    return on_message


@pytest.mark.parametrize("kernel_name", ["capsule", "capsule-message"])
def test_interrupt_raises_keyboard_interrupt_and_keeps_state(fresh_kernel, kernel_name):
    kernel = fresh_kernel(kernel_name=kernel_name)
    mode = kernel.km.kernel_spec.interrupt_mode
    assert mode == ("signal" if kernel_name == "capsule" else "message")
    kernel.execute("kept = 'alive'")
    pid = kernel.sandbox_pid()
    result = kernel.execute(
        "import time\nprint('running', flush=True)\ntime.sleep(60)",
        on_message=interrupt_once_running(kernel),
        timeout=30,
    )
    assert result.status == "error"
    assert result.content["ename"] == "KeyboardInterrupt"
    assert result.replied - result.started < 20
    assert kernel.execute("kept").result_text == "'alive'"
    assert kernel.sandbox_pid() == pid


def test_interrupting_an_idle_kernel_is_harmless(kernel):
    kernel.execute("idle_state = 5")
    for _ in range(3):
        kernel.km.interrupt_kernel()
    assert kernel.execute("idle_state * 2").result_text == "10"
    assert kernel.km.is_alive()


def test_interrupt_while_waiting_for_input(fresh_kernel):
    kernel = fresh_kernel()
    kernel.execute("kept = 3")
    asked: list[dict] = []

    msg_id = kernel.kc.execute("value = input('never answered: ')", allow_stdin=True)
    import time

    started = time.monotonic()
    request = wait_until(lambda: _stdin_request(kernel), what="the input request")
    asked.append(request)
    kernel.km.interrupt_kernel()
    result = kernel.collect(msg_id, started)
    assert result.status == "error"
    assert result.content["ename"] == "KeyboardInterrupt"
    assert kernel.execute("kept").result_text == "3"


def _stdin_request(kernel):
    import queue

    try:
        return kernel.kc.get_stdin_msg(timeout=0.05)
    except queue.Empty:
        return None


def test_interrupt_reaches_a_shell_command(fresh_kernel):
    kernel = fresh_kernel()
    result = kernel.execute(
        "print('running', flush=True)\n!sleep 60", on_message=interrupt_once_running(kernel), timeout=40
    )
    assert result.replied - result.started < 30
    assert kernel.execute("1 + 1").result_text == "2"


def test_a_second_interrupt_stops_a_cell_that_ignores_the_first(fresh_kernel, tmp_path):
    """Stop, then stop again: the second press ends the sandbox at once; the namespace comes back."""
    (tmp_path / "capsule.toml").write_text('[sandbox]\ninterrupt_grace = "120s"\n')  # only the second press acts
    kernel = fresh_kernel()
    kernel.execute("kept = 'before'")
    pid = kernel.sandbox_pid()
    beats_after_first: list[int] = []

    def on_message(message) -> None:
        text = message.content.get("text", "") if message.msg_type == "stream" else ""
        if "looping" in text and not beats_after_first:
            beats_after_first.append(0)
            kernel.km.interrupt_kernel()
        elif beats_after_first and beats_after_first[0] >= 0:
            beats_after_first[0] += text.count("beat")
            if beats_after_first[0] >= 8:  # the first has had 0.8 s (and the kernel's own repeat) to act
                beats_after_first[0] = -1
                kernel.km.interrupt_kernel()

    result = kernel.execute(
        "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nkept = 'changed'\n"
        "print('looping', flush=True)\nwhile True:\n    print('beat', flush=True)\n    time.sleep(0.1)",
        on_message=on_message,
        timeout=100,
    )
    assert beats_after_first == [-1], "the cell stopped before its second interrupt"
    assert result.status == "error"
    evalue = result.content["evalue"]
    assert "stopped by a second interrupt" in evalue and "what that cell did is lost" in evalue, evalue
    assert "was restored" in evalue, evalue
    assert kernel.execute("kept").result_text == "'before'"
    assert kernel.sandbox_pid() != pid
