"""Trusted writers never follow what a sandbox made: the runner's and papermill's output notebooks.

A cell may write the notebook's directory, so it can put a symbolic link, a
FIFO or another directory where the runner writes next. Each test plants one
from inside the sandbox and asserts its effect did not happen: the user's
file is unchanged, nothing appeared in the other directory, the run ended.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "capsule_kernel.client.cli", "run"]
USER_FILE = "# the user's own shell start-up file\n"


def _notebook(path: Path, sources: list[str]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    nbformat.write(nb, path)
    return path


def _run(command: list[str], cwd: Path, home: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "CAPSULE_HOME": str(home), **env})  # fmt: skip


def _setting(tmp_path: Path) -> tuple[Path, Path, Path]:
    work = tmp_path / "work"
    work.mkdir()
    outside = tmp_path / "user"
    outside.mkdir()
    bashrc = outside / ".bashrc"
    bashrc.write_text(USER_FILE)
    return work, outside, bashrc


def _plant_link(name: str, target: Path) -> str:
    return f"import os\nif os.path.lexists({name!r}):\n    os.remove({name!r})\nos.symlink({str(target)!r}, {name!r})\n"


def test_the_runner_does_not_write_through_a_link_the_sandbox_put_in_the_outputs_place(tmp_path):
    work, _, bashrc = _setting(tmp_path)
    source = _notebook(work / "job.ipynb", ["x = 1", _plant_link("job.out.ipynb", bashrc), "x + 1"])
    done = _run([*CLI, str(source)], work, tmp_path / "home")
    assert done.returncode == 0, done.stderr[-2000:]
    assert bashrc.read_text() == USER_FILE
    out = work / "job.out.ipynb"
    assert not out.is_symlink() and out.is_file()
    assert nbformat.read(out, as_version=4).cells[2].outputs[0]["data"]["text/plain"] == "2"


def test_a_fifo_in_the_outputs_place_neither_blocks_the_runner_nor_a_resume(tmp_path):
    work, _, _ = _setting(tmp_path)
    plant = "import os\nos.remove('job.out.ipynb')\nos.mkfifo('job.out.ipynb')\n"
    source = _notebook(work / "job.ipynb", ["x = 1", plant, "x + 1"])
    done = _run([*CLI, str(source)], work, tmp_path / "home")
    assert done.returncode == 0, done.stderr[-2000:]
    out = work / "job.out.ipynb"
    assert out.is_file()
    os.remove(out)
    os.mkfifo(out)  # as a sandbox of an earlier run could have left it
    resumed = _run([*CLI, str(source), "--resume"], work, tmp_path / "home")
    assert resumed.returncode == 2 and "a FIFO" in resumed.stderr, resumed.stderr[-2000:]


def test_a_directory_swapped_in_the_outputs_path_is_never_written(tmp_path):
    work, outside, _ = _setting(tmp_path)
    results = work / "results"
    results.mkdir()
    swap = f"import os\nos.rename('results', 'results.old')\nos.symlink({str(outside)!r}, 'results')\n"
    source = _notebook(work / "job.ipynb", ["x = 1", swap, "x + 1"])
    done = _run([*CLI, str(source), "-o", str(results / "out.ipynb")], work, tmp_path / "home")
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in outside.iterdir()) == [".bashrc"]
    # The directory the user named, wherever the sandbox moved it, holds the output.
    assert (work / "results.old" / "out.ipynb").is_file()


def test_papermill_does_not_write_through_a_link_the_sandbox_put_in_the_outputs_place(tmp_path):
    work, _, bashrc = _setting(tmp_path)
    source = _notebook(work / "pm.ipynb", ["x = 1", _plant_link("pm.out.ipynb", bashrc), "x + 1"])
    output = work / "pm.out.ipynb"
    papermill = [sys.executable, "-m", "papermill", str(source), str(output), "-k", "capsule", "--engine", "capsule",
                 "--language", "python", "--cwd", str(work)]  # fmt: skip
    done = _run(papermill, work, tmp_path / "home")
    assert done.returncode == 0, done.stderr[-2000:]
    assert bashrc.read_text() == USER_FILE
    assert not output.is_symlink() and output.is_file()


# -- the kernel's own reads in the notebook's directory ----------------------------------------


@pytest.mark.parametrize(
    "plant",
    [
        "import os\nos.mkfifo('capsule.toml')",  # opening it would wait for a writer forever
        "import os\nos.symlink('/dev/zero', 'capsule.toml')",  # reading it would never end
        "import os\nos.mkfifo('pyproject.toml')",
    ],
    ids=["fifo", "link-to-dev-zero", "fifo-pyproject"],
)
def test_a_config_file_a_cell_plants_neither_blocks_nor_floods_the_kernel(fresh_kernel, tmp_path, plant):
    import psutil

    from tests.security.helpers import kernel_pid

    kernel = fresh_kernel(env={"CAPSULE_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    kernel.execute("x = 1")
    rss_before = psutil.Process(kernel_pid(kernel)).memory_info().rss
    planted = kernel.execute(plant)
    assert planted.status == "ok", planted.texts()
    # The kernel looks at its config files after every cell: it must still answer, and stay small.
    assert kernel.execute("x + 1", timeout=60).result_text == "2"
    assert kernel.execute("%capsule status", timeout=60).status == "ok"
    assert psutil.Process(kernel_pid(kernel)).memory_info().rss < rss_before + 200 * 1024 * 1024
