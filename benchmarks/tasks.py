"""Tasks side by side: Capsule's %%capsule task and @task against the models they replace.

In one run on this machine:
  * a trivial task's round trip (execute_request until the reply, the
    envelope already shown) in Wasm and in the subprocess sandbox, with the
    warm pool ([tasks] warm = 1, paced like a person: a pause between tasks
    lets the pool refill) and cold ([tasks] warm = 0);
  * the throughput of N trivial background tasks (@task .map, [tasks]
    max_parallel = the number of cores), in each sandbox;
  * the same trivial work done by concurrent.futures.ProcessPoolExecutor
    (no isolation, no limits: the floor of "a process per task"), and by a
    fresh wasmtime instance of CPython-for-WASI per task (the model of the
    Wasm task runners Capsule learns from: per-task instance, nothing else).

    .venv/bin/python benchmarks/tasks.py [--rounds 20] [--many 200]

Writes benchmarks/results/tasks.json; docs/benchmarks.md quotes it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
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
from benchmarks.run import percentile, wait_idle, wait_reply

RESULTS = Path(__file__).parent / "results" / "tasks.json"
PACE_SECONDS = 1.5  # a person reading the last output: the warm pool refills meanwhile


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median_ms": statistics.median(values) * 1000,
        "p95_ms": percentile(values, 95) * 1000,
        "max_ms": max(values) * 1000,
    }


def start(directory: Path, warm: int) -> tuple[KernelManager, object]:
    (directory / "capsule.toml").write_text(f"[tasks]\nwarm = {warm}\nmax_parallel = {os.cpu_count() or 2}\n")
    km = KernelManager(kernel_name="capsule")
    km.start_kernel(env={**os.environ, "CAPSULE_HOME": str(directory / "home")}, cwd=str(directory))
    client = km.client()
    client.start_channels()
    client.wait_for_ready(timeout=120)
    run(client, "1+1")
    return km, client


def run(client: object, code: str, timeout: float = 600) -> float:
    began = time.perf_counter()
    msg_id = client.execute(code)
    reply = wait_reply(client, msg_id, timeout=timeout)
    elapsed = time.perf_counter() - began
    wait_idle(client, msg_id, timeout=timeout)
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"{code!r} failed: {reply['content'].get('evalue')}")
    return elapsed


def round_trips(client: object, kind: str, rounds: int, pace: float) -> list[float]:
    times = []
    for n in range(rounds + 1):
        time.sleep(pace)
        # --rerun: the same key would be answered from its record, which is not a task's round trip.
        elapsed = run(client, f"%%capsule task t{n} --sandbox {kind} --rerun\n{n} + 1")
        if n:  # the first pays for the pool's first sandbox
            times.append(elapsed)
    return times


def throughput(client: object, kind: str, many: int) -> float:
    run(client, f"from capsule_kernel.tasks import task\n@task(sandbox={kind!r})\ndef one(x):\n    return x + 1")
    elapsed = run(client, f"assert one.map(range({many})) == list(range(1, {many} + 1))")
    return many / elapsed


def _trivial(x: int) -> int:
    return x + 1


def process_pool(many: int) -> float:
    began = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        assert list(pool.map(_trivial, range(many))) == list(range(1, many + 1))
    return many / (time.perf_counter() - began)


def fresh_wasm_instances(count: int) -> list[float]:
    """A new store and instance of python.wasm per task, running `print(x + 1)` (module compiled once, cached)."""
    import wasmtime

    from capsule_kernel.wasm_host import runtime as wasm_runtime

    runtime = wasm_runtime.find_runtime()
    engine = wasmtime.Engine(wasm_runtime.engine_config())
    module, _ = wasm_runtime.load_module(engine, runtime, print)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    times = []
    for n in range(count):
        began = time.perf_counter()
        store = wasmtime.Store(engine)
        store.set_fuel(10**12)
        store.set_epoch_deadline(1 << 40)
        wasi = wasmtime.WasiConfig()
        wasi.argv = ["python", "-c", f"print({n} + 1)"]
        with tempfile.NamedTemporaryFile() as out:
            wasi.stdout_file = out.name
            store.set_wasi(wasi)
            instance = linker.instantiate(store, module)
            try:
                instance.exports(store)["_start"](store)
            except wasmtime.ExitTrap as exit_trap:
                assert exit_trap.code == 0
            assert Path(out.name).read_text().strip() == str(n + 1)
        times.append(time.perf_counter() - began)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="tasks timed per kind and pool setting")
    parser.add_argument("--many", type=int, default=200, help="tasks in the throughput run")
    args = parser.parse_args(argv)
    results: dict[str, object] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()},
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "many": args.many,
    }
    with tempfile.TemporaryDirectory() as scratch:
        for warm, label in ((1, "warm"), (0, "cold")):
            directory = Path(scratch) / label
            directory.mkdir()
            km, client = start(directory, warm)
            try:
                for kind in ("wasm", "subprocess"):
                    pace = PACE_SECONDS if warm else 0.2
                    results[f"round_trip_{kind}_{label}"] = summary(round_trips(client, kind, args.rounds, pace))
                    print(label, kind, results[f"round_trip_{kind}_{label}"], flush=True)
                if warm:
                    for kind in ("wasm", "subprocess"):
                        results[f"throughput_{kind}_per_s"] = throughput(client, kind, args.many)
                        print("throughput", kind, results[f"throughput_{kind}_per_s"], flush=True)
            finally:
                client.stop_channels()
                km.shutdown_kernel(now=True)
    results["throughput_process_pool_per_s"] = process_pool(args.many)
    results["fresh_wasm_instance"] = summary(fresh_wasm_instances(min(args.rounds, 20)))
    print("process pool", results["throughput_process_pool_per_s"], "fresh wasm", results["fresh_wasm_instance"])
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
