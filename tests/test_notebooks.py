"""Headless runs: nbclient, `jupyter execute` and papermill drive the tour."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TOUR = Path(__file__).resolve().parent.parent / "notebooks" / "tour.ipynb"


def outputs_by_id(nb) -> dict[str, list[dict]]:
    return {cell["id"]: cell.get("outputs", []) for cell in nb.cells if cell.cell_type == "code"}


def text_of(outputs: list[dict]) -> str:
    parts = []
    for output in outputs:
        if output["output_type"] == "stream":
            parts.append(output["text"])
        elif output["output_type"] == "error":
            parts.append(f"{output['ename']}: {output['evalue']}\n")
        else:
            parts.append(output.get("data", {}).get("text/plain", "") + "\n")
    return "".join(parts)


def check_tour(nb) -> None:
    out = outputs_by_id(nb)
    assert "This cell runs as process" in text_of(out["where"])
    confined = text_of(out["confined"])
    assert "processes this sandbox can see: [1, 2, 3" in confined  # bubblewrap's init, the supervisor, the worker
    assert "ptrace attach -> -1 Operation not permitted" in confined
    assert "sandbox         subprocess" in text_of(out["status"])
    assert text_of(out["stream"]) == "step 0\nstep 1\nstep 2\n"
    assert any("image/png" in o.get("data", {}) for o in out["plot"])
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in out["widget"])
    assert "MemoryError: the cell exceeded the sandbox memory limit of 1 GiB" in text_of(out["memory"])
    assert "CellTimeout" in text_of(out["timeout"])
    assert "still here: 2 19900" in text_of(out["survived"])
    assert "SandboxDied" in text_of(out["crash"]) and "segmentation fault" in text_of(out["crash"])
    assert "was restored" in text_of(out["crash"])
    assert "not restored" not in text_of(out["crash"]), text_of(out["crash"])  # the figure and axes too
    assert "and the namespace is back: 2 19900" in text_of(out["after-crash"])
    assert "('wasi', {'every': 2" in text_of(out["wasm-cell"])
    assert "linux mean word length 6.0" in text_of(out["numpy-cell"])
    assert "FileNotFoundError" in text_of(out["wasm-isolation"])
    assert "task longest, succeeded" in text_of(out["task-cell"]), text_of(out["task-cell"])
    assert "'sandboxed'" in text_of(out["task-result"])
    assert "['EVERY', 'STATE']" in text_of(out["task-api"])
    assert "longest" in text_of(out["task-list"]) and "succeeded" in text_of(out["task-list"])


@pytest.mark.slow
def test_nbclient_runs_the_tour(tmp_path):
    nb = nbformat.read(TOUR, as_version=4)
    NotebookClient(nb, kernel_name="capsule", timeout=120, resources={"metadata": {"path": str(tmp_path)}}).execute()
    check_tour(nb)
    # Widgets leave their state in the notebook, as in stock ipykernel.
    assert "application/vnd.jupyter.widget-state+json" in nb.metadata.get("widgets", {})


@pytest.mark.slow
def test_jupyter_execute_runs_the_tour(tmp_path):
    target = tmp_path / "tour.ipynb"
    target.write_text(TOUR.read_text())
    jupyter = Path(sys.executable).parent / "jupyter"
    run = subprocess.run(
        [str(jupyter), "execute", str(target), "--kernel_name=capsule", "--inplace"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    check_tour(nbformat.read(target, as_version=4))
    # What ./dev tour prints: rich outputs as a reader wants them, not as object reprs.
    shown = subprocess.run(
        [sys.executable, str(TOUR.parent.parent / "scripts" / "show_outputs.py"), str(target)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "**Rich output** works as in IPython." in shown
    assert "<IntSlider widget: description='size', value=5" in shown
    assert "<FloatProgress widget: value=200.0" in shown  # the tqdm bar, from the saved widget state
    assert "<IPython.core.display" not in shown and "<widget " not in shown


@pytest.mark.slow
def test_papermill_runs_a_parameterised_notebook(tmp_path):
    import papermill

    source = tmp_path / "params.ipynb"
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("rows = 1", metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell("import os\nprint('rows', rows, 'pid', os.getpid())"),
        ],
        metadata={"kernelspec": {"name": "capsule", "display_name": "Capsule", "language": "python"}},
    )
    nbformat.write(nb, source)
    result = papermill.execute_notebook(
        str(source), str(tmp_path / "out.ipynb"), parameters={"rows": 7}, kernel_name="capsule"
    )
    assert "rows 7 pid" in text_of(result.cells[-1].outputs)


def test_a_failing_cell_stops_a_headless_run_with_a_clear_error(tmp_path):
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("import os\nos._exit(9)"), nbformat.v4.new_code_cell("1")]
    )
    with pytest.raises(CellExecutionError) as failure:
        NotebookClient(nb, kernel_name="capsule", timeout=60).execute()
    assert "SandboxDied" in str(failure.value)
    assert "exited with code 9" in str(failure.value)


@pytest.mark.slow
def test_the_clients_ipython_configuration_reaches_the_sandbox(tmp_path):
    """--HistoryManager.hist_file=:memory: (what nbclient passes to kernels it knows as ipykernel) and exec_lines."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("str(get_ipython().history_manager.hist_file)"),
        nbformat.v4.new_code_cell("import os\nfrom_exec_lines == os.getpid()"),
    ]
    client = NotebookClient(nb, kernel_name="capsule", timeout=120, resources={"metadata": {"path": str(tmp_path)}})
    client.extra_arguments = [
        "--HistoryManager.hist_file=:memory:",
        "--InteractiveShellApp.exec_lines=['import os', 'from_exec_lines = os.getpid()']",
    ]
    client.execute()
    assert nb.cells[0].outputs[0]["data"]["text/plain"] == "':memory:'"
    assert nb.cells[1].outputs[0]["data"]["text/plain"] == "True"  # run in the sandbox, not the kernel


