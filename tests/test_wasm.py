"""The Wasm sandbox through real kernels: output, limits, isolation, recovery.

One kernel in wasm mode serves the tests that leave its state alone; tests
that trap, restart or reconfigure start their own.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.harness import plain, start_kernel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wasm(tmp_path_factory: pytest.TempPathFactory):
    harness = start_kernel(env={"CAPSULE_MODE": "wasm"}, cwd=tmp_path_factory.mktemp("wasm-cwd"))
    yield harness
    harness.close()


def meta(result) -> dict:
    return result.metadata["capsule"]


def test_cells_run_in_wasm_and_keep_their_namespace(wasm):
    first = wasm.execute("x = 21\nprint('hello', x)\nx * 2")
    assert first.status == "ok", first.texts()
    assert first.stdout == "hello 21\n"
    assert first.result_text == "42"
    assert meta(first)["sandbox"] == "wasm"
    assert meta(first)["routing"] == "wasm"
    assert meta(first)["fuel_consumed"] > 0
    assert isinstance(meta(first)["duration_ms"], float)
    second = wasm.execute("import sys\n(x + 1, sys.platform)")
    assert second.result_text == "(22, 'wasi')"


def test_fuel_figure_repeats(tmp_path):
    """Same cells from the same start: the same fuel, cell by cell (PYTHONHASHSEED is fixed)."""
    cells = ["words = {w: len(w) for w in 'the quick brown fox'.split()}", "total = sum(i * i for i in range(20000))"]
    runs = []
    for _ in range(2):
        kernel = start_kernel(env={"CAPSULE_MODE": "wasm", "CAPSULE_CHECKPOINTS": "off"}, cwd=tmp_path)
        try:
            runs.append([meta(kernel.execute(code))["fuel_consumed"] for code in cells])
        finally:
            kernel.close()
    assert runs[0] == runs[1]
    assert all(figure > 0 for figure in runs[0])


def test_rich_reprs_and_display(wasm):
    result = wasm.execute(
        "class Card:\n"
        "    def _repr_html_(self): return '<b>card</b>'\n"
        "    def _repr_markdown_(self): return '**card**'\n"
        "    def _repr_png_(self): return b'\\x89PNG fake'\n"
        "from IPython.display import display, HTML\n"
        "display(HTML('<i>shown</i>'))\n"
        "Card()"
    )
    assert result.status == "ok", result.texts()
    shown = result.of_type("display_data")[0].content["data"]
    assert shown["text/html"] == "<i>shown</i>"
    data = result.of_type("execute_result")[0].content["data"]
    assert data["text/html"] == "<b>card</b>"
    assert data["text/markdown"] == "**card**"
    assert data["image/png"] == "iVBORyBmYWtl"  # base64 of the bytes
    assert "Card object" in data["text/plain"]


def test_print_streams_live(wasm):
    arrivals = []
    result = wasm.execute(
        "import time\nfor i in range(3):\n    print('tick', i)\n    time.sleep(0.3)",
        on_message=lambda m: arrivals.append(time.monotonic()) if m.msg_type == "stream" else None,
    )
    assert result.stdout == "tick 0\ntick 1\ntick 2\n"
    assert len(arrivals) == 3
    assert arrivals[-1] - arrivals[0] > 0.4  # spread over the cell, not delivered at its end


def test_errors_have_a_clean_traceback(wasm):
    result = wasm.execute("def boom():\n    return 1 / 0\nboom()")
    assert result.status == "error"
    error = result.error
    assert error["ename"] == "ZeroDivisionError"
    text = plain("\n".join(error["traceback"]))
    assert "boom()" in text and "return 1 / 0" in text
    assert "wasm_guest" not in text  # the guest's own frames are not the user's business
    assert wasm.execute("x").result_text == "21"  # the namespace survived


def test_input_goes_through_the_frontend(wasm):
    result = wasm.execute("name = input('Who? ')\nprint('hi', name)", stdin_answer=lambda request: "Ada")
    assert result.stdout == "hi Ada\n", result.texts()
    refused = wasm.execute("input('x')", allow_stdin=False)
    assert "does not support input requests" in refused.error["evalue"]


def test_capsule_lines_inside_a_wasm_cell(wasm):
    result = wasm.execute("%capsule mode\nanswer = 6 * 7\nanswer")
    assert meta(result)["sandbox"] == "wasm"
    assert "Routing mode: wasm" in result.texts()
    assert result.result_text == "42"


def test_native_imports_and_shell_are_refused_with_the_way_out(wasm):
    numpy = wasm.execute("import numpy as np")
    assert numpy.error["ename"] == "WasmRefused"
    assert "numpy" in numpy.error["evalue"] and "%capsule mode auto" in numpy.error["evalue"]
    assert meta(numpy)["sandbox"] == "refused"
    shell = wasm.execute("!ls")
    assert shell.error["ename"] == "WasmRefused" and "shell" in shell.error["evalue"]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("open('/etc/passwd').read()", "FileNotFoundError"),
        ("import os; os.listdir('/')", "No such file"),
        ("import socket; socket.socket()", "no network"),
        ("import os; os.system('ls')", "starting processes"),
        ("import threading; threading.Thread(target=print).start()", "starting a thread"),
    ],
)
def test_isolation(wasm, code, expected):
    result = wasm.execute(code)
    assert result.status == "error"
    assert expected in result.texts(), result.texts()


def test_completion_and_inspection(wasm):
    wasm.execute("value_for_completion = 3")
    reply = wasm.request("complete", "value_for_c", 11)
    assert "value_for_completion" in reply["content"]["matches"]
    inspected = wasm.request("inspect", "len", 3)
    assert inspected["content"]["found"] is True
    assert "Return the number of items" in inspected["content"]["data"]["text/plain"]


def test_memory_error_keeps_the_instance(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_MODE": "wasm", "CAPSULE_MEMORY": "128MB"})
    kernel.execute("kept = 'still here'")
    result = kernel.execute("big = bytearray(512 * 1024 * 1024)")
    assert result.error["ename"] == "MemoryError", result.texts()
    after = kernel.execute("kept")
    assert after.result_text == "'still here'"


def test_fuel_limit_stops_the_cell_and_restores_the_namespace(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_MODE": "wasm"})
    assert kernel.execute("saved = [1, 2, 3]").status == "ok"
    limits = kernel.execute("%capsule limits --fuel 50M")
    assert "50,000,000 units per cell" in limits.texts()
    result = kernel.execute("while True:\n    pass")
    assert result.status == "error"
    assert "fuel" in result.error["evalue"] and "50,000,000" in result.error["evalue"]
    assert "restored" in result.error["evalue"]
    assert kernel.execute("saved").result_text == "[1, 2, 3]"


def test_timeout_during_sleep_keeps_the_namespace(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_MODE": "wasm", "CAPSULE_TIMEOUT": "1s"})
    kernel.execute("kept = 7")
    result = kernel.execute("import time\ntime.sleep(30)")
    assert result.error["ename"] == "CellTimeout", result.texts()
    assert "timeout" in result.error["evalue"]
    pid_before = kernel.execute("%capsule status").texts()
    assert kernel.execute("kept").result_text == "7"
    assert "running" in pid_before


def test_timeout_in_pure_computation_stops_the_instance(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_MODE": "wasm", "CAPSULE_TIMEOUT": "1s"})
    kernel.execute("kept = {'a': 1}")
    result = kernel.execute("while True:\n    pass")
    assert result.status == "error"
    assert "wall-clock limit of 1 s (timeout)" in result.error["evalue"]
    assert kernel.execute("kept").result_text == "{'a': 1}"


def test_interrupt_raises_keyboard_interrupt_in_the_guest(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_MODE": "wasm"})
    kernel.execute("kept = 'yes'")
    timer = None

    def interrupt_once_running(message):
        nonlocal timer
        if message.msg_type == "stream" and timer is None:
            timer = threading.Thread(target=kernel.km.interrupt_kernel)
            timer.start()

    result = kernel.execute(
        "import time\nprint('started')\nwhile True:\n    time.sleep(0.05)", on_message=interrupt_once_running
    )
    assert result.error["ename"] == "KeyboardInterrupt", result.texts()
    assert kernel.execute("kept").result_text == "'yes'"


def test_trap_restarts_the_instance_with_the_last_checkpoint(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_MODE": "wasm"})
    kernel.execute("def square(n):\n    return n * n\nnumbers = [square(i) for i in range(5)]")
    result = kernel.execute("import os\nos._exit(3)")
    assert result.error["ename"] == "SandboxDied"
    assert "exited with code 3" in result.error["evalue"]
    assert "restored" in result.error["evalue"]
    assert kernel.execute("(numbers, square(9))").result_text == "([0, 1, 4, 9, 16], 81)"


def test_mounts_are_the_only_host_files(fresh_kernel, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "hello.txt").write_text("from the host")
    # A notebook adds mounts only where the operator allows it (policy.py).
    kernel = fresh_kernel(env={"CAPSULE_MODE": "wasm", "CAPSULE_NOTEBOOK_MAY_WIDEN": "mounts"})
    assert kernel.execute(f"open({str(data / 'hello.txt')!r}).read()").status == "error"
    mounted = kernel.execute(f"%capsule mount {data}")
    assert "read-only" in mounted.texts()
    assert kernel.execute(f"open({str(data / 'hello.txt')!r}).read()").result_text == "'from the host'"
    denied = kernel.execute(f"open({str(data / 'new.txt')!r}, 'w').write('x')")
    assert denied.status == "error"
    assert not (data / "new.txt").exists()
    kernel.execute(f"%capsule mount {data} --rw")
    wrote = kernel.execute(f"open({str(data / 'new.txt')!r}, 'w').write('x')")
    assert wrote.result_text == "1", wrote.texts()
    assert (data / "new.txt").read_text() == "x"
    bad = kernel.execute("%capsule mount /no/such/dir")
    assert bad.error["ename"] == "UsageError"


def test_auto_mode_routes_and_shares_names_both_ways(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_MODE": "auto"})
    pure = kernel.execute("rows = [{'n': i, 'sq': i * i} for i in range(4)]")
    assert meta(pure)["sandbox"] == "wasm", meta(pure)
    native = kernel.execute("import numpy as np\narr = np.array([r['sq'] for r in rows])\nint(arr.sum())")
    assert meta(native)["sandbox"] == "subprocess", meta(native)
    assert "numpy" in meta(native)["reason"]
    assert native.result_text == "14", native.texts()
    back = kernel.execute("total = int(arr.sum()) + 1")
    assert meta(back)["sandbox"] == "subprocess"  # arr is a numpy array: Wasm cannot load it
    in_wasm = kernel.execute("summary = f'{len(rows)} rows, total {total}'\nsummary")
    assert meta(in_wasm)["sandbox"] == "wasm"
    assert in_wasm.result_text == "'4 rows, total 15'", in_wasm.texts()
    changed = kernel.execute("rows.append({'n': 9, 'sq': 81})")
    assert meta(changed)["sandbox"] == "wasm"
    seen = kernel.execute("import numpy\n(len(rows), summary)")
    assert meta(seen)["sandbox"] == "subprocess"
    assert seen.result_text == "(5, '4 rows, total 15')", seen.texts()


def test_completion_asks_the_sandbox_that_holds_the_names_even_after_a_wasm_cell(fresh_kernel):
    """Auto mode: a Wasm cell last must not leave completion in a sandbox without numpy or the notebook's names."""
    kernel = fresh_kernel(env={"CAPSULE_MODE": "auto"})
    kernel.execute("import numpy as np\nimport collections")
    pure = kernel.execute("words = ['a', 'b']")
    assert meta(pure)["sandbox"] == "wasm", meta(pure)

    def matches(code: str) -> list[str]:
        return kernel.request("complete", code, len(code))["content"]["matches"]

    assert {"array", "np.array"} & set(matches("np.ar"))
    assert {"OrderedDict", "collections.OrderedDict"} & set(matches("collections.Ord"))
    assert "words" in matches("wor")  # a Wasm cell's name: the Wasm sandbox holds it
    found = kernel.request("inspect", "np.zeros(", 9, detail_level=0)["content"]
    assert found["found"] and "zeros" in plain(found["data"]["text/plain"])
    # After a mode switch, the switch decides at once, before any cell runs.
    assert kernel.execute("%capsule mode wasm").status == "ok"
    assert "words" in matches("wor")
    assert kernel.execute("%capsule mode auto").status == "ok"  # back to the operator's mode (not wider)
    assert {"array", "np.array"} & set(matches("np.ar"))


