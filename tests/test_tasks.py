"""%%capsule task through real kernels: results, envelopes, retries, exactly once, background, cancel."""

from __future__ import annotations

import json
import time

import jsonschema
import pytest

from capsule_kernel.kernel.tasks.envelope import schema
from tests.harness import wait_until

pytestmark = pytest.mark.slow


def envelope_of(result) -> dict:
    for message in result.of_type("display_data") + result.of_type("update_display_data"):
        data = message.content["data"]
        if "application/json" in data and "execution" in data["application/json"]:
            return data["application/json"]
    raise AssertionError(f"no envelope in:\n{result.texts()}")


def valid(envelope: dict) -> dict:
    jsonschema.validate(envelope, schema())
    return envelope


def test_a_task_runs_in_a_fresh_sandbox_and_binds_its_result(kernel):
    kernel.execute("base = 40")
    notebook_pid = kernel.sandbox_pid()
    result = kernel.execute("%%capsule task answer --sandbox subprocess\nimport os\npid = os.getpid()\nbase + 2")
    assert result.status == "ok", result.texts()
    envelope = valid(envelope_of(result))
    assert envelope["success"] and envelope["result"] == 42
    assert envelope["execution"]["sandbox"] == "subprocess" and envelope["execution"]["retries"] == 0
    assert kernel.execute("answer").result_text == "42"
    # It ran elsewhere: the notebook's sandbox is the same process, and the task's names did not leak.
    assert kernel.sandbox_pid() == notebook_pid
    assert "NameError" in kernel.execute("pid").texts()
    seen = kernel.execute("from capsule_kernel.tasks import envelope\nenvelope('answer')['result']")
    assert seen.result_text == "42"


def test_a_top_level_return_and_a_wasm_default(kernel):
    result = kernel.execute("%%capsule task squares\nout = [i * i for i in range(5)]\nif out:\n    return out\n1/0")
    envelope = valid(envelope_of(result))
    assert envelope["success"], result.texts()
    assert envelope["execution"]["sandbox"] == "wasm"  # pure Python: Wasm by default
    assert envelope["result"] == [0, 1, 4, 9, 16]
    assert envelope["execution"]["fuel_consumed"] > 0
    assert kernel.execute("squares").result_text == "[0, 1, 4, 9, 16]"


def test_a_failing_task_raises_task_failed_and_leaves_the_namespace(kernel):
    kernel.execute("keep = 'mine'")
    body = "keep = 'overwritten'\nraise ValueError('bad input')"
    result = kernel.execute(f"%%capsule task broken --sandbox subprocess\n{body}")
    assert result.status == "error"
    assert result.content["ename"] == "TaskFailed"
    assert "(exception): ValueError: bad input" in result.content["evalue"]
    envelope = valid(envelope_of(result))
    assert envelope["error"]["type"] == "exception"
    assert any("bad input" in line for line in envelope["error"]["traceback"])
    assert kernel.execute("keep").result_text == "'mine'"
    assert "NameError" in kernel.execute("broken").texts()


def test_a_crashing_and_a_looping_task_never_touch_the_notebook(kernel):
    kernel.execute("safe = [1, 2, 3]")
    pid = kernel.sandbox_pid()
    crash = kernel.execute("%%capsule task boom --sandbox subprocess\nimport os\nos.kill(os.getpid(), 9)")
    envelope = valid(envelope_of(crash))
    assert envelope["error"]["type"] == "crash", envelope
    loop = kernel.execute("%%capsule task spin --sandbox subprocess --timeout 1s\nwhile True:\n    pass")
    envelope = valid(envelope_of(loop))
    assert envelope["error"]["type"] == "timeout", envelope
    assert kernel.sandbox_pid() == pid
    assert kernel.execute("safe").result_text == "[1, 2, 3]"


def test_retries_are_counted_and_backed_off(kernel):
    # A subprocess task sees the notebook's working directory, as its cells do.
    kernel.execute("open('tries', 'w').close()")
    code = (
        "%%capsule task flaky --sandbox subprocess --retries 2 --backoff 0.2s --retry-on exception\n"
        "from pathlib import Path\np = Path('tries')\np.write_text(p.read_text() + 'x')\n"
        "if len(p.read_text()) < 3:\n    raise RuntimeError('not yet')\nlen(p.read_text())"
    )
    started = time.monotonic()
    result = kernel.execute(code)
    elapsed = time.monotonic() - started
    envelope = valid(envelope_of(result))
    assert envelope["success"], result.texts()
    assert envelope["result"] == 3
    execution = envelope["execution"]
    assert execution["retries"] == 2
    assert [a["error_type"] for a in execution["attempts"]] == ["exception", "exception", None]
    assert elapsed >= 0.1 + 0.2  # two backoffs: at least half of 0.2 s and of 0.4 s (jitter)