def test_the_users_ipython_profile_applies_in_the_sandbox(fresh_kernel, tmp_path):
    """Startup files, extensions and exec_lines of the profile run in the sandbox, as ipykernel runs them.

    A broken startup file and a missing extension are shown with the first cell; the sandbox starts anyway.
    """
    profile = tmp_path / "ipython" / "profile_default"
    (profile / "startup").mkdir(parents=True)
    (profile / "startup" / "00-first.py").write_text(
        "import os\nfrom_startup = 'py'\nopen('startup-ran-in.txt', 'a').write(f'{os.getpid()}\\n')\n"
    )
    (profile / "startup" / "20-broken.py").write_text("raise ValueError('broken on purpose')\n")
    (profile / "startup" / "30-magic.ipy").write_text("from_ipy = %pwd\n")
    (profile / "ipython_kernel_config.py").write_text(
        "c.InteractiveShellApp.extensions = ['autoreload', 'no_such_extension']\n"
        "c.InteractiveShellApp.exec_lines = ['from_exec_lines = from_startup * 2']\n"
    )
    kernel = fresh_kernel(env={"IPYTHONDIR": str(tmp_path / "ipython")})
    first = kernel.execute("from_startup, from_exec_lines, from_ipy == os.getcwd()")
    assert first.result_text == "('py', 'pypy', True)", first.texts()
    assert "your IPython profile did not fully apply" in first.stderr
    assert "20-broken.py: ValueError: broken on purpose" in first.stderr
    assert "extension no_such_extension: ModuleNotFoundError" in first.stderr
    assert "did not fully apply" not in kernel.execute("1").texts()  # said once
    assert kernel.execute("%autoreload 2").status == "ok"  # the extension is loaded
    assert kernel.execute("%store from_startup").status == "ok"  # storemagic, as ipykernel loads it
    # Run by the sandbox, never by the kernel process; its names are hidden from %who as in ipykernel.
    ran_in = (tmp_path / "startup-ran-in.txt").read_text().split()
    assert ran_in and str(kernel.km.provisioner.process.pid) not in ran_in
    assert "from_startup" not in kernel.execute("%who").texts()
    # A start-up name a cell rebinds is the user's again: %who lists it and a crash keeps it.
    kernel.execute("from_startup = 'mine'")
    assert "from_startup" in kernel.execute("%who").texts()
    kernel.execute("%capsule log -n 1")
    kernel.execute("import os; os._exit(1)")
    assert kernel.execute("from_startup, from_exec_lines").result_text == "('mine', 'pypy')"


UPDATE_BY_DISPLAY_ID = [
    # As nbclient's own update-display-id notebook: a helper that publishes through the kernel object.
    "ip = get_ipython()\nfrom IPython.display import display\n\n"
    "def show(obj, display_id, update=False, execute_result=False):\n"
    "    data, md = ip.display_formatter.format(obj)\n"
    "    content = {'data': data, 'metadata': md, 'transient': {'display_id': str(display_id)}}\n"
    "    if execute_result:\n"
    "        kind = 'execute_result'\n"
    "        content['execution_count'] = ip.execution_count\n"
    "    else:\n"
    "        kind = 'update_display_data' if update else 'display_data'\n"
    "    ip.kernel.session.send(ip.kernel.iopub_socket, kind, content, parent=ip.parent_header)",
    "display('above')\nshow(1, 'here')\ndisplay('below')",
    "show(2, 'here')\nshow(3, 'there')\nshow(4, 'here')",
    "show(5, 'there')\nshow(6, 'there', update=True)",
    "show(7, 'here')\nshow(8, 'here', update=True)\nshow(9, 'result', execute_result=True)",
    "show(10, 'result', update=True)",
]


@pytest.mark.slow
def test_display_updates_through_the_kernel_object_match_stock_ipykernel(tmp_path):
    """nbclient applies display-id updates across cells: the notebook ends the same as with ipykernel."""
    ended = {}
    for kernel_name in ("python3", "capsule"):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code) for code in UPDATE_BY_DISPLAY_ID])
        where = {"metadata": {"path": str(tmp_path)}}
        NotebookClient(nb, kernel_name=kernel_name, timeout=120, resources=where).execute()
        ended[kernel_name] = [
            [(o["output_type"], o.get("data", {}).get("text/plain")) for o in cell.outputs] for cell in nb.cells
        ]
    assert ended["capsule"] == ended["python3"]
    assert ended["capsule"][1] == [("display_data", "'above'"), ("display_data", "8"), ("display_data", "'below'")]
    assert ended["capsule"][4][-1] == ("execute_result", "10")
