"""Kishu on the checkpoint benchmark's workload; runs INSIDE Kishu's own venv.

Kishu pins its own ipykernel/IPython, so benchmarks/checkpoints.py runs this
script with the interpreter of a separate environment and reads one JSON
line from stdout. Kishu checkpoints in IPython's post_run_cell hook, so the
cost it adds to a cell is measured on an InteractiveShell: the same cells
with and without Kishu attached, interleaved. ENV_KISHU_TEST_MODE keeps it
from asking a (here absent) frontend to save the notebook file.

    python kishu_driver.py SETUP_CODE CHANGE_CODE CELLS EXPERIMENTAL(0|1) HOME_DIR
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path


def store_size(home: Path) -> int:
    return sum(p.stat().st_size for p in home.glob("bench.kishudb*"))


def main() -> int:
    setup, change, cells, experimental = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    home = Path(sys.argv[5])  # the caller removes it (gigabytes of Kishu's store at 1 GB)
    os.environ["HOME"] = str(home)  # Kishu keeps its store and config under ~/.kishu
    os.environ["ENV_KISHU_TEST_MODE"] = "1"
    import nbformat
    from IPython.core.interactiveshell import InteractiveShell
    from kishu.jupyterint import KishuForJupyter
    from kishu.notebook_id import NotebookId
    from kishu.storage.config import Config

    Config.set("IDGRAPH", "experimental_tracker", experimental)
    notebook = home / "bench.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), notebook)
    shell = InteractiveShell.instance()
    kishu = KishuForJupyter(NotebookId(key="bench", path=notebook, kernel_id="bench"), ip=shell)
    kishu.install_kishu_hooks()

    def run(code: str) -> float:
        began = time.perf_counter()
        result = shell.run_cell(code, store_history=True)
        elapsed = time.perf_counter() - began
        if not result.success:
            raise SystemExit(f"cell failed: {result.error_in_exec or result.error_before_exec}")
        return elapsed

    run(setup)
    after_setup = store_size(home)
    with_kishu = []
    for _ in range(cells):
        with_kishu.append(run(change))
        if len(with_kishu) == cells - 1:
            earlier = kishu._kishu_branch.get_head().commit_id
    growth = (store_size(home) - after_setup) / cells
    # Time travel one cell back: Kishu's restore of a 1-array difference.
    began = time.perf_counter()
    kishu.checkout(earlier, skip_notebook=True)
    checkout = time.perf_counter() - began
    kishu.uninstall_kishu_hooks()
    without = [run(change) for _ in range(cells)]
    print(
        json.dumps(
            {
                "cell_s_p50_with": statistics.median(with_kishu),
                "cell_s_p50_without": statistics.median(without),
                "added_s_p50": statistics.median(with_kishu) - statistics.median(without),
                "added_s_max": max(with_kishu) - statistics.median(without),
                "checkout_s": checkout,
                "store_growth_per_cell_bytes": growth,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
