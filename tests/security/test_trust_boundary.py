"""The trust boundary, attacked from inside each sandbox (issue 13).

Nothing a sandbox sends can change the operator's policy, forge the kernel's
state, or escape a limit. Every test asserts that the attack's effect did not
happen (a limit still in force, a file never written, a loop that stopped, a
session unchanged, memory that stayed bounded), not only that a status says so.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path

import pytest

from capsule_kernel.protocol.deaths import process_exists
from tests.harness import start_kernel, wait_until
from tests.security.helpers import kernel_pid, status_field

WASM = {"CAPSULE_MODE": "wasm"}

# Code a subprocess cell uses to write a raw frame on the worker's frame pipe (its fd is in argv).
FORGE = (
    "import json, os, struct\n"
    "config = json.loads(open('/proc/self/cmdline').read().split('\\0')[-2])\n"
    "def forge(message, fd='write_fd'):\n"
    "    body = json.dumps(message).encode()\n"
    "    os.write(config[fd], struct.pack('>I', len(body)) + body)\n"
)
# The same from a Wasm cell: the guest's channel is positional writes on fd 1.
WASM_FORGE = (
    "import json, os, struct\n"
    "def forge(message):\n"
    "    body = json.dumps(message).encode()\n"
    "    os.pwrite(1, struct.pack('>I', len(body)) + body, 0)\n"
)


def rss_kib(pid: int) -> int:
    return int(status_field(pid, "VmRSS").split()[0])


# -- the subprocess sandbox's frame pipe -----------------------------------------------


@pytest.mark.parametrize(
    ("label", "attack"),
    [
        ("unknown type", "forge({'type': 'become_root'})"),
        ("not the worker's to send", "forge({'type': 'trap', 'reason': 'forged'})"),
        ("a second ready", "forge({'type': 'ready', 'pid': 1, 'python': '9'})"),
        ("a field of the wrong type", "forge({'type': 'stream', 'name': 'stdout', 'text': 5})"),
        ("an unknown field", "forge({'type': 'stream', 'name': 'stdout', 'text': 'x', 'notebook_path': 'v'})"),
        ("a reply to nothing", "forge({'type': 'reply', 'id': 10**6, 'content': {}})"),
        ("a snapshot nobody announced", "forge({'type': 'snapshot_started', 'execution_count': 77, 'pid': 1})"),
        ("a second start", "forge({'type': 'started', 'execution_count': 1})"),
        ("garbage", "os.write(config['write_fd'], struct.pack('>I', 9) + b'not json!')"),
    ],
)
def test_forged_frames_end_the_sandbox_not_the_kernel(fresh_kernel, label, attack):
    kernel = fresh_kernel()
    kernel.execute("kept = 'before'")
    # Its checkpoint lands first: a violation ends the sandbox at once, snapshots in flight included.
    assert kernel.execute("%capsule log -n 1").status == "ok"
    result = kernel.execute(FORGE + attack + "\nimport time\nfor _ in range(300):\n    time.sleep(0.1)")
    assert result.status == "error", label
    assert result.content["ename"] == "SandboxProtocolError", result.texts()
    assert "broke the protocol" in result.content["evalue"], result.texts()
    assert "os._exit" not in result.content["evalue"]
    assert kernel.km.is_alive()
    assert kernel.execute("kept").result_text == "'before'"  # the next cell runs, restored


def test_an_oversized_frame_is_refused_at_its_header_and_memory_stays_bounded(fresh_kernel):
    kernel = fresh_kernel()
    pid = kernel_pid(kernel)
    kernel.execute("kept = 1")
    # Its checkpoint lands first: a violation ends the sandbox at once, snapshots in flight included.
    assert kernel.execute("%capsule log -n 1").status == "ok"
    before = rss_kib(pid)
    result = kernel.execute(
        FORGE
        + "os.write(config['write_fd'], struct.pack('>I', 2**31))\n"
        + "chunk = b'x' * 2**20\n"
        + "for _ in range(256):\n    os.write(config['write_fd'], chunk)\n"
    )
    assert result.content["ename"] == "SandboxProtocolError"
    assert "over this channel's cap" in result.content["evalue"]
    assert rss_kib(pid) - before < 64 * 1024, "the kernel buffered what the sandbox wrote"
    assert kernel.execute("kept").result_text == "1"


def test_garbage_on_the_snapshot_report_pipe_ends_the_sandbox_and_stays_bounded(fresh_kernel):
    kernel = fresh_kernel()
    pid = kernel_pid(kernel)
    kernel.execute("kept = 1")
    # Its checkpoint lands first: a violation ends the sandbox at once, snapshots in flight included.
    assert kernel.execute("%capsule log -n 1").status == "ok"
    before = rss_kib(pid)
    result = kernel.execute(
        FORGE
        + "os.write(config['report_fd'], struct.pack('>I', 2**30))\n"
        + "chunk = b'\\xff' * 2**20\n"
        + "for _ in range(256):\n    os.write(config['report_fd'], chunk)\n"
        + "import time\nfor _ in range(300):\n    time.sleep(0.1)"
    )
    assert result.content["ename"] == "SandboxProtocolError", result.texts()
    assert "snapshot report pipe" in result.content["evalue"]
    assert rss_kib(pid) - before < 64 * 1024
    assert kernel.execute("kept").result_text == "1"


def test_a_forged_done_cannot_outlive_the_timeout_and_the_next_cell_is_not_blamed(fresh_kernel, tmp_path):
    """Fails without the started/busy_until rule: the loop ran on and the next cell got CellTimeout (checked)."""
    kernel = fresh_kernel(env={"CAPSULE_TIMEOUT": "2s"})
    kernel.execute("kept = 'before'")
    forger = kernel.sandbox_pid()
    beat = tmp_path / "heartbeat"
    forged = kernel.execute(
        FORGE
        + "count = get_ipython().execution_count\n"
        + "forge({'type': 'done', 'reply': {'status': 'ok', 'execution_count': 999}})\n"
        + "import time\n"
        + "while True:\n"
        + f"    open({str(beat)!r}, 'w').write(str(time.time()))\n"
        + "    time.sleep(0.05)\n"
    )
    assert forged.status == "ok"  # the forged end looks like an end...
    assert forged.content["execution_count"] != 999  # ...but the count is the kernel's
    innocent = kernel.execute("print('innocent')", timeout=60)
    assert innocent.status == "ok", innocent.texts()
    assert innocent.stdout == "innocent\n"
    assert "kept the sandbox after its reply" in innocent.stderr
    # The forging loop is gone: the worker that ran it has ended, so its heartbeat has stopped.
    wait_until(lambda: not process_exists(forger), timeout=30, what="the forging worker to end")
    last = beat.read_text()
    assert last and beat.read_text() == last
    assert kernel.execute("kept").result_text == "'before'"


def test_a_forged_done_cannot_spend_cpu_past_the_limit(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_CPU": "1s"})
    kernel.execute("kept = 'before'")
    old = kernel.sandbox_pid()
    kernel.execute(FORGE + "forge({'type': 'done', 'reply': {'status': 'ok'}})\nwhile True:\n    pass\n")
    # The CPU watch goes on after the (forged) reply: the cell is stopped at its limit, and the
    # worker's real "done" that follows is out of sequence, so the sandbox is replaced.
    wait_until(lambda: kernel.sandbox_pid() != old, timeout=60, what="the sandbox stopped after its reply")
    after = kernel.execute("kept")
    assert after.result_text == "'before'"
    assert "while no cell was running" in after.stderr


# -- in-cell %capsule requests ---------------------------------------------------------


def test_in_cell_requests_cannot_raise_a_limit_or_change_policy(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_MEMORY": "1GB"})
    for code in (
        "get_ipython().run_line_magic('capsule', 'limits --memory 8GB')",
        "get_ipython().run_line_magic('capsule', 'limits --network on')",
        "get_ipython().run_line_magic('capsule', 'mode wasm')",
        "get_ipython().run_line_magic('capsule', \"'mount' /etc --rw\")",
        "get_ipython().run_line_magic('capsule', 'session victim.ipynb')",
        "x = 1\n%capsule 'mount' /etc --rw",
    ):
        result = kernel.execute(code)
        assert result.status == "error", code
        assert "refused" in result.content["evalue"] or "cell of its own" in result.content["evalue"], code
    limits = kernel.execute("%capsule limits").texts()
    assert "1000 MiB" in limits or "953.7 MiB" in limits
    status = kernel.execute("%capsule status").texts()
    assert re.search(r"routing mode +subprocess", status)
    assert "victim.ipynb" not in status
    assert "(none)" in kernel.execute("%capsule mount").texts()
    # Read-only requests still work from code, and a line of the cell's own source is the user's.
    shown = kernel.execute("get_ipython().run_line_magic('capsule', 'status')")
    assert shown.status == "ok" and "Capsule status" in shown.texts()
    own = kernel.execute("y = 2\n%capsule limits --memory 512MB")
    assert own.status == "ok", own.texts()
    assert (
        "512 MiB" in kernel.execute("%capsule limits").texts()
        or "488.3 MiB" in kernel.execute("%capsule limits").texts()
    )


def test_the_operators_limits_are_ceilings(fresh_kernel, tmp_path):
    (tmp_path / "capsule.toml").write_text('[limits]\ntimeout = "10s"\n')
    kernel = fresh_kernel(env={"CAPSULE_MEMORY": "1GiB"})
    raised = kernel.execute("%capsule limits --memory 8GiB")
    assert raised.status == "error"
    assert "above the operator's 1 GiB (environment CAPSULE_MEMORY)" in raised.content["evalue"]
    longer = kernel.execute("%capsule limits --timeout 1h")
    assert "above the operator's 10 s" in longer.content["evalue"] and "capsule.toml" in longer.content["evalue"]
    network = kernel.execute("%capsule limits --network on")
    assert "network" in network.content["evalue"] and "off" in network.content["evalue"]
    assert kernel.execute("%capsule limits --memory 512MiB --timeout 5s").status == "ok"
    assert kernel.execute("%capsule limits --memory 1GiB").status == "ok"  # back up to the ceiling
    limits = kernel.execute("%capsule limits").texts()
    memory_line = next(line for line in limits.splitlines() if line.startswith("memory"))
    assert "1 GiB" in memory_line


def test_kernel_options_set_and_lock_the_mode(tmp_path):
    from jupyter_client import KernelManager

    from tests.harness import KernelHarness

    km = KernelManager(kernel_name="capsule")
    km.start_kernel(
        cwd=str(tmp_path),
        extra_arguments=["--CapsuleKernel.mode=wasm", "--CapsuleKernel.lock_mode=True"],
    )
    kernel = KernelHarness(km)
    try:
        assert kernel.execute("1 + 1").metadata["capsule"]["sandbox"] == "wasm"
        refused = kernel.execute("%capsule mode subprocess")
        assert refused.status == "error" and "locked" in refused.content["evalue"]
        assert "lock_mode" in refused.content["evalue"]
        status = kernel.execute("%capsule status").texts()
        assert "kernel option CapsuleKernel.mode (locked)" in status
        assert kernel.execute("open('/etc/hostname').read()").status == "error"  # still Wasm: no host files
    finally:
        kernel.close()


def test_a_wasm_notebook_cannot_widen_its_mode_or_escape_through_run_line_magic(fresh_kernel):
    kernel = fresh_kernel(env=WASM)
    relay = kernel.execute("get_ipython().run_line_magic('capsule', 'mode subprocess')")
    assert relay.status == "error" and "refused" in relay.content["evalue"]
    widened = kernel.execute("%capsule mode subprocess")
    assert widened.status == "error" and "wider than the operator's wasm" in widened.content["evalue"]
    probe = kernel.execute("open('/etc/hostname').read()")
    assert probe.metadata["capsule"]["sandbox"] == "wasm"
    assert probe.status == "error"


def test_config_problems_are_shown_in_the_notebook(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_MEMORY": "lots", "CAPSULE_NOTEBOOK_MAY_WIDEN": "everything"})
    first = kernel.execute("1")
    assert "configuration problem" in first.stderr and "CAPSULE_MEMORY" in first.stderr
    status = kernel.execute("%capsule status").texts()
    assert "config problem" in status and "CAPSULE_NOTEBOOK_MAY_WIDEN" in status


# -- the Wasm guest's channel ------------------------------------------------------------


def test_forged_cell_marks_do_not_lift_the_fuel_budget(fresh_kernel):
    """Fails when the host takes cell_end as the budget's end: fuel turned unlimited (checked)."""
    kernel = fresh_kernel(env={**WASM, "CAPSULE_FUEL": "300M"})
    kernel.execute("kept = 'before'")
    result = kernel.execute(
        WASM_FORGE + "for _ in range(50):\n    forge({'type': 'cell_end'})\n    forge({'type': 'cell_start'})\n"
        "n = 0\nwhile True:\n    n += 1\n"
    )
    assert result.status == "error"
    assert "fuel" in result.content["evalue"], result.texts()
    fuel = result.metadata["capsule"].get("fuel_consumed")
    assert fuel is None or fuel >= 0
    assert kernel.execute("kept").result_text == "'before'"


