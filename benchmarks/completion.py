"""Completion and inspection round trips: Capsule (each sandbox) against stock ipykernel, in one run.

A frontend sends complete_request on every Tab (JupyterLab also as you type
with continuous hinting) and inspect_request on Shift-Tab. This measures, per
kernel started through jupyter_client, complete_request until its reply for
three cases, and inspect_request on a module:

  * attr:    ``collections.Ord`` (an attribute of a module the notebook imported)
  * import:  ``import o`` (module names)
  * switched: ``collections.Ord`` after ``%capsule mode wasm`` (Capsule asks the
    subprocess sandbox, which holds ``collections``; ipykernel: the same request)

Kernels: Capsule in subprocess mode, Capsule in Wasm mode (CAPSULE_MODE=wasm),
and stock ipykernel; requests interleaved so load drift hits all alike.
Prints medians, p95 and ratios to ipykernel; writes benchmarks/results/completion.json.

    .venv/bin/python benchmarks/completion.py [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from run import percentile, start_ready, wait_idle, wait_reply

KERNELS = {
    "capsule": ("capsule", {}),
    "capsule-wasm": ("capsule", {"CAPSULE_MODE": "wasm"}),
    "capsule-switched": ("capsule", {}),
    "ipykernel": ("python3", {}),
}
RESULTS = Path(__file__).parent / "results" / "completion.json"
CASES = {
    "attr": ("complete", "collections.Ord"),
    "import": ("complete", "import o"),
    "inspect": ("inspect", "collections"),
}


def _cell(client, code: str) -> None:
    msg_id = client.execute(code)
    wait_reply(client, msg_id)
    wait_idle(client, msg_id)


def _ask(client, kind: str, code: str) -> float:
    began = time.perf_counter()
    msg_id = client.complete(code, len(code)) if kind == "complete" else client.inspect(code, len(code))
    reply = wait_reply(client, msg_id)
    elapsed = time.perf_counter() - began
    assert reply["content"]["status"] == "ok", reply["content"]
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args(argv)
    clients = {}
    try:
        for name, spec in KERNELS.items():
            km, client = start_ready(spec)
            _cell(client, "import collections")
            if name == "capsule-switched":
                _cell(client, "%capsule mode wasm")
                _cell(client, "w = 1")
            clients[name] = (km, client)
        samples: dict[str, dict[str, list[float]]] = {name: {case: [] for case in CASES} for name in KERNELS}
        for _ in range(args.requests):
            for case, (kind, code) in CASES.items():
                for name, (_, client) in clients.items():
                    samples[name][case].append(_ask(client, kind, code))
    finally:
        for km, client in clients.values():
            client.stop_channels()
            km.shutdown_kernel(now=True)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for name, cases in samples.items():
        summary[name] = {}
        for case, values in cases.items():
            base = sorted(samples["ipykernel"][case])
            median, p95 = percentile(values, 50) * 1000, percentile(values, 95) * 1000
            summary[name][case] = {
                "median_ms": round(median, 2),
                "p95_ms": round(p95, 2),
                "ratio_median": round(median / (percentile(base, 50) * 1000), 2),
                "ratio_p95": round(p95 / (percentile(base, 95) * 1000), 2),
            }
    print(f"{'kernel':18} {'case':8} {'median':>9} {'p95':>9} {'x ipykernel (median, p95)':>28}")
    for name, cases in summary.items():
        for case, row in cases.items():
            print(
                f"{name:18} {case:8} {row['median_ms']:7.2f}ms {row['p95_ms']:7.2f}ms "
                f"{row['ratio_median']:13.2f} {row['ratio_p95']:8.2f}"
            )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "requests": args.requests,
                "machine": f"{os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}",
                "results": summary,
            },
            indent=1,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
