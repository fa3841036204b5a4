"""The Wasm sandbox side by side with the subprocess sandbox and stock ipykernel.

In one run, interleaved cell by cell so machine drift hits all three alike:
  * trivial cell round trip (execute_request until iopub idle) in a capsule
    kernel in wasm mode, one in subprocess mode, and stock ipykernel;
  * cold start: the first Wasm cell of a fresh kernel, with an empty compile
    cache (the runtime is compiled) and with a warm one (loaded from disk);
  * the analyzer on a 200-line cell (target < 1 ms), uncached.

    .venv/bin/python benchmarks/wasm.py [--cells 300] [--cold 3]

Writes benchmarks/results/wasm.json; docs/benchmarks.md quotes it.
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

from jupyter_client.manager import KernelManager

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.run import percentile, start_ready, time_cell, wait_idle, wait_reply

RESULTS = Path(__file__).parent / "results" / "wasm.json"


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median_ms": statistics.median(values) * 1000,
        "p95_ms": percentile(values, 95) * 1000,
        "p99_ms": percentile(values, 99) * 1000,
    }


def first_wasm_cell(cache: Path) -> float:
    """Seconds from start_kernel() to the end of the first Wasm cell."""
    env = {**os.environ, "CAPSULE_MODE": "wasm", "CAPSULE_WASM_CACHE": str(cache), "CAPSULE_CHECKPOINTS": "off"}
    km = KernelManager(kernel_name="capsule")
    began = time.perf_counter()
    km.start_kernel(env=env)
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        msg_id = client.execute("1+1")
        wait_idle(client, msg_id, timeout=120)
        wait_reply(client, msg_id)
        return time.perf_counter() - began
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)


def analyzer_cost(repeats: int = 200) -> dict[str, float]:
    from capsule_kernel.kernel.analyzer import Analyzer

    lines = []
    for i in range(40):
        lines += [
            f"def step_{i}(rows, factor={i}):",
            f"    total_{i} = sum(r['value'] * factor for r in rows if r['ok'])",
            f"    return {{'step': {i}, 'total': total_{i}, 'n': len(rows)}}",
            f"result_{i} = step_{i}(data)",
            f"print(result_{i}['total'])",
        ]
    code = "\n".join(lines)
    assert len(code.splitlines()) == 200
    import ast

    timings, parse_only = [], []
    for n in range(repeats):
        analyzer = Analyzer()  # no cache: every plan is computed
        source = code + f"\n# {n}"
        began = time.perf_counter()
        analyzer.plan(source)
        timings.append(time.perf_counter() - began)
        began = time.perf_counter()
        ast.parse(source)  # the floor: CPython's own parser on the same cell
        parse_only.append(time.perf_counter() - began)
    return {**summary(timings), "parse_only_median_ms": statistics.median(parse_only) * 1000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=300)
    parser.add_argument("--cold", type=int, default=3)
    args = parser.parse_args(argv)

    kernels = {}
    for name, spec, env in (
        ("wasm", "capsule", {"CAPSULE_MODE": "wasm"}),
        ("subprocess", "capsule", {"CAPSULE_MODE": "subprocess"}),
        ("ipykernel", "python3", {}),
    ):
        os.environ.update(env)
        kernels[name] = start_ready(spec)
        for key in env:
            os.environ.pop(key)
    samples: dict[str, list[float]] = {name: [] for name in kernels}
    try:
        for _ in range(args.cells):
            for name, (_, client) in kernels.items():
                samples[name].append(time_cell(client))
    finally:
        for km, client in kernels.values():
            client.stop_channels()
            km.shutdown_kernel(now=True)
    roundtrip = {name: summary(values) for name, values in samples.items()}
    base = roundtrip["ipykernel"]["median_ms"]
    for name in ("wasm", "subprocess"):
        roundtrip[name]["ratio_median_vs_ipykernel"] = roundtrip[name]["median_ms"] / base
        roundtrip[name]["ratio_p95_vs_ipykernel"] = roundtrip[name]["p95_ms"] / roundtrip["ipykernel"]["p95_ms"]

    cold, warm = [], []
    for _ in range(args.cold):
        with tempfile.TemporaryDirectory() as cache:
            cold.append(first_wasm_cell(Path(cache)))  # compiles
            warm.append(first_wasm_cell(Path(cache)))  # loads the artifact
    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "roundtrip": roundtrip,
        "first_wasm_cell_s": {
            "compile": {"median": statistics.median(cold), "max": max(cold)},
            "cached": {"median": statistics.median(warm), "max": max(warm)},
        },
        "analyzer_200_lines": analyzer_cost(),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"trivial cell round trip, {args.cells} cells each, interleaved (ms):")
    print(f"{'':12}{'median':>9}{'p95':>9}{'p99':>9}{'x ipykernel':>13}")
    for name, row in roundtrip.items():
        ratio = row.get("ratio_median_vs_ipykernel", 1.0)
        print(f"{name:12}{row['median_ms']:9.2f}{row['p95_ms']:9.2f}{row['p99_ms']:9.2f}{ratio:13.2f}")
    first = results["first_wasm_cell_s"]
    print(
        f"first Wasm cell from kernel start: {first['compile']['median']:.2f} s compiling, "
        f"{first['cached']['median']:.2f} s with the cached module"
    )
    analyzer = results["analyzer_200_lines"]
    print(
        f"analyzer, 200-line cell: median {analyzer['median_ms']:.3f} ms, p99 {analyzer['p99_ms']:.3f} ms "
        f"(ast.parse alone: {analyzer['parse_only_median_ms']:.3f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
