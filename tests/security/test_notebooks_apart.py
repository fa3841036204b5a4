"""Two notebooks on one CAPSULE_HOME are two users: the attacks of one on the other, each held.

Every test runs real kernels through jupyter_client on one shared store. The
attacker is the cell source of notebook B (as an agent's cell would be); the
victim is notebook A. Each asserts the effect itself: A's secret never shows
in B, B's pickle never runs in A's sandbox (its marker file stays absent).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import KernelHarness, start_kernel, wait_until

pytestmark = pytest.mark.slow

SECRET = "hunter2-of-notebook-a"
# A value whose unpickling writes a marker: whoever loads it runs the attacker's code.
PAYLOAD = (
    "class Payload:\n"
    "    def __reduce__(self):\n"
    "        return (eval, (\"__import__('pathlib').Path({marker!r}).write_text('pwned')\",))\n"
    "payload = Payload()\n"
)


def _notebook(tmp_path: Path, name: str, toml: str = "") -> tuple[dict[str, str], Path]:
    cwd = tmp_path / name
    cwd.mkdir(exist_ok=True)
    if toml:
        (cwd / "capsule.toml").write_text(toml)
    env = {"CAPSULE_HOME": str(tmp_path / "home"), "JPY_SESSION_NAME": str(cwd / f"{name}.ipynb")}
    return env, cwd


def _checkpointed(kernel: KernelHarness, count: int) -> None:
    wait_until(lambda: f"[{count}]" in kernel.execute("%capsule log").texts(), what=f"the checkpoint of [{count}]")


def _victim_with_secret(tmp_path: Path) -> tuple[dict[str, str], Path]:
    env, cwd = _notebook(tmp_path, "a")
    victim = start_kernel(env=env, cwd=cwd)
    try:
        victim.execute(f"secret = {SECRET!r}")
        _checkpointed(victim, 1)
    finally:
        victim.close()
    return env, cwd


def test_a_cell_cannot_switch_into_another_notebooks_session(tmp_path):
    victim_env, _ = _victim_with_secret(tmp_path)
    env, cwd = _notebook(tmp_path, "b")
    attacker = start_kernel(env=env, cwd=cwd)
    try:
        attacker.execute("x = 1")
        switched = attacker.execute(f"%capsule session {victim_env['JPY_SESSION_NAME']}\n%capsule resume")
        assert switched.status == "error"
        assert "belongs to notebook" in switched.content["evalue"], switched.texts()
        assert SECRET not in switched.texts()
        assert attacker.execute("secret").content["ename"] == "NameError"
        assert env["JPY_SESSION_NAME"] in attacker.execute("%capsule session").texts()
        # A count names a checkpoint only within this notebook's own session: [1] is its own x.
        attacker.execute("%capsule resume 1")
        assert attacker.execute("x").result_text == "1"
        assert attacker.execute("secret").content["ename"] == "NameError"
    finally:
        attacker.close()


def test_a_later_cell_naming_a_vscode_notebook_path_does_not_open_its_session(tmp_path):
    victim_env, _ = _victim_with_secret(tmp_path)
    cwd = tmp_path / "fresh"
    cwd.mkdir()
    attacker = start_kernel(env={"CAPSULE_HOME": victim_env["CAPSULE_HOME"]}, cwd=cwd)
    try:
        attacker.execute("x = 1")  # the user's (or agent's) first cell: the frontend has spoken
        target = victim_env["JPY_SESSION_NAME"]
        attacker.execute(f"__vsc_ipynb_file__ = {target!r}")
        attacker.execute(f"__vsc_ipynb_file__ = {target!r}", silent=True)
        assert target not in attacker.execute("%capsule session").texts()
        resumed = attacker.execute("%capsule resume")
        assert SECRET not in resumed.texts()
        assert attacker.execute("secret").content["ename"] == "NameError"
    finally:
        attacker.close()


def _attacker_switches_in(tmp_path: Path, victim_env: dict[str, str], marker: Path) -> dict[str, str]:
    """Notebook B, allowed to switch sessions, leaves a checkpoint holding a reduce payload in A's session."""
    env, cwd = _notebook(tmp_path, "b", 'notebook_may_widen = ["session"]\n')
    attacker = start_kernel(env=env, cwd=cwd)
    try:
        assert attacker.execute(f"%capsule session {victim_env['JPY_SESSION_NAME']}").status == "ok"
        attacker.execute(PAYLOAD.format(marker=str(marker)))
        _checkpointed(attacker, 2)
    finally:
        attacker.close()
    return env