def test_an_alias_crosses_sandboxes_with_its_target(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_MODE": "auto"})
    assert meta(kernel.execute("rows = [1]"))["sandbox"] == "wasm"
    native = kernel.execute("import numpy\nrows = [5]\nalias = rows")
    assert meta(native)["sandbox"] == "subprocess"
    # The Wasm cell names only the alias: its target, newer in the other sandbox, must come along.
    through = kernel.execute("alias.append(6)")
    assert meta(through)["sandbox"] == "wasm", through.texts()
    seen = kernel.execute("rows, alias is rows")
    assert meta(seen)["sandbox"] == "wasm"
    assert seen.result_text == "([5, 6], True)", seen.texts()


def test_values_that_cannot_cross_are_named(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_MODE": "subprocess"})
    kernel.execute("import numpy as np\narr = np.arange(3)")
    kernel.execute("%capsule mode wasm")
    result = kernel.execute("arr")
    assert "Not brought over from the subprocess sandbox" in result.stderr
    assert "arr" in result.stderr and "numpy" in result.stderr
    assert result.error["ename"] == "NameError"


def test_mode_magic_validates(fresh_kernel):
    kernel = fresh_kernel()
    shown = kernel.execute("%capsule mode")
    assert "Routing mode: subprocess" in shown.texts()
    bad = kernel.execute("%capsule mode fast")
    assert bad.error["ename"] == "UsageError" and "invalid choice" in bad.error["evalue"]
    assert "Routing mode: subprocess" in kernel.execute("%capsule mode").texts()


def test_compiled_runtime_is_cached(tmp_path):
    """A fresh cache compiles (and says so); the next start loads the artifact."""
    env = {"CAPSULE_MODE": "wasm", "CAPSULE_WASM_CACHE": str(tmp_path / "cache")}
    first = start_kernel(env=env, cwd=tmp_path)
    try:
        cold = first.execute("1 + 1")
        assert "Compiling the Wasm runtime" in cold.stderr
        assert cold.result_text == "2"
    finally:
        first.close()
    assert list((tmp_path / "cache").glob("python-*.cwasm"))
    second = start_kernel(env=env, cwd=tmp_path)
    try:
        warm = second.execute("1 + 1")
        assert "Compiling" not in warm.stderr
        assert warm.result_text == "2"
    finally:
        second.close()


def test_capsule_toml_sets_mode_and_fs_access(fresh_kernel, tmp_path):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "input.csv").write_text("a,b\n1,2\n")
    (project / "capsule.toml").write_text('mode = "wasm"\n\n[fs_access]\nread = ["data"]\nwrite = ["missing"]\n')
    kernel = fresh_kernel(cwd=project)
    path = str(project / "data" / "input.csv")
    result = kernel.execute(f"import csv\nlist(csv.reader(open({path!r})))")
    assert meta(result)["sandbox"] == "wasm"
    assert result.result_text == "[['a', 'b'], ['1', '2']]", result.texts()
    listed = kernel.execute("%capsule mount").texts()
    assert str(project / "data") in listed and "read-only" in listed


def test_shutdown_stops_both_sandboxes(tmp_path):
    import re

    from tests.harness import wait_until

    kernel = start_kernel(env={"CAPSULE_MODE": "auto"}, cwd=tmp_path)
    try:
        assert meta(kernel.execute("a = 1")).get("sandbox") == "wasm"
        assert meta(kernel.execute("import numpy")).get("sandbox") == "subprocess"
        worker = kernel.sandbox_pid()
        status = kernel.execute("%capsule status").texts()
        host = int(re.search(r"wasm sandbox\s+pid (\d+)", status).group(1))
        assert os.path.exists(f"/proc/{worker}") and os.path.exists(f"/proc/{host}")
    finally:
        kernel.close()

    def gone(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except OSError:
            return True

    wait_until(lambda: gone(worker) and gone(host), timeout=30, what="both sandboxes stopped")
