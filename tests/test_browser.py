"""A real JupyterLab in a real browser (Debian's chromium, driven by npm's playwright-core).

One JupyterLab server and one browser session walk through what a user does
with the capsule kernel: Run All on the tour, run a cell, read a traceback on
the light and the dark theme, move a slider from the kernel, the keyboard and
the mouse, capture output in an Output widget, press the stop button on an
endless loop, read a running loop's variable from a subshell console,
Tab-complete after a Wasm cell, press Restart ten times, and move a widget
after its sandbox crashed. tests/browser/lab.mjs does the
clicking and reports what the page showed; this file starts the server and
checks it. Screenshots of every step go to test-artifacts/browser/
(CAPSULE_ARTIFACTS); pictures of single cells for the user guide to
test-artifacts/browser/guide/ (docs/images/ holds copies).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import nbformat
import pytest

from tests.harness import wait_until

pytestmark = pytest.mark.slow
BROWSER_DIR = Path(__file__).parent / "browser"
TOUR = Path(__file__).parent.parent / "notebooks" / "tour.ipynb"
ARTIFACTS = Path(os.environ.get("CAPSULE_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts")) / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NODE = shutil.which("node")
TOKEN = "capsule-browser-test"

needs_browser = pytest.mark.skipif(
    CHROMIUM is None or NODE is None or not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir(),
    reason="needs Debian's chromium, node and tests/browser/node_modules (./dev setup installs them)",
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server of its own (settings and workspaces in tmp_path), with a capsule notebook."""
    root = tmp_path / "root"
    root.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "capsule", "display_name": "Capsule (sandboxed Python)", "language": "python"}
    nb.cells.append(nbformat.v4.new_code_cell(""))
    nbformat.write(nb, root / "walkthrough.ipynb")
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, root / "stock.ipynb")  # the same cells in stock ipykernel, to compare with
    shutil.copy(TOUR, root / "tour.ipynb")
    # Every cell rendered, not only those near the viewport: the test reads them all.
    windowing = tmp_path / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    windowing.parent.mkdir(parents=True)
    windowing.write_text(json.dumps({"windowingMode": "none"}))
    # No "get notified about Jupyter news?" toast over the screenshots.
    notification = tmp_path / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port = _free_port()
    log = (tmp_path / "lab.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
         "--LabApp.expose_app_in_browser=True", f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
         f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",  "--ServerApp.log_level=INFO"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url), timeout=120, what="JupyterLab to answer")
        yield {
            "url": url, "notebook": "walkthrough.ipynb", "stock": "stock.ipynb", "tour": "tour.ipynb",
            "log": tmp_path / "lab.log",
        }  # fmt: skip
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@needs_browser
@pytest.mark.timeout(900)
def test_a_user_session_in_jupyterlab(lab):
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # this run's screenshots only
    ARTIFACTS.mkdir(parents=True)
    config = {
        "url": lab["url"],
        "token": TOKEN,
        "notebook": lab["notebook"],
        "stock_notebook": lab["stock"],
        "tour": lab["tour"],
        "chromium": CHROMIUM,
        "shots": str(ARTIFACTS),
        "guide_shots": str(ARTIFACTS / "guide"),
        "timeout_ms": int(os.environ.get("CAPSULE_BROWSER_WAIT_MS", "120000")),
        "restarts": 10,
    }
    done = subprocess.run(
        [NODE, str(BROWSER_DIR / "lab.mjs"), json.dumps(config)],
        capture_output=True, text=True, timeout=900, cwd=BROWSER_DIR,
    )  # fmt: skip
    assert done.stdout.strip(), f"the browser script printed nothing: {done.stderr[-3000:]}"
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    (ARTIFACTS / "seen.json").write_text(json.dumps(seen, indent=1))  # what the page showed, to read after a run
    server_log = lab["log"].read_text()
    assert "error" not in seen, f"{seen.get('error')}\nsteps done: {seen['steps']}\nserver log:\n{server_log[-4000:]}"

    # The tour: Run All ran every cell; each shows what it made, and only the cells meant to fail show errors.
    code_cells = [cell for cell in nbformat.read(TOUR, as_version=4).cells if cell.cell_type == "code"]
    assert len(seen["tour"]) == len(code_cells)
    for cell in seen["tour"]:
        assert cell["count"] is not None, cell
        assert cell["outputs"], cell
        assert all(output["rendered"] for output in cell["outputs"]), cell
        assert ("error" in cell["types"]) == ("raises-exception" in cell["tags"]), cell
    assert seen["kernel"] == "capsule"
    assert "hello from capsule 42" in seen["first_output"]
    # Tracebacks: the user's frames and the error, the very text and colours stock ipykernel shows, on the
    # light and the dark theme (so exactly as readable as there).
    assert "ZeroDivisionError" in seen["traceback"] and "divide(1, 0)" in seen["traceback"]
    assert "capsule_kernel" not in seen["traceback"]
    assert seen["traceback"].replace("In[2]", "In[N]") == seen["stock_traceback"].replace("In[1]", "In[N]")
    for theme in ("light", "dark"):
        assert seen[f"capsule_{theme}"]["used"] == seen[f"stock_{theme}"]["used"], theme
        assert seen[f"capsule_{theme}"]["lowest"]["ratio"] >= seen[f"stock_{theme}"]["lowest"]["ratio"] - 0.01
    # The slider: moved by the kernel (the page shows 7), then by the keyboard on the page (the kernel sees 8).
    assert seen["readout_after_kernel_move"] == "7"
    assert "slider at 8" in seen["slider_after_page_move"]
    # Dragged with the mouse: the page shows a higher value, and the sandbox's observer saw the same one.
    dragged = int(seen["readout_after_drag"])
    assert dragged > 8
    assert f"observed {dragged} value {dragged}" in seen["observer_after_drag"], seen["observer_after_drag"]
    # The Output widget holds what was printed inside it; the cell shows only what was printed outside.
    assert "captured inside" in seen["output_widget"]["inside"]
    assert "printed outside" in seen["output_widget"]["outside"]
    assert "captured inside" not in seen["output_widget"]["outside"]
    # The stop button: the loop ends with KeyboardInterrupt, the namespace is kept.
    assert "KeyboardInterrupt" in seen["interrupted"]
    assert "spun True x is 41" in seen["after_interrupt"]
    # A subshell console read the loop's variable while the loop ran; the stop button then ended the loop.
    assert "the loop is at True" in seen["subshell_output"]
    assert f"subshell id: {seen['subshell_id']}" in seen["subshell_output"]
    assert "KeyboardInterrupt" in seen["loop_interrupted"]
    # Tab after a Wasm cell completes from the subprocess sandbox, and at once after switching modes.
    assert "wasi" in seen["wasm_cell"]
    assert seen["completion_auto"]["source"] == "collections.OrderedDict", seen["completion_auto"]
    assert seen["completion_subprocess"]["source"] == "collections.defaultdict", seen["completion_subprocess"]
    assert seen["completion_after_switch"]["source"] == "collections.OrderedDict", seen["completion_after_switch"]
    # A crash: the widget on the page still drives its restored object, whose observer runs.
    assert "SandboxDied" in seen["crash"] and "restored" in seen["crash"], seen["crash"]
    assert "after the crash [3] 3" in seen["after_crash"], seen["after_crash"]
    # Restart: a fresh namespace every time, no crash report, no restored checkpoint.
    assert [text.strip() for text in seen["restarts"]] == ["kept: False"] * config["restarts"], seen["restarts"]
    for word in ("SandboxDied", "was restored", "SandboxUnavailable"):
        assert word not in seen["page_text"], word
    assert "attached to a different loop" not in server_log
    assert "Traceback" not in server_log, server_log[-4000:]
