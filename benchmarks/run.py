"""Capsule against stock ipykernel, side by side, interleaved in one run.

Measures, for each kernel started through jupyter_client like any frontend:
  * start: KernelManager.start_kernel() until the kernel_info reply arrives
  * first cell: start_kernel() until the reply to a first `1+1` (Capsule:
    the sandbox has started, confined, and answered)
  * roundtrip: a trivial cell, execute_request until iopub status idle
  * crash to restored reply (Capsule only): a cell that calls os._exit, until
    its error reply, which comes after a fresh sandbox has the last
    checkpoint back

Three kernels: Capsule as shipped (confined by bubblewrap), Capsule with
CAPSULE_CONFINEMENT=off (the cost of confinement is the difference), and
stock ipykernel. Runs are interleaved (one of each, then again) so drift in
machine load hits all alike. Prints medians, p95 and the ratios to
ipykernel, and writes benchmarks/results/latest.json.

    ./dev bench [--starts 10] [--cells 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client.manager import KernelManager

# name -> (kernelspec, extra environment)
KERNELS = {
    "capsule": ("capsule", {}),
    "capsule-unconfined": ("capsule", {"CAPSULE_CONFINEMENT": "off"}),
    "ipykernel": ("python3", {}),
}
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


def cell_text(client, code: str, timeout: float = 120.0) -> str:
    """The text/plain of everything a cell displayed or returned."""
    msg_id = client.execute(code)
    texts = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = client.get_iopub_msg(timeout=0.5)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] in ("display_data", "execute_result"):
            texts.append(msg["content"]["data"].get("text/plain", ""))
        elif msg["msg_type"] == "stream":
            texts.append(msg["content"]["text"])
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            wait_reply(client, msg_id, timeout)
            return "\n".join(texts)
    raise TimeoutError(msg_id)


def disk_window(client) -> dict[str, float] | None:
    """How long after their replies the kernel's recent cells were on disk (%capsule status, "on disk")."""
    found = re.search(
        r"on disk\s+p50 ([\d.]+) ms, p99 ([\d.]+) ms, max ([\d.]+) ms after the reply \(last (\d+) cells\)",
        cell_text(client, "%capsule status"),
    )
    if found is None:
        return None
    return {"p50_ms": float(found[1]), "p99_ms": float(found[2]), "max_ms": float(found[3]), "cells": int(found[4])}


def _start(spec: tuple) -> KernelManager:
    """spec: (kernel name, extra environment[, working directory: where its capsule.toml is])."""
    name, extra, *where = spec
    km = KernelManager(kernel_name=name)
    km.start_kernel(env={**os.environ, **extra}, **({"cwd": where[0]} if where else {}))
    return km


def time_start(spec: tuple[str, dict[str, str]]) -> tuple[float, float]:
    """Seconds from start_kernel() to the first kernel_info reply, and to the first cell's reply."""
    began = time.perf_counter()
    km = _start(spec)
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
        info = time.perf_counter() - began
        wait_reply(client, client.execute("1+1"))
        return info, time.perf_counter() - began
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)


def time_crash(client) -> float:
    """A cell that kills its sandbox, until the error reply (fresh sandbox, checkpoint restored)."""
    time_cell(client, "survivor = list(range(1000))")
    began = time.perf_counter()
    msg_id = client.execute("import os\nos._exit(1)")
    reply = wait_reply(client, msg_id, timeout=120)
    elapsed = time.perf_counter() - began
    assert "was restored" in reply["content"].get("evalue", ""), reply["content"]
    wait_idle(client, msg_id)
    return elapsed


def start_ready(spec: tuple[str, dict[str, str]]):
    km = _start(spec)
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
    if name.startswith("capsule"):
        # The worker's host pid (inside its PID namespace it has another): %capsule status says.
        msg_id = client.execute("%capsule status")
        pid = None
        deadline = time.monotonic() + 30
        while pid is None and time.monotonic() < deadline:
            try:
                msg = client.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "display_data":
                match = re.search(r"^pid\s+(\d+)", msg["content"]["data"]["text/plain"], re.MULTILINE)
                pid = int(match.group(1)) if match else None
        wait_reply(client, msg_id)
        result["sandbox_mib"] = rss_bytes(pid) / 2**20 if pid else 0.0
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
    if "ipykernel" in out:
        for name in [key for key in out if key != "ipykernel"]:
            suffix = "" if name == "capsule" else f"_{name}"
            out[f"ratio_median{suffix}"] = out[name]["median_ms"] / out["ipykernel"]["median_ms"]
            out[f"ratio_p95{suffix}"] = out[name]["p95_ms"] / out["ipykernel"]["p95_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=10, help="kernel starts per kernel (default 10)")
    parser.add_argument("--cells", type=int, default=300, help="trivial cells per kernel (default 300)")
    parser.add_argument("--crashes", type=int, default=10, help="crashes per Capsule kernel (default 10)")
    args = parser.parse_args(argv)
    # Checkpoints stay on (they are part of every cell's cost) but go to a scratch store.
    scratch = tempfile.TemporaryDirectory(prefix="capsule-bench-")
    os.environ["CAPSULE_HOME"] = scratch.name

    starts: dict[str, list[float]] = {name: [] for name in KERNELS}
    first_cells: dict[str, list[float]] = {name: [] for name in KERNELS}
    for _ in range(args.starts):
        for name, spec in KERNELS.items():
            info, first = time_start(spec)
            starts[name].append(info)
            first_cells[name].append(first)

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
        crashes: dict[str, list[float]] = {name: [] for name in live if name.startswith("capsule")}
        for _ in range(args.crashes):
            for name in crashes:
                crashes[name].append(time_crash(live[name][1]))
    finally:
        for km, client in live.values():
            client.stop_channels()
            km.shutdown_kernel(now=True)

    report = {
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.machine()},
        "start_to_kernel_info": summarize(starts),
        "start_to_first_cell_reply": summarize(first_cells),
        "crash_to_restored_reply": summarize(crashes),
        "trivial_cell_roundtrip": summarize(cells),
        "state_changing_cell_roundtrip": summarize(state_cells),
        "resident_memory_after_cells": memory,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'measure':30} {'kernel':18} {'n':>4} {'median ms':>10} {'p95 ms':>9} {'p99 ms':>9}")
    measures = (
        "start_to_kernel_info",
        "start_to_first_cell_reply",
        "trivial_cell_roundtrip",
        "state_changing_cell_roundtrip",
        "crash_to_restored_reply",
    )
    for measure in measures:
        section = report[measure]
        for name in KERNELS:
            if name not in section:
                continue
            row = section[name]
            timings = f"{row['median_ms']:>10.2f} {row['p95_ms']:>9.2f} {row['p99_ms']:>9.2f}"
            print(f"{measure:30} {name:18} {row['n']:>4} {timings}")
        for key in [key for key in section if key.startswith("ratio_median")]:
            label = "ratio" + key.removeprefix("ratio_median")
            p95 = section[key.replace("median", "p95")]
            print(f"{measure:30} {label:18} {'':>4} {section[key]:>10.2f} {p95:>9.2f}")
    for name, row in memory.items():
        parts = ", ".join(f"{key} {value:.1f}" for key, value in row.items())
        print(f"{'resident memory (MiB)':30} {name:18} {parts}")
    print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