def test_exactly_once_per_key_and_rerun(kernel):
    kernel.execute("open('runs', 'w').close()")
    body = "from pathlib import Path\np = Path('runs')\np.write_text(p.read_text() + 'x')\n21 * 2"
    runs = "open('runs').read()"
    first = kernel.execute(f"%%capsule task once --sandbox subprocess\n{body}")
    assert not valid(envelope_of(first))["execution"]["cached"]
    again = kernel.execute(f"%%capsule task once --sandbox subprocess\n{body}")
    envelope = valid(envelope_of(again))
    assert envelope["execution"]["cached"] and envelope["result"] == 42
    assert kernel.execute(runs).result_text == "'x'"  # it did not run again
    assert kernel.execute("once").result_text == "42"
    rerun = kernel.execute(f"%%capsule task once --sandbox subprocess --rerun\n{body}")
    assert not valid(envelope_of(rerun))["execution"]["cached"]
    assert kernel.execute(runs).result_text == "'xx'"


def test_inputs_are_copied_and_a_missing_one_is_named(kernel):
    kernel.execute("import collections\nwords = collections.Counter('hello')")
    result = kernel.execute("%%capsule task top --sandbox subprocess\nwords.most_common(1)[0][0]")
    assert valid(envelope_of(result))["result"] == "l"
    missing = kernel.execute("%%capsule task needs --in nowhere\nnowhere + 1")
    envelope = valid(envelope_of(missing))
    assert envelope["error"]["type"] == "input" and "nowhere" in envelope["error"]["message"]


def test_a_wasm_task_refuses_a_native_import(kernel):
    result = kernel.execute("%%capsule task native --sandbox wasm\nimport numpy\nnumpy.zeros(3)")
    assert result.status == "error" and result.content["ename"] == "TaskFailed"
    envelope = valid(envelope_of(result))
    assert envelope["error"]["type"] == "refused" and "numpy" in envelope["error"]["message"]
    assert envelope["execution"]["attempts"] == []  # nothing ran


def test_fuel_memory_and_cpu_failures_are_named(kernel):
    fuel = kernel.execute("%%capsule task burn --sandbox wasm --compute low\nwhile True:\n    pass")
    assert valid(envelope_of(fuel))["error"]["type"] == "fuel", fuel.texts()
    memory = kernel.execute("%%capsule task hog --sandbox subprocess --memory 300MB\nb = bytearray(2 * 1024**3)")
    assert valid(envelope_of(memory))["error"]["type"] == "memory", memory.texts()
    cpu = kernel.execute("%%capsule task spin2 --sandbox subprocess --cpu 1s\nwhile True:\n    pass")
    assert valid(envelope_of(cpu))["error"]["type"] == "cpu", cpu.texts()


def test_an_id_keys_the_task_and_a_handle_is_awaitable(kernel):
    first = kernel.execute("%%capsule task keyed --id job-1\n'first'")
    assert valid(envelope_of(first))["result"] == "first"
    other_body = kernel.execute("%%capsule task keyed --id job-1\n'second'")
    assert valid(envelope_of(other_body))["execution"]["cached"]  # the same id: the same task
    assert kernel.execute("keyed").result_text == "'first'"
    awaited = kernel.execute(
        "from capsule_kernel.tasks import task\n@task\ndef inc(x):\n    return x + 1\nawait inc.submit(1)"
    )
    assert awaited.result_text == "2", awaited.texts()


def test_a_progress_bar_in_a_background_task_streams_into_its_display(kernel):
    body = "from tqdm.auto import tqdm\nimport time\nfor i in tqdm(range(5)):\n    time.sleep(0.2)\n5"
    started = kernel.execute(f"%%capsule task bar --sandbox subprocess --background\n{body}")
    (display,) = started.of_type("display_data")
    display_id = display.content["transient"]["display_id"]
    updates: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any("succeeded" in text for text in updates):
        try:
            msg = kernel.kc.get_iopub_msg(timeout=0.5)
        except Exception:  # noqa: BLE001 - queue.Empty: keep waiting until the deadline
            continue
        if msg["msg_type"] == "update_display_data" and msg["content"]["transient"]["display_id"] == display_id:
            updates.append(msg["content"]["data"]["text/plain"])
    final = updates[-1]
    assert "task bar, succeeded" in final
    assert "100%" in final and "5/5" in final  # tqdm drew as text, its last state kept
    assert any("running" in text for text in updates[:-1])  # the live status line before the end
    assert kernel.execute("bar").result_text == "5"


def test_background_tasks_bind_between_cells_and_respect_max_parallel(fresh_kernel, tmp_path):
    (tmp_path / "capsule.toml").write_text("[tasks]\nmax_parallel = 1\nwarm = 0\n")
    kernel = fresh_kernel(cwd=tmp_path)
    (tmp_path / "marks").mkdir()
    for n in range(2):
        body = (
            f"import os, time\nopen('marks/start-{n}', 'w').close()\n"
            f"busy = len(os.listdir('marks'))\ntime.sleep(0.5)\nos.remove('marks/start-{n}')\nbusy"
        )
        reply = kernel.execute(f"%%capsule task bg{n} --sandbox subprocess --background\n{body}")
        assert reply.status == "ok", reply.texts()
        assert reply.of_type("display_data"), "a live status line"
    waited = kernel.execute("%capsule task wait")
    envelopes = [m.content["data"]["application/json"] for m in waited.of_type("display_data")]
    assert [e["result"] for e in envelopes] == [1, 1]  # never two at once
    assert kernel.execute("bg0 + bg1").result_text == "2"
    listing = kernel.execute("%capsule tasks").texts()
    assert "bg0" in listing and "succeeded" in listing


