"""What checkpointing costs on big namespaces, and how fast a crash comes back.

For a namespace of ~10 MB and one of ~1 GB (numpy arrays plus a pandas
DataFrame), where one array (1/10 of the namespace) changes per cell:

  * added latency: execute_request -> idle of the changing cell on Capsule,
    minus the same on stock ipykernel, interleaved (p50, p99)
  * store growth per cell against the bytes that changed
  * restore after a sandbox death: the failing cell's round trip, which
    includes starting a sandbox and restoring the namespace
  * dill.dump_module / load_module of the same namespace, the usual manual way

Needs numpy, pandas and dill (pip install numpy pandas dill). Kishu is not
driven here yet (see docs/benchmarks.md).

    .venv/bin/python benchmarks/checkpoints.py [--cells 10] [--sizes 10MB,1GB]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from jupyter_client.manager import KernelManager
from run import percentile, time_cell, wait_idle, wait_reply

RESULTS = Path(__file__).parent / "results" / "checkpoints.json"
SIZES = {"10MB": 10 * 2**20, "1GB": 2**30}


def setup_code(total: int) -> str:
    """Nine arrays and a DataFrame, each a tenth of the namespace."""
    part = total // 10
    return (
        "import numpy as np, pandas as pd\n"
        f"arrays = [np.random.default_rng(i).random({part // 8}) for i in range(9)]\n"
        f"frame = pd.DataFrame({{'x': np.arange({part // 16}), 'y': np.ones({part // 16})}})\n"
        "step = 0"
    )


CHANGE = "step += 1\narrays[step % 9] = arrays[step % 9] + 1.0"


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def start(spec: str, home: Path):
    km = KernelManager(kernel_name=spec)
    km.start_kernel(env={**os.environ, "CAPSULE_HOME": str(home)})
    client = km.client()
    client.start_channels()
    client.wait_for_ready(timeout=60)
    return km, client


def bench_size(total: int, cells: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix="capsule-ckpt-bench-"))
    kernels = {"capsule": start("capsule", home), "ipykernel": start("python3", home)}
    try:
        for _, client in kernels.values():
            time_cell(client, setup_code(total))
        # Let the first (full) checkpoint land before measuring the per-cell cost.
        time_cell(kernels["capsule"][1], "%capsule log -n 1")
        latencies: dict[str, list[float]] = {name: [] for name in kernels}
        growth = []
        for _ in range(cells):
            before = dir_size(home)
            for name, (_, client) in kernels.items():
                latencies[name].append(time_cell(client, CHANGE))
            time_cell(kernels["capsule"][1], "%capsule log -n 1")  # wait for that checkpoint
            growth.append(dir_size(home) - before)
        changed_bytes = total // 10
        added = [c - i for c, i in zip(latencies["capsule"], latencies["ipykernel"], strict=True)]
        client = kernels["capsule"][1]
        restore = time_cell(client, "import os\nos._exit(1)")
        check = client.execute("int(step)")
        wait_reply(client, check)
        wait_idle(client, check)
        return {
            "namespace_bytes": total,
            "changed_bytes_per_cell": changed_bytes,
            "added_latency_ms": {
                "p50": statistics.median(added) * 1000,
                "p99": percentile(added, 99) * 1000,
            },
            "capsule_cell_ms_p50": statistics.median(latencies["capsule"]) * 1000,
            "ipykernel_cell_ms_p50": statistics.median(latencies["ipykernel"]) * 1000,
            "store_growth_per_cell_over_changed": statistics.median(growth) / changed_bytes,
            "death_to_restored_reply_s": restore,
            "dill": dill_baseline(total),
        }
    finally:
        for km, client in kernels.values():
            client.stop_channels()
            km.shutdown_kernel(now=True)


def dill_baseline(total: int) -> dict:
    script = (
        "import time, dill, numpy as np, pandas as pd, sys, tempfile, os\n"
        + setup_code(total)
        + "\npath = os.path.join(tempfile.mkdtemp(), 'session.pkl')\n"
        "t = time.perf_counter(); dill.dump_module(path); dump = time.perf_counter() - t\n"
        "t = time.perf_counter(); dill.load_module(path); load = time.perf_counter() - t\n"
        "print(dump, load)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    return {"dump_s": float(out[0]), "load_s": float(out[1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=10)
    parser.add_argument("--sizes", default="10MB,1GB")
    args = parser.parse_args(argv)
    report = {label: bench_size(SIZES[label], args.cells) for label in args.sizes.split(",")}
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
