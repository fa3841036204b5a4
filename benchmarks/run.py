"""Capsule against stock ipykernel, side by side, interleaved in one run.

Measures, for both kernels started through jupyter_client like any frontend:
  * start: KernelManager.start_kernel() until the kernel_info reply arrives
  * roundtrip: a trivial cell, execute_request until iopub status idle

Runs are interleaved (capsule, ipykernel, capsule, ...) so drift in machine
load hits both alike. Prints a table of medians, p95 and the capsule/ipykernel
ratio, and writes benchmarks/results/latest.json.

    ./dev bench [--starts 10] [--cells 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client.manager import KernelManager

KERNELS = {"capsule": "capsule", "ipykernel": "python3"}
RESULTS = Path(__file__).parent / "results" / "latest.json"


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def wait_for(get_msg, msg_id: str, accept=None, timeout: float = 60.0) -> dict:
    """The first message on a channel answering msg_id that `accept` takes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = get_msg(timeout=0.5)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") == msg_id and (accept is None or accept(msg)):
            return msg
    raise TimeoutError(msg_id)


def wait_reply(client, msg_id: str, timeout: float = 60.0) -> dict:
    return wait_for(client.get_shell_msg, msg_id, timeout=timeout)


def wait_idle(client, msg_id: str, timeout: float = 60.0) -> None:
    wait_for(
        client.get_iopub_msg,
        msg_id,
        lambda msg: msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle",
        timeout,
    )


def time_start(spec: str) -> float:
    """Seconds from start_kernel() to the first kernel_info reply."""
    km = KernelManager(kernel_name=spec)
    began = time.perf_counter()
    km.start_kernel()
    client = km.client()
    client.start_channels()
    try:
        while True:
            msg_id = client.kernel_info()
            try:
                wait_reply(client, msg_id, timeout=1.0)
                break
            except TimeoutError:
                if time.perf_counter() - began > 60:
                    raise
        return time.perf_counter() - began
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)


def start_ready(spec: str):
    km = KernelManager(kernel_name=spec)
    km.start_kernel()
    client = km.client()
    client.start_channels()
    client.wait_for_ready(timeout=60)
    # Warm up: the first cells pay for imports on both sides.
    for _ in range(20):
        msg_id = client.execute("1+1")
        wait_reply(client, msg_id)
        wait_idle(client, msg_id)
    return km, client


def time_cell(client, code: str = "1+1") -> float:
    began = time.perf_counter()
    msg_id = client.execute(code)
    wait_idle(client, msg_id)
    elapsed = time.perf_counter() - began
    wait_reply(client, msg_id)
    return elapsed


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def resident_memory(name: str, km, client) -> dict[str, float]:
    """Resident memory of the kernel process, and of the sandbox for capsule."""
    kernel_pid = km.provisioner.process.pid
    result = {"kernel_mib": rss_bytes(kernel_pid) / 2**20}
    if name == "capsule":
        msg_id = client.execute("import os; print(os.getpid())")
        pid = None
        deadline = time.monotonic() + 30
        while pid is None and time.monotonic() < deadline:
            try:
                msg = client.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
                pid = int(msg["content"]["text"])
        wait_reply(client, msg_id)
        result["sandbox_mib"] = rss_bytes(pid) / 2**20
    result["total_mib"] = sum(result.values())
    return result


def summarize(samples: dict[str, list[float]], unit_scale: float = 1000.0) -> dict:
    out = {}
    for name, values in samples.items():
        out[name] = {
            "n": len(values),
            "median_ms": statistics.median(values) * unit_scale,
            "p95_ms": percentile(values, 95) * unit_scale,
            "p99_ms": percentile(values, 99) * unit_scale,
        }
    out["ratio_median"] = out["capsule"]["median_ms"] / out["ipykernel"]["median_ms"]
    out["ratio_p95"] = out["capsule"]["p95_ms"] / out["ipykernel"]["p95_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=10, help="kernel starts per kernel (default 10)")
    parser.add_argument("--cells", type=int, default=300, help="trivial cells per kernel (default 300)")
    args = parser.parse_args(argv)
    # Checkpoints stay on (they are part of every cell's cost) but go to a scratch store.
    scratch = tempfile.TemporaryDirectory(prefix="capsule-bench-")
    os.environ["CAPSULE_HOME"] = scratch.name

    starts: dict[str, list[float]] = {name: [] for name in KERNELS}
    for _ in range(args.starts):
        for name, spec in KERNELS.items():
            starts[name].append(time_start(spec))

    live = {name: start_ready(spec) for name, spec in KERNELS.items()}
    cells: dict[str, list[float]] = {name: [] for name in KERNELS}
    state_cells: dict[str, list[float]] = {name: [] for name in KERNELS}
    try:
        for _ in range(args.cells):
            for name, (_, client) in live.items():
                cells[name].append(time_cell(client))
        # A cell that changes state: Capsule checkpoints after each one.
        for _, client in live.values():
            time_cell(client, "counter = 0\nsettings = {'alpha': 0.1, 'names': ['a', 'b']}\nrows = list(range(1000))")
        for _ in range(args.cells):
            for name, (_, client) in live.items():
                state_cells[name].append(time_cell(client, "counter = counter + 1"))
        memory = {name: resident_memory(name, km, client) for name, (km, client) in live.items()}
    finally:
        for km, client in live.values():
            client.stop_channels()
            km.shutdown_kernel(now=True)

    report = {
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.machine()},
        "start_to_kernel_info": summarize(starts),
        "trivial_cell_roundtrip": summarize(cells),
        "state_changing_cell_roundtrip": summarize(state_cells),
        "resident_memory_after_cells": memory,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'measure':30} {'kernel':10} {'n':>4} {'median ms':>10} {'p95 ms':>9} {'p99 ms':>9}")
    for measure in ("start_to_kernel_info", "trivial_cell_roundtrip", "state_changing_cell_roundtrip"):
        section = report[measure]
        for name in KERNELS:
            row = section[name]
            timings = f"{row['median_ms']:>10.2f} {row['p95_ms']:>9.2f} {row['p99_ms']:>9.2f}"
            print(f"{measure:30} {name:10} {row['n']:>4} {timings}")
        print(f"{measure:30} {'ratio':10} {'':>4} {section['ratio_median']:>10.2f} {section['ratio_p95']:>9.2f}")
    for name, row in memory.items():
        parts = ", ".join(f"{key} {value:.1f}" for key, value in row.items())
        print(f"{'resident memory (MiB)':30} {name:10} {parts}")
    print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