def test_a_checkpoint_switched_in_by_another_notebook_is_not_resumed_unasked(tmp_path):
    """Even where the operator lets notebooks switch sessions, the owner never loads the other's pickle unasked."""
    victim_env, victim_cwd = _victim_with_secret(tmp_path)
    marker = victim_cwd / "pwned"
    env = _attacker_switches_in(tmp_path, victim_env, marker)
    assert not marker.exists()
    victim = start_kernel(env=victim_env, cwd=victim_cwd)
    try:
        first = victim.execute("1")
        assert "written by notebook" in first.texts() and env["JPY_SESSION_NAME"] in first.texts()
        resumed = victim.execute("%capsule resume")
        assert resumed.status == "error"
        assert "written by notebook" in resumed.content["evalue"]
        assert victim.execute("%capsule restore 2").status == "error"  # the payload cell's count is not its id
        assert victim.execute("payload").content["ename"] == "NameError"
        assert not marker.exists()
        assert victim.km.is_alive()
        log = victim.execute("%capsule log").texts()
        assert f"(by {env['JPY_SESSION_NAME']})" in log
    finally:
        victim.close()


def test_auto_resume_does_not_load_a_checkpoint_another_notebook_switched_in(tmp_path):
    victim_env, victim_cwd = _victim_with_secret(tmp_path)
    (victim_cwd / "capsule.toml").write_text("auto_resume = true\n")
    marker = victim_cwd / "pwned-auto"
    _attacker_switches_in(tmp_path, victim_env, marker)
    victim = start_kernel(env=victim_env, cwd=victim_cwd)
    try:
        notice = victim.execute("1").texts()
        assert "not resumed" in notice and "written by notebook" in notice
        assert victim.execute("payload").content["ename"] == "NameError"
        assert not marker.exists()
    finally:
        victim.close()


def test_a_notebook_may_go_back_into_a_session_it_created(tmp_path):
    env, cwd = _notebook(tmp_path, "a")
    first = start_kernel(env=env, cwd=cwd)
    try:
        assert first.execute("%capsule session scratch-of-a").status == "ok"
        first.execute("kept = 7")
        _checkpointed(first, 2)
    finally:
        first.close()
    again = start_kernel(env=env, cwd=cwd)
    try:
        assert again.execute("%capsule session scratch-of-a\n%capsule resume").status == "ok"
        assert again.execute("kept").result_text == "7"
    finally:
        again.close()
    other_env, other_cwd = _notebook(tmp_path, "b")
    other = start_kernel(env=other_env, cwd=other_cwd)
    try:
        refused = other.execute("%capsule session scratch-of-a")
        assert refused.status == "error" and "belongs to notebook" in refused.content["evalue"]
    finally:
        other.close()


# -- task records belong to the notebook (and the view) that made them ----------------------

READ_DATA = "%%capsule task report --sandbox subprocess{opts}\nopen('data.txt').read()"


def _task_notebook(tmp_path: Path, name: str, data: str) -> tuple[dict[str, str], Path]:
    env, cwd = _notebook(tmp_path, name)
    (cwd / "data.txt").write_text(data)
    return env, cwd


def test_another_notebook_running_the_same_task_text_is_not_answered_from_its_record(tmp_path):
    a_env, a_cwd = _task_notebook(tmp_path, "a", SECRET)
    b_env, b_cwd = _task_notebook(tmp_path, "b", "b's own data")
    victim = start_kernel(env=a_env, cwd=a_cwd)
    try:
        assert SECRET in victim.execute(READ_DATA.format(opts="")).texts()
        assert SECRET in victim.execute(READ_DATA.format(opts=" --id quarterly")).texts()
    finally:
        victim.close()
    attacker = start_kernel(env=b_env, cwd=b_cwd)
    try:
        for opts in ("", " --id quarterly"):
            answered = attacker.execute(READ_DATA.format(opts=opts))
            assert SECRET not in answered.texts(), opts
            assert "b's own data" in answered.texts(), answered.texts()
            assert attacker.execute("report").result_text == repr("b's own data")
    finally:
        attacker.close()


def test_another_notebook_cannot_replace_a_tasks_record_with_its_pickle(tmp_path):
    a_env, a_cwd = _task_notebook(tmp_path, "a", SECRET)
    b_env, b_cwd = _task_notebook(tmp_path, "b", "b")
    marker = a_cwd / "pwned-task"
    victim = start_kernel(env=a_env, cwd=a_cwd)
    try:
        victim.execute(READ_DATA.format(opts=" --id quarterly"))
    finally:
        victim.close()
    attacker = start_kernel(env=b_env, cwd=b_cwd)
    try:
        planted = attacker.execute(
            "%%capsule task report --sandbox subprocess --id quarterly --rerun\n"
            + PAYLOAD.format(marker=str(marker))
            + "payload"
        )
        assert planted.status == "ok", planted.texts()
        # The same cell text as A's, run again (--rerun) from B: it replaces only B's record.
        attacker.execute(READ_DATA.format(opts=" --rerun"))
    finally:
        attacker.close()
    victim = start_kernel(env=a_env, cwd=a_cwd)
    try:
        again = victim.execute(READ_DATA.format(opts=" --id quarterly"))
        assert again.status == "ok", again.texts()
        assert victim.execute("report").result_text == repr(SECRET)
        assert not marker.exists()
    finally:
        victim.close()


# -- a mount is bound as it was checked ------------------------------------------------------

SWAP = "import os\nos.rename({sub!r}, {sub!r} + '.old')\nos.symlink({secret!r}, {sub!r})\nos.path.islink({sub!r})"
PEEK = "import os\nsorted(os.listdir({sub!r})) if os.path.isdir({sub!r}) else 'absent'"


