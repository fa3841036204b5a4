"""The same notebooks and requests under capsule and under stock ipykernel (python3), compared.

What a user sees must be the same, except for what Capsule adds: the kernel
object, the Output widget, display-id updates, history settings, the IPython
profile, subshells. Each test runs the same thing through both kernels and
compares what came back, with machine details (addresses, pids, thread ids)
blanked out.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from tests.harness import plain, start_kernel
from tests.test_subshells import collect_many, create, execute

pytestmark = pytest.mark.slow
KERNELS = ("python3", "capsule")
_VOLATILE = re.compile(r"0x[0-9a-f]+|\b\d{4,}\b")


def _blank(text: str) -> str:
    return _VOLATILE.sub("N", plain(text))


def _outputs(cell: Any) -> list[tuple[str, str]]:
    """A cell's outputs as (type, text) pairs, as a reader sees them."""
    seen = []
    for output in cell.outputs:
        kind = output["output_type"]
        if kind == "stream":
            seen.append((f"stream:{output['name']}", _blank(output["text"])))
        elif kind == "error":
            seen.append(("error", f"{output['ename']}: {_blank(output['evalue'])}"))
        else:
            data = output.get("data", {})
            widget = data.get("application/vnd.jupyter.widget-view+json")
            seen.append((kind, "<widget view>" if widget else _blank(data.get("text/plain", ""))))
    return seen


def _captured(output: dict[str, Any]) -> tuple[str, str]:
    return output["output_type"], output.get("text") or output.get("data", {}).get("text/plain", "")


def run_notebook(cells: list[str], kernel_name: str, cwd: Path, env: dict[str, str] | None = None) -> Any:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code) for code in cells])
    client = NotebookClient(
        nb, kernel_name=kernel_name, timeout=120, resources={"metadata": {"path": str(cwd)}}, allow_errors=True
    )
    client.execute(env={**os.environ, **(env or {})})
    return nb


NOTEBOOK = [
    # The kernel object, as libraries reach for it.
    "k = get_ipython().kernel\n"
    "print(type(k.session).__name__ != '', k.get_parent()['header']['msg_type'])\n"
    "print(k.iopub_socket is not None, hasattr(k, 'comm_manager'), k.shell is get_ipython())",
    # The Output widget captures what is printed and displayed inside it.
    "import ipywidgets as w\nfrom IPython.display import display\n"
    "out = w.Output()\ndisplay(out)\nwith out:\n    print('inside')\n    display('shown inside')\nprint('outside')",
    # display(..., display_id=True) and its update, in the same cell and from a later one.
    "handle = display('first', display_id=True)\nhandle.update('second')",
    "handle.update('third')\n'done'",
    # Stream, result, error: their text and order.
    "import sys\nprint('out')\nprint('err', file=sys.stderr)\n40 + 2",
    "def f():\n    raise ValueError('nope')\nf()",
    # History: In, Out, _ and the counts, after a cell that stored nothing.
    "_i, len(In) > 0, type(Out).__name__",
]


def test_a_notebook_ends_the_same_under_both_kernels(tmp_path):
    ended = {}
    widgets = {}
    for kernel_name in KERNELS:
        nb = run_notebook(NOTEBOOK, kernel_name, tmp_path)
        ended[kernel_name] = [_outputs(cell) for cell in nb.cells]
        # What the Output widget captured, as nbclient saved it in the widget state.
        state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
        widgets[kernel_name] = [
            [
                (o["output_type"], o.get("text") or o.get("data", {}).get("text/plain"))
                for o in model["state"]["outputs"]
            ]
            for model in state.values()
            if model["model_name"] == "OutputModel"
        ]
    assert ended["capsule"] == ended["python3"]
    assert widgets["capsule"] == widgets["python3"]
    assert widgets["capsule"] == [[("stream", "inside\n"), ("display_data", "'shown inside'")]]
    assert ended["capsule"][1] == [("display_data", "<widget view>"), ("stream:stdout", "outside\n")]
    assert ended["capsule"][2] == [("display_data", "'third'")]


def test_the_users_profile_gives_the_same_names_under_both_kernels(tmp_path):
    profile = tmp_path / "ipython" / "profile_default"
    (profile / "startup").mkdir(parents=True)
    (profile / "startup" / "10-names.py").write_text("from_startup = 'py'\n")
    (profile / "ipython_kernel_config.py").write_text(
        "c.InteractiveShellApp.exec_lines = ['from_exec_lines = from_startup * 2']\n"
    )
    cells = ["from_startup, from_exec_lines", "%who_ls"]
    ended = {
        name: [
            _outputs(cell)
            for cell in run_notebook(cells, name, tmp_path, {"IPYTHONDIR": str(tmp_path / "ipython")}).cells
        ]
        for name in KERNELS
    }
    assert ended["capsule"] == ended["python3"]
    assert ended["capsule"][0] == [("execute_result", "('py', 'pypy')")]


def _requests(kernel_name: str, cwd: Path) -> dict[str, Any]:
    """History settings and subshells through jupyter_client: what came back, blanked."""
    kernel = start_kernel(kernel_name, cwd=cwd)
    try:
        seen: dict[str, Any] = {}
        quiet = kernel.execute("hidden = 1", store_history=False)
        silent = kernel.execute("print('never shown')", silent=True)
        stored = kernel.execute("shown = 2\nshown")
        seen["counts"] = [r.content["execution_count"] for r in (quiet, silent, stored)]
        seen["silent_outputs"] = [m.msg_type for m in silent.messages if m.msg_type != "execute_input"]
        # This session's history (other tests' kernels share stock's history database).
        rows = kernel.request("history", hist_access_type="range", session=0, start=1, output=False, raw=True)
        seen["history"] = [entry[2] for entry in rows["content"]["history"]]
        seen["underscore"] = kernel.execute("_").result_text
        # Subshells: a cell on one sees the main shell's names; its output is its own.
        subshell = create(kernel)
        kernel.execute("import threading\nmeet = threading.Barrier(2, timeout=30)")
        main = execute(kernel, "meet.wait()\nprint('main')", None)
        side = execute(kernel, "meet.wait()\nprint('side', shown)\nshown * 10", subshell)
        results = collect_many(kernel, [main, side])
        seen["subshell"] = {
            "main": (results[main].status, results[main].stdout),
            "side": (results[side].status, results[side].stdout, results[side].result_text),
            "parents": {m.raw["parent_header"].get("subshell_id") == subshell for m in results[side].messages},
            "listed": kernel.control("list_subshell_request")["content"]["subshell_id"] == [subshell],
        }
        seen["completion"] = kernel.request("complete", "sho", 3)["content"]["matches"]
        return seen
    finally:
        kernel.close()


def test_history_settings_and_subshells_answer_the_same_under_both_kernels(tmp_path):
    seen = {name: _requests(name, tmp_path) for name in KERNELS}
    # Capsule numbers each subshell's cells on their own (JEP 91), so counts on a subshell are not compared.
    assert seen["capsule"] == seen["python3"]
    assert seen["capsule"]["history"] == ["shown = 2\nshown"]  # the cells outside history are not in it
    assert seen["capsule"]["subshell"]["side"] == ("ok", "side 2\n", "20")