def test_cancel_a_background_task(kernel):
    kernel.execute("%%capsule task slow --sandbox subprocess --background\nimport time\ntime.sleep(60)")
    wait_until(lambda: "running" in kernel.execute("%capsule tasks").texts(), timeout=30)
    assert "cancelled" in kernel.execute("%capsule task cancel slow").texts()
    envelope = kernel.execute("from capsule_kernel.tasks import envelope\nenvelope('slow')['error']['type']")
    assert envelope.result_text == "'cancelled'"


def test_bad_task_options_are_one_line_usage_errors(kernel):
    result = kernel.execute("%%capsule task x --compute huge\n1")
    assert result.content["ename"] == "UsageError" and "--compute" in result.content["evalue"]
    result = kernel.execute("%%capsule task 1bad\n1")
    assert result.content["ename"] == "UsageError"
    assert json.dumps(kernel.execute("1 + 1").result_text) == '"2"'


def test_a_task_mount_within_the_operators_policy(fresh_kernel, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "n.txt").write_text("7")
    refused = fresh_kernel(cwd=tmp_path).execute(f"%%capsule task n --sandbox wasm --mount {data}\n1")
    assert refused.content["ename"] == "UsageError" and "fs_access" in refused.content["evalue"]
    kernel = fresh_kernel(env={"CAPSULE_NOTEBOOK_MAY_WIDEN": "mounts"}, cwd=tmp_path)
    body = f"int(open({str(data / 'n.txt')!r}).read())"
    result = kernel.execute(f"%%capsule task n --sandbox wasm --mount {data}\n{body}")
    assert valid(envelope_of(result))["result"] == 7


def test_the_task_decorator_call_submit_map_and_failure(kernel):
    kernel.execute(
        "from capsule_kernel.tasks import task, TaskFailed\n"
        "@task(timeout='30s', retries=1)\n"
        "def double(x):\n    import os\n    return (x * 2, os.getpid())\n"
        "@task(sandbox='wasm', compute='low')\n"
        "def fails(x):\n    raise KeyError(x)"
    )
    pid = kernel.sandbox_pid()
    value = kernel.execute("double(21)")
    assert value.status == "ok", value.texts()
    assert kernel.execute("double(21)[0]").result_text == "42"
    assert kernel.execute(f"double(1)[1] != {pid}").result_text == "True"  # another process
    assert kernel.execute("double.map([1, 2, 3])").result_text.startswith("[(2,")
    assert kernel.execute("[v for v, _ in double.map([1, 2, 3])]").result_text == "[2, 4, 6]"
    handle = kernel.execute("h = double.submit(5)\nh.result()[0]")
    assert handle.result_text == "10"
    assert kernel.execute("h.envelope['execution']['sandbox']").result_text == "'subprocess'"
    failed = kernel.execute("try:\n    fails('k')\nexcept TaskFailed as e:\n    err = e.envelope['error']\nerr['type']")
    assert failed.result_text == "'exception'", failed.texts()
    assert "KeyError" in kernel.execute("err['message']").result_text


def test_task_api_options_are_checked_by_the_kernel(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_MEMORY": "1GB"})
    kernel.execute("from capsule_kernel.tasks import task\n@task(memory='8GB')\ndef big():\n    return 1")
    refused = kernel.execute("big()")
    assert refused.status == "error" and "above the operator's" in refused.texts()
    # A forged frame asking for a mount or an unknown option is refused too.
    forged = kernel.execute(
        "from capsule_kernel.inside import tasks\n"
        "tasks._kernel('submit', {'name': 'x', 'payload': 'AA==', 'options': {'mount': ['/']}})"
    )
    assert forged.status == "error" and "unknown @task option" in forged.texts()
    injected = kernel.execute(
        "from capsule_kernel.inside import tasks\n"
        "tasks._kernel('submit', {'name': 'x', 'payload': \"')\\nimport os\\n#\", 'options': {}})"
    )
    assert injected.status == "error" and "not base64" in injected.texts()


def test_a_record_written_without_a_spec_keeps_the_stored_one(tmp_path):
    """A queued task's code lives in its record (spilled): later state changes must not lose it."""
    from capsule_kernel.kernel.checkpoint.task_records import TaskRecords

    records = TaskRecords(tmp_path)
    spec = {"name": "t", "code": "x = 1\n" * 1000}
    records.put("k", session="s", name="t", state="queued", kernel="a", spec=spec)
    records.put("k", session="s", name="t", state="running", kernel="a", spec=None)
    records.put("k", session="s", name="t", state="succeeded", kernel="a", spec=None, envelope={"ok": True})
    kept = records.get("k")
    assert kept is not None and kept.spec == spec and kept.state == "succeeded"
    records.close()