def _mount_setting(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The operator lets the notebook write data/; data/sub holds ok.txt; secret/ is outside everything."""
    cwd = tmp_path / "nb"
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "ok.txt").write_text("ok")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "secret.txt").write_text(SECRET)
    cwd.mkdir()
    (cwd / "capsule.toml").write_text(f"[fs_access]\nwrite = [{str(data)!r}]\n")
    return cwd, data / "sub", secret


def _not_revealed(result, secret_name: str = "secret.txt") -> None:
    assert secret_name not in result.texts() and SECRET not in result.texts(), result.texts()


def test_a_mount_swapped_for_a_link_after_its_check_is_not_bound_at_a_restart(fresh_kernel, tmp_path):
    """A's %capsule mount holds; B, which may write data/ too, swaps data/sub; A's next sandbox binds A's."""
    cwd, sub, secret = _mount_setting(tmp_path)
    home = {"CAPSULE_HOME": str(tmp_path / "home")}
    victim = fresh_kernel(env=home, cwd=cwd)
    assert victim.execute(f"%capsule mount {sub}").status == "ok"
    assert "ok.txt" in victim.execute(PEEK.format(sub=str(sub))).texts()
    other = tmp_path / "other"
    other.mkdir()
    (other / "capsule.toml").write_text((cwd / "capsule.toml").read_text())
    attacker = fresh_kernel(env=home, cwd=other)
    swapped = attacker.execute(SWAP.format(sub=str(sub), secret=str(secret)))
    assert swapped.result_text == "True", swapped.texts()
    victim.execute("%capsule restart")
    peek = victim.execute(PEEK.format(sub=str(sub)))
    _not_revealed(peek)
    assert peek.status == "ok" and victim.km.is_alive()
    # The path names another file now: that mount is left out of the new sandbox, and the notebook is told.
    assert "is not bound in this sandbox" in victim.execute("1").texts() + peek.texts()


@pytest.mark.parametrize("kind", ["subprocess", "wasm"])
def test_a_task_mount_swapped_for_a_link_while_it_waits_is_not_bound(fresh_kernel, tmp_path, kind):
    cwd, sub, secret = _mount_setting(tmp_path)
    (cwd / "capsule.toml").write_text((cwd / "capsule.toml").read_text() + "\n[tasks]\nmax_parallel = 1\n")
    gate = sub.parent / "go"
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(tmp_path / "home")}, cwd=cwd)
    # The one slot is taken until the gate file appears; the second task waits for it, already checked.
    kernel.execute(
        "%%capsule task blocker --sandbox subprocess --background\n"
        f"import os, time\ndeadline = time.monotonic() + 120\n"
        f"while not os.path.exists({str(gate)!r}) and time.monotonic() < deadline:\n    time.sleep(0.05)\n1"
    )
    waiting = kernel.execute(
        f"%%capsule task peek --sandbox {kind} --background --mount {sub}\n{PEEK.format(sub=str(sub))}"
    )
    assert waiting.status == "ok", waiting.texts()
    kernel.execute(SWAP.format(sub=str(sub), secret=str(secret)))
    kernel.execute(f"open({str(gate)!r}, 'w').close()")
    done = kernel.execute("%capsule task wait peek", timeout=120)
    _not_revealed(done)
    _not_revealed(kernel.execute("peek"))


# -- every table a sandbox can fill has a bound ------------------------------------------------


def test_the_kernels_table_of_open_comms_is_bounded(fresh_kernel, tmp_path):
    from capsule_kernel.kernel.session import relay

    max_open = getattr(relay, "MAX_OPEN_COMMS", 10_000)
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    flood = kernel.execute(
        "from comm import create_comm\n"
        f"comms = [create_comm(target_name='t' * 4096) for _ in range({max_open + 50})]\n"
        "len(comms)",
        timeout=300,
    )
    assert flood.status == "ok", flood.texts()[-500:]
    opened = flood.of_type("comm_open")
    # The frontend received no more than the kernel keeps (iopub may drop some under the flood).
    assert len(opened) <= max_open
    assert "comm_open is dropped" in flood.texts()
    assert kernel.execute("1 + 1").result_text == "2"


def test_a_flood_of_forged_input_requests_opens_one_prompt(fresh_kernel, tmp_path):
    """Each input_request frame once became a task polling stdin for ever: now one prompt is open at a time."""
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    prompts: list[dict] = []

    def answer(request: dict) -> str:
        prompts.append(request)
        return "typed"

    from tests.security.test_trust_boundary import FORGE

    flood = kernel.execute(
        FORGE + "for i in range(2000):\n"
        "    forge({'type': 'input_request', 'id': 10_000 + i, 'prompt': 'p', 'password': False})\n"
        "value = input('real? ')\nprint(repr(value))",
        stdin_answer=answer,
        timeout=120,
    )
    assert flood.status == "ok", flood.texts()[-800:]
    assert len(prompts) <= 2, len(prompts)
    assert kernel.execute("1 + 1").result_text == "2"
