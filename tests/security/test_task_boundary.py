"""Attacks on tasks from inside sandboxes: forged results, Wasm-made payloads, tampered records.

Each asserts the attack's effect did not happen (a file not written, a value
not taken), not only a status.
"""

from __future__ import annotations

import os
import signal
import sqlite3

import pytest

from tests.harness import wait_until

pytestmark = pytest.mark.slow

REDUCE_PAYLOAD = (
    "class Payload:\n"
    "    def __reduce__(self):\n"
    "        return (exec, (\"open('{marker}', 'w').write('ran')\",))\n"
    "Payload()"
)


def test_a_wasm_made_reduce_payload_never_runs_in_the_notebooks_sandbox(fresh_kernel, tmp_path):
    kernel = fresh_kernel(cwd=tmp_path)
    marker = tmp_path / "pwned"
    result = kernel.execute(f"%%capsule task evil --sandbox wasm\n{REDUCE_PAYLOAD.format(marker=marker)}")
    assert "was not bound to evil" in result.texts(), result.texts()
    assert "data" in result.texts()  # it may cross only as data
    assert not marker.exists()
    assert "NameError" in kernel.execute("evil").texts()
    # Through the @task API too: the value returned to the calling cell loads as data only.
    body = REDUCE_PAYLOAD.format(marker=marker).replace("\n", "\n    ").replace("    Payload()", "    return Payload()")
    kernel.execute(f"from capsule_kernel.tasks import task\n@task(sandbox='wasm')\ndef evil2():\n    {body}")
    called = kernel.execute("evil2()")
    assert called.status == "error" and "data" in called.texts(), called.texts()
    assert not marker.exists()


def test_a_result_forged_during_the_body_is_not_taken(kernel):
    forged = (
        "display({'application/vnd.capsule.task-result+json': {'json': 999, 'type': 'int', 'repr': '999'}}, raw=True)\n"
        "1"
    )
    for sandbox in ("subprocess", "wasm"):
        result = kernel.execute(f"%%capsule task honest_{sandbox} --sandbox {sandbox}\n{forged}")
        assert result.status == "ok", result.texts()
        assert kernel.execute(f"honest_{sandbox}").result_text == "1"


def test_a_tampered_task_record_is_refused_and_the_task_runs_again(fresh_kernel, tmp_path):
    home = tmp_path / "home"
    env = {"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "tampered.ipynb"}
    kernel = fresh_kernel(env=env, cwd=tmp_path)
    cell = "%%capsule task value --sandbox subprocess\n6 * 7"
    assert kernel.execute(cell).status == "ok"
    with sqlite3.connect(home / "tasks.sqlite") as db:
        (envelope,) = db.execute("SELECT envelope FROM tasks WHERE name = 'value'").fetchone()
        db.execute("UPDATE tasks SET envelope = ? WHERE name = 'value'", (envelope.replace("42", "666"),))
    again = kernel.execute(cell)
    assert "authentication code" in again.texts()
    assert kernel.execute("value").result_text == "42"


def test_a_task_interrupted_by_the_kernels_death_is_shown_and_resumed(fresh_kernel, tmp_path):
    home = tmp_path / "home"
    env = {"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "interrupted.ipynb"}
    first = fresh_kernel(env=env, cwd=tmp_path)
    first.execute("seed = 5")
    first.execute(
        "%%capsule task late --sandbox subprocess --background\n"
        "import time, pathlib\nif not pathlib.Path('second').exists():\n    time.sleep(120)\nseed * 3"
    )
    wait_until(lambda: "running" in first.execute("%capsule tasks").texts(), timeout=30)
    first.kc.stop_channels()
    os.kill(first.km.provisioner.process.pid, signal.SIGKILL)
    wait_until(lambda: not first.km.is_alive(), what="the kernel to die")
    (tmp_path / "second").touch()

    second = fresh_kernel(env=env, cwd=tmp_path)
    listing = second.execute("%capsule tasks").texts()
    assert "late" in listing and "interrupted" in listing
    resumed = second.execute("%capsule resume")
    assert "run again in the background: late" in resumed.texts(), resumed.texts()
    second.execute("%capsule task wait late")
    assert second.execute("late").result_text == "15"
    assert "succeeded" in second.execute("%capsule tasks").texts()