def test_a_forged_wasm_done_cannot_outlive_the_timeout(fresh_kernel):
    kernel = fresh_kernel(env={**WASM, "CAPSULE_TIMEOUT": "2s"})
    kernel.execute("kept = 'before'")
    forged = kernel.execute(
        WASM_FORGE + "forge({'type': 'done', 'reply': {'status': 'ok', 'execution_count': 5}})\n"
        "n = 0\nwhile True:\n    n += 1\n"
    )
    assert forged.status == "ok"
    started = time.monotonic()
    innocent = kernel.execute("'innocent'", timeout=60)
    assert innocent.result_text == "'innocent'", innocent.texts()
    assert "kept the sandbox after its reply" in innocent.stderr
    assert "went on running after it reported its end" in innocent.stderr
    assert time.monotonic() - started < 30
    assert kernel.execute("kept").result_text == "'before'"


@pytest.mark.parametrize(
    "attack",
    [
        "forge({'type': 'done', 'reply': {}, 'notebook_path': 'victim.ipynb'})",
        "forge({'type': 'snapshot', 'execution_count': 1, 'entries': {}, 'removed': [], 'written': 0})",
        "forge({'type': 'started', 'execution_count': 1})",
        "os.pwrite(1, struct.pack('>I', 2**31), 0)",
        "os.pwrite(1, struct.pack('>I', 5) + b'\\xff\\xfe{{{', 0)",
    ],
)
def test_forged_guest_frames_end_the_instance_as_a_protocol_violation(fresh_kernel, attack):
    kernel = fresh_kernel(env=WASM)
    kernel.execute("kept = 'before'")
    result = kernel.execute(WASM_FORGE + attack + "\n'still here'")
    assert result.status == "error", result.texts()
    assert result.content["ename"] == "SandboxProtocolError", result.texts()
    assert "broke the protocol" in result.content["evalue"]
    assert "os._exit" not in result.content["evalue"]
    assert kernel.execute("kept").result_text == "'before'"
    assert "victim.ipynb" not in kernel.execute("%capsule status").texts()


