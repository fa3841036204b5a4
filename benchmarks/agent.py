"""A program driving the kernel: small cells sent back to back, Capsule against stock ipykernel.

The workload of issue 15: a namespace of about 10 MB (a 1M-float numpy
array, a dict of 20,000 small dicts, a list that grows), then cells sent as
fast as the replies come, each touching a little of it. Blocks of cells
alternate between the kernels so that machine drift hits both alike.
Reported: the total-time ratio and the per-cell p50 / p95 of each kernel,
with checkpoints on (one per cell, the default), with coalesced snapshots
(`coalesce = "1s"`), and with CAPSULE_CHECKPOINTS=off as the floor; and, for
the default, how long after each reply its checkpoint was on disk (the
window a power loss could hit: `%capsule status`, "on disk").

    .venv/bin/python benchmarks/agent.py [--blocks 24] [--cells 60]

Writes benchmarks/results/agent.json; docs/benchmarks.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.run import disk_window, percentile, start_ready, wait_idle, wait_reply

RESULTS = Path(__file__).parent / "results" / "agent.json"
SETUP = (
    "import numpy as np\n"
    "array = np.random.default_rng(0).random(1_000_000)\n"
    "table = {i: {'id': i, 'name': f'row{i}', 'score': i * 0.5} for i in range(20_000)}\n"
    "log = []"
)
CELLS = (
    "log.append(len(log))",
    "total = float(array[:1000].sum())",
    "table[len(log)]['score'] += 1",
    "x = len(table) + len(log)",
)


def coalesced_project() -> str:
    """A working directory whose capsule.toml opts into coalesced snapshots (the default is one per cell)."""
    project = tempfile.mkdtemp()
    Path(project, "capsule.toml").write_text('[checkpoints]\ncoalesce = "1s"\n')
    return project


def cell_time(client, code: str) -> float:
    began = time.perf_counter()
    msg_id = client.execute(code)
    wait_reply(client, msg_id, timeout=600)
    elapsed = time.perf_counter() - began
    wait_idle(client, msg_id, timeout=600)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--cells", type=int, default=60)
    args = parser.parse_args(argv)
    home = tempfile.mkdtemp()
    specs = {
        "ipykernel": ("python3", {}),
        "capsule": ("capsule", {"CAPSULE_HOME": home}),
        "capsule (checkpoints off)": ("capsule", {"CAPSULE_CHECKPOINTS": "off"}),
        "capsule (coalesce 1s)": ("capsule", {"CAPSULE_HOME": home}, coalesced_project()),
    }
    kernels = {name: start_ready(spec) for name, spec in specs.items()}
    times: dict[str, list[float]] = {name: [] for name in specs}
    totals: dict[str, float] = dict.fromkeys(specs, 0.0)
    try:
        for _, client in kernels.values():
            cell_time(client, SETUP)
        for _ in range(args.blocks):
            for name, (_, client) in kernels.items():
                began = time.perf_counter()
                for n in range(args.cells):
                    times[name].append(cell_time(client, CELLS[n % len(CELLS)]))
                totals[name] += time.perf_counter() - began
        # The power-loss window at this pace: how long after each reply its checkpoint was on disk.
        windows = {name: disk_window(client) for name, (_, client) in kernels.items() if name == "capsule"}
    finally:
        for km, client in kernels.values():
            client.stop_channels()
            km.shutdown_kernel(now=True)
    base = totals["ipykernel"]
    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
        "cells": args.cells * args.blocks,
        "kernels": {
            name: {
                "total_s": totals[name],
                "ratio_to_ipykernel": totals[name] / base,
                "p50_ms": statistics.median(values) * 1000,
                "p95_ms": percentile(values, 95) * 1000,
                **({"on_disk_after_reply": windows[name]} if name in windows else {}),
            }
            for name, values in times.items()
        },
    }
    for name, row in results["kernels"].items():
        print(f"{name:28} total {row['total_s']:.2f} s  x{row['ratio_to_ipykernel']:.2f}  "
              f"p50 {row['p50_ms']:.1f} ms  p95 {row['p95_ms']:.1f} ms")  # fmt: skip
        if row.get("on_disk_after_reply"):
            print(f"{'':28} on disk after the reply: {row['on_disk_after_reply']}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