def test_the_wasm_hosts_memory_stays_bounded_under_garbage(fresh_kernel):
    kernel = fresh_kernel(env={**WASM, "CAPSULE_MEMORY": "256MB"})
    kernel.execute("1")
    host = int(kernel.execute("%capsule status").texts().split("wasm sandbox")[0].split("pid")[1].split()[0])
    peak = []

    def watch() -> None:
        try:
            peak.append(rss_kib(host))
        except (OSError, KeyError):
            pass

    result = kernel.execute(
        WASM_FORGE
        + "os.pwrite(1, struct.pack('>I', 400 * 2**20), 0)\n"
        + "chunk = b'x' * 2**20\nfor _ in range(1500):\n    os.pwrite(1, chunk, 0)\n",
        on_message=lambda _m: watch(),
    )
    assert result.content["ename"] == "SandboxProtocolError", result.texts()
    assert "over this channel's cap" in result.content["evalue"]
    assert all(kib < 768 * 1024 for kib in peak), max(peak, default=0)


# -- values made in Wasm never run code outside it -----------------------------------------

PAYLOAD = (
    "class Payload:\n"
    "    def __reduce__(self):\n"
    "        return (eval, (\"__import__('pathlib').Path({marker!r}).write_text('pwned')\",))\n"
    "payload = Payload()\n"
    "plain = {{'rows': [1, 2, 3], 'name': 'data'}}\n"
)


def test_a_reduce_payload_made_in_wasm_does_not_run_when_auto_mode_brings_it_over(fresh_kernel, tmp_path):
    marker = tmp_path / "pwned-auto"
    kernel = fresh_kernel(env={"CAPSULE_MODE": "auto"})
    made = kernel.execute(PAYLOAD.format(marker=str(marker)))
    assert made.metadata["capsule"]["sandbox"] == "wasm", made.texts()
    used = kernel.execute("import numpy\n(plain['rows'], payload)")
    assert used.metadata["capsule"]["sandbox"] == "subprocess"
    assert "payload" in used.stderr and "may cross only as data" in used.stderr, used.texts()
    assert not marker.exists()
    assert kernel.execute("import numpy\nplain['name']").result_text == "'data'"  # data crosses


def test_a_reduce_payload_made_in_wasm_does_not_run_after_a_mode_switch(fresh_kernel, tmp_path):
    marker = tmp_path / "pwned-switch"
    kernel = fresh_kernel()
    assert kernel.execute("%capsule mode wasm").status == "ok"
    kernel.execute(PAYLOAD.format(marker=str(marker)))
    assert kernel.execute("%capsule mode subprocess").status == "ok"  # back to the operator's mode
    used = kernel.execute("payload")
    assert used.status == "error"
    assert "may cross only as data" in used.stderr
    assert not marker.exists()


def test_a_reduce_payload_made_in_wasm_does_not_run_on_resume(tmp_path):
    marker = tmp_path / "pwned-resume"
    home = tmp_path / "home"
    env = {"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "victim.ipynb"}
    first = start_kernel(env={**env, **WASM}, cwd=tmp_path)
    try:
        first.execute(PAYLOAD.format(marker=str(marker)))
        wait_until(lambda: "payload" in first.execute("%capsule log").texts(), what="the Wasm checkpoint")
    finally:
        first.close()
    second = start_kernel(env=env, cwd=tmp_path)
    try:
        resumed = second.execute("%capsule resume")
        assert resumed.status == "ok", resumed.texts()
        assert "payload" in resumed.texts() and "may cross only as data" in resumed.texts()
        assert second.execute("plain['rows']").result_text == "[1, 2, 3]"
        assert second.execute("payload").status == "error"
        assert not marker.exists()
    finally:
        second.close()


# -- checkpoint rows are authenticated -------------------------------------------------------


def test_a_tampered_checkpoint_row_is_refused_and_nothing_of_it_loads(tmp_path):
    home = tmp_path / "home"
    env = {"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "victim.ipynb"}
    first = start_kernel(env=env, cwd=tmp_path)
    try:
        first.execute("x = 41")
        wait_until(lambda: "[1]" in first.execute("%capsule log").texts(), what="the checkpoint of x")
    finally:
        first.close()
    db = sqlite3.connect(home / "capsule.sqlite")
    (entries,) = db.execute("SELECT entries FROM checkpoints WHERE session = 'victim.ipynb'").fetchone()
    forged = json.loads(entries)
    forged["injected"] = dict(forged["x"], repr="'attacker'")
    db.execute("UPDATE checkpoints SET entries = ? WHERE session = 'victim.ipynb'", (json.dumps(forged),))
    db.commit()
    db.close()
    second = start_kernel(env=env, cwd=tmp_path)
    try:
        resumed = second.execute("%capsule resume")
        assert resumed.status == "error"
        assert "victim.ipynb" in resumed.content["evalue"] and "refused" in resumed.content["evalue"]
        assert second.execute("x").content["ename"] == "NameError"
        assert second.execute("injected").content["ename"] == "NameError"
        assert second.km.is_alive()
    finally:
        second.close()


def test_the_session_follows_the_frontends_source_not_the_cells_behaviour(fresh_kernel, tmp_path):
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(tmp_path / "home")})
    kernel.execute("exec(\"__vsc_ipynb_file__ = 'victim.ipynb'\")")
    kernel.execute("x = 1")
    assert "victim.ipynb" not in kernel.execute("%capsule session").texts()
    # After the user's first cell even VS Code's form names nothing: its start-up code comes first.
    kernel.execute("__vsc_ipynb_file__ = '/work/mine.ipynb'", silent=True)
    assert "/work/mine.ipynb" not in kernel.execute("%capsule session").texts()
    vscode = fresh_kernel(env={"CAPSULE_HOME": str(tmp_path / "home")})
    vscode.execute("__vsc_ipynb_file__ = '/work/mine.ipynb'", silent=True)
    vscode.execute("x = 1")
    assert "/work/mine.ipynb" in vscode.execute("%capsule session").texts()


def test_wasm_bytes_are_marked_by_the_kernel_not_the_guest(tmp_path):
    """The store's entries of a Wasm checkpoint say made_in=wasm, whatever the guest sent."""
    home = tmp_path / "home"
    kernel = start_kernel(env={"CAPSULE_HOME": str(home), "CAPSULE_SESSION": "s", **WASM}, cwd=tmp_path)
    try:
        kernel.execute("value = [1, 2]")
        wait_until(lambda: "value" in kernel.execute("%capsule log").texts(), what="the checkpoint")
    finally:
        kernel.close()
    db = sqlite3.connect(home / "capsule.sqlite")
    (entries,) = db.execute("SELECT entries FROM checkpoints ORDER BY seq DESC LIMIT 1").fetchone()
    assert json.loads(entries)["value"]["made_in"] == "wasm"
    assert Path(home / "checkpoint.key").stat().st_mode & 0o077 == 0


POISONED_RESTORE = '''
class Poison:
    """Loading it (in the fresh sandbox, during the restore) makes the worker's answer say anything."""
    def __init__(self):
        self.armed = True
    def __setstate__(self, state):
        from capsule_kernel.inside.worker import shell as worker_shell
        worker_shell._RESTORED_COMMS.append(object())
        worker_shell.revive_comms = lambda *args: {
            "reconnected": ["W" * 1000] * 2000,
            "reopened": [{"not": "a name"}, 42, "\\x1b[2J" + "R" * 500],
        }
poison = Poison()
'''


def test_a_restore_answer_can_say_anything_and_the_kernel_shows_only_bounded_text(fresh_kernel):
    """Unpickling runs the notebook's code in the new sandbox: what it makes the worker answer is only text."""
    kernel = fresh_kernel()
    assert kernel.execute(POISONED_RESTORE).status == "ok"
    kernel.execute("%capsule log -n 1")
    died = kernel.execute("import os; os._exit(1)")
    evalue = died.error["evalue"]
    assert "widgets reconnected to their views: " in evalue, evalue[:500]
    named = evalue.split("widgets reconnected to their views: ")[1].split(";")[0].split(", ")
    assert len(named) == 20 and all(name == "W" * 80 for name in named)
    assert len(evalue) < 4000  # 2 MB of names came back; a few lines reach the notebook
    assert "\x1b" not in evalue and "widgets opened again" not in evalue  # not names: not shown
    assert kernel.execute("'poison' in dir()").result_text == "True"  # the kernel and the new sandbox serve on
