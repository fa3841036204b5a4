"""What checkpointing costs on big namespaces, and how fast state comes back.

For a namespace of ~10 MB and one of ~1 GB (nine numpy arrays plus a pandas
DataFrame), where one array (1/10 of the namespace) changes per cell:

  * added latency: execute_request -> idle of the changing cell on Capsule,
    minus the same on stock ipykernel (p50, p99). Two paces: "paced" lets
    the previous checkpoint land first (a person at the keyboard), the
    kernels taking turns cell by cell, each after the last one's background
    work has finished, and the difference taken per round;
    "back to back" sends each kernel its cells as one block, the next as
    soon as the last is idle (papermill, nbclient, an agent), and compares
    the percentiles of the blocks. IPython's run_cell hooks time each cell's
    own code in every kernel, so the added time also comes without it
  * store growth per cell against the bytes that changed
  * a sandbox death (os._exit): the failing cell's round trip, which includes
    starting a sandbox and restoring the whole namespace
  * time travel: `%capsule restore` to the checkpoint one cell back, then
    back again from a cold page cache (needs root to drop the cache)
  * dill.dump_module / load_module of the same namespace, the usual manual way
  * Kishu 0.3.4 (PyPI `kishu`), default and with its experimental tracker,
    in its own venv (benchmarks/.kishu-venv, made on first use: Kishu pins
    its own ipykernel and IPython). See kishu_driver.py for how it is driven.

A third kernel is a control: stock ipykernel with a post_run_cell hook that
does what fork-based snapshotting does and nothing more. It forks; the
child writes the array the cell changed to a new file, fsyncs and exits
(Redis's BGSAVE, on one value). "Added over the control" is what Capsule
costs beyond the technique itself, on this machine.

The order of the three kernels rotates from cell to cell, and before each
measured cell the benchmark allocates, touches and frees twice the bytes a
cell changes (--no-warm turns this off). Both are there because of how this
VM (Firecracker) treats memory: the guest reports memory freed for a second
or two back to the host ("free page reporting"), and the next first touch of
such a page costs about 2.5-4 ms per MB. Whichever kernel allocates first
after a pause pays that; the next one picks up the pages the first just
freed and does not. Two identical plain Python processes taking turns show
it: the first 250 ms, the second 30 ms, and the roles swap when the order
does. Freshly freed memory before every cell puts each kernel on the same
footing, as on a machine without free page reporting.

    ./dev bench            (runs this too)
    .venv/bin/python benchmarks/checkpoints.py [--cells 20] [--sizes 10MB,1GB] [--no-kishu]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
from jupyter_client.manager import KernelManager
from run import disk_window, percentile, time_cell, wait_idle, wait_reply

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "checkpoints.json"
KISHU_VENV = HERE / ".kishu-venv"
KISHU_REQUIREMENT = "kishu==0.3.4"
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


def warm_free_memory(nbytes: int) -> None:
    """Leave `nbytes` of just-touched, just-freed memory for the next allocation.

    Page allocators hand out the most recently freed pages first, and these
    are still backed by the host; memory freed a while ago may have been
    reported back to it. numpy allocates the way the measured cell does
    (huge pages where it can).
    """
    import numpy as np

    block = np.ones(max(nbytes // 8, 1))
    del block


def reported_kib() -> int | None:
    """KiB this VM's guest has reported free to its host so far (None: no such counter)."""
    try:
        return int(Path("/sys/module/page_reporting/parameters/reported_kib").read_text())
    except (OSError, ValueError):
        return None


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def start(spec: str, home: Path):
    km = KernelManager(kernel_name=spec)
    km.start_kernel(env={**os.environ, "CAPSULE_HOME": str(home)})
    client = km.client()
    client.start_channels()
    client.wait_for_ready(timeout=60)
    return km, client


def settle(client) -> None:
    """Wait until Capsule's last checkpoint is recorded (%capsule log waits for it)."""
    time_cell(client, "%capsule log -n 1")


def mib_between(before_kib: int | None, after_kib: int | None) -> int | None:
    return None if before_kib is None or after_kib is None else (after_kib - before_kib) // 1024


CLOCK_HOOK = """
import time as _clock
_cell_clock = {"s": 0.0, "start": 0.0}

def _clock_start(*_):
    _cell_clock["start"] = _clock.perf_counter()

def _clock_stop(*_):
    _cell_clock["s"] = _clock.perf_counter() - _cell_clock["start"]

get_ipython().events.register("pre_run_cell", _clock_start)
get_ipython().events.register("post_run_cell", _clock_stop)
# Hidden names: not part of the user's namespace, so never checkpointed.
get_ipython().user_ns_hidden.update(
    _clock=_clock, _cell_clock=_cell_clock, _clock_start=_clock_start, _clock_stop=_clock_stop
)
"""


@dataclass
class Cells:
    """Per kernel, per measured cell: what the frontend waited, and why."""

    total: dict[str, list[float]]  # execute_request -> idle
    own: dict[str, list[float]]  # the cell's code alone, timed by IPython's run_cell hooks
    reported_mib: dict[str, list[int]]  # memory the VM handed back to its host meanwhile

    @classmethod
    def of(cls, names) -> Cells:
        return cls({n: [] for n in names}, {n: [] for n in names}, {n: [] for n in names})

    def measure(self, name: str, client) -> None:
        before = reported_kib()
        began = time.perf_counter()
        msg_id = client.execute(CHANGE, user_expressions={"own": "_cell_clock['s']"})
        wait_idle(client, msg_id, timeout=600)
        self.total[name].append(time.perf_counter() - began)
        reply = wait_reply(client, msg_id, timeout=600)
        self.own[name].append(float(reply["content"]["user_expressions"]["own"]["data"]["text/plain"]))
        self.reported_mib[name].append(mib_between(before, reported_kib()) or 0)

    def outside(self) -> dict[str, list[float]]:
        """Each cell's time minus its code's: what the kernel adds around the code."""
        return {n: [t - o for t, o in zip(self.total[n], self.own[n], strict=True)] for n in self.total}


def run_round(kernels: dict, rotation: int, warm_bytes: int, into: Cells, settle_one: Callable[[str], None]) -> None:
    """One changing cell on every kernel, the order rotated by `rotation`.

    Each kernel's background work (Capsule's checkpoint, the control's fork
    child) finishes before the next kernel's cell starts: a person works in
    one notebook at a time, and a cell timed while another kernel's snapshot
    writes 100 MB measures that contention, not the kernel.
    """
    names = list(kernels)
    shift = rotation % len(names)
    for name in names[shift:] + names[:shift]:
        warm_free_memory(warm_bytes)
        into.measure(name, kernels[name][1])
        settle_one(name)


def bench_size(total: int, cells: int, warm: bool) -> dict:
    home = Path(tempfile.mkdtemp(prefix="capsule-ckpt-bench-"))
    kernels = {
        "capsule": start("capsule", home),
        "ipykernel": start("python3", home),
        "control": start("python3", home),
    }
    capsule = kernels["capsule"][1]
    control_files = Path(tempfile.mkdtemp(prefix="capsule-ckpt-control-"))
    changed_bytes = total // 10
    try:
        for _, client in kernels.values():
            time_cell(client, setup_code(total))
            time_cell(client, CLOCK_HOOK)
        time_cell(kernels["control"][1], CONTROL_HOOK.format(directory=str(control_files)))
        settle(capsule)
        paced = Cells.of(kernels)
        growth = []
        warm_bytes = 2 * changed_bytes if warm else 0
        reported_before = reported_kib()

        baseline = {name: descendants(km) for name, (km, _) in kernels.items()}

        def settle_one(name: str) -> None:
            if name == "capsule":
                settle(capsule)
            elif name == "control":
                settle_control(control_files, len(paced.total["control"]))
            # Its fork children have exited too: tearing down a copy of 1 GB takes a while.
            wait_for_descendants(kernels[name][0], baseline[name])

        for cell in range(cells):
            before = dir_size(home)
            run_round(kernels, cell, warm_bytes, paced, settle_one)
            growth.append(dir_size(home) - before)
        paced_window = disk_window(capsule)  # how long after each reply its checkpoint was on disk
        back_to_back = Cells.of(kernels)
        for name, (_, client) in kernels.items():
            # Each kernel alone, cell after cell, as papermill or an agent sends them.
            settle(capsule)
            warm_free_memory(warm_bytes)
            for _ in range(cells):
                back_to_back.measure(name, client)
        reported_after = reported_kib()
        settle(capsule)
        window = disk_window(capsule)  # the paced cells and the back-to-back ones
        time_travel, cold_restore = time_travel_restore(capsule)
        death = time_cell(capsule, "import os\nos._exit(1)")
        check = capsule.execute("int(step)")
        wait_reply(capsule, check)
        wait_idle(capsule, check)
        return {
            "namespace_bytes": total,
            "changed_bytes_per_cell": changed_bytes,
            "paced": added(paced, paired=True),
            "back_to_back": added(back_to_back, paired=False),
            "on_disk_after_reply": {"paced": paced_window, "paced_and_back_to_back": window},
            "store_growth_per_cell_over_changed": statistics.median(growth) / changed_bytes,
            "death_to_restored_reply_s": death,
            "time_travel_restore_s": time_travel,
            "cold_restore_s": cold_restore,
            "disk_read_mb_s": disk_read_speed(home) if cold_restore is not None else None,
            "dill": dill_baseline(total),
            "warm_free_memory_bytes": warm_bytes,
            "host_reported_free_mib_during_cells": mib_between(reported_before, reported_after),
        }
    finally:
        for km, client in kernels.values():
            client.stop_channels()
            km.shutdown_kernel(now=True)
        shutil.rmtree(control_files, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)  # gigabytes of chunks at 1 GB


def drop_page_cache() -> bool:
    """Empty the OS page cache (root only), so the next restore reads from the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def time_travel_restore(client) -> tuple[float, float | None]:
    """Seconds for `%capsule restore` to the checkpoint before the latest one, then
    back to the latest from a cold page cache (None: the cache cannot be dropped)."""
    msg_id = client.execute("%capsule log -n 2")
    wait_reply(client, msg_id)
    # The log's plain text lists checkpoints oldest first, a row per "[count] id ...".
    texts = []
    while True:
        msg = client.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] in ("display_data", "execute_result"):
            texts.append(msg["content"]["data"].get("text/plain", ""))
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    ids = [line.split()[1] for line in "\n".join(texts).splitlines() if line.startswith("[")]
    if len(ids) < 2:
        raise RuntimeError(f"cannot find two checkpoints in %capsule log output: {texts}")
    warm = time_cell(client, f"%capsule restore {ids[0]}")
    if not drop_page_cache():
        return warm, None
    return warm, time_cell(client, f"%capsule restore {ids[1]}")


CONTROL_HOOK = """
import os, signal
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves

def _fork_and_save(result, _directory={directory!r}):
    if os.fork() == 0:
        try:
            changed = arrays[step % 9]
            path = os.path.join(_directory, f"{{step}}.bin")
            with open(path + ".tmp", "wb") as handle:
                handle.write(memoryview(changed).cast("B"))
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(path + ".tmp", path)
        finally:
            os._exit(0)

get_ipython().events.register("post_run_cell", _fork_and_save)
"""


def disk_read_speed(directory: Path, nbytes: int = 256 * 2**20) -> float:
    """MB/s reading a just-written, fsynced file after the page cache is dropped."""
    path = directory / "read-speed.bin"
    block = os.urandom(8 * 2**20)
    with open(path, "wb") as handle:
        for _ in range(nbytes // len(block)):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    drop_page_cache()
    began = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while handle.read(len(block)):
            pass
    elapsed = time.perf_counter() - began
    path.unlink()
    return nbytes / elapsed / 1e6


def descendants(km) -> int:
    return len(psutil.Process(km.provisioner.process.pid).children(recursive=True))


def wait_for_descendants(km, at_most: int, timeout: float = 120.0) -> None:
    """Wait until the kernel's process tree is back to `at_most` processes."""
    deadline = time.monotonic() + timeout
    while descendants(km) > at_most:
        if time.monotonic() > deadline:
            raise TimeoutError("a kernel's fork child did not exit")
        time.sleep(0.01)


def settle_control(directory: Path, step: int, timeout: float = 120.0) -> None:
    """Wait until the control's fork child of cell `step` has saved its array."""
    deadline = time.monotonic() + timeout
    while not (directory / f"{step}.bin").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the control kernel's fork child did not finish")
        time.sleep(0.05)


def added(cells: Cells, paired: bool) -> dict:
    """Capsule's extra time per cell over ipykernel and over the control.

    Paired: cell i of each kernel ran in the same round, so the extra time is
    taken per round, then its percentiles. Unpaired (each kernel ran its own
    block of cells): the difference of the percentiles. "outside the code"
    leaves out the cell's own run time, which on this VM now and then
    includes first touches of memory the host took back.
    """

    def extra(latencies: dict[str, list[float]], other: str, pct: float) -> float:
        if paired:
            diffs = [c - o for c, o in zip(latencies["capsule"], latencies[other], strict=True)]
            return percentile(diffs, pct) * 1000
        return (percentile(latencies["capsule"], pct) - percentile(latencies[other], pct)) * 1000

    outside = cells.outside()
    report = {
        "added_ms_p50": extra(cells.total, "ipykernel", 50),
        "added_ms_p99": extra(cells.total, "ipykernel", 99),
        "added_over_control_ms_p50": extra(cells.total, "control", 50),
        "added_over_control_ms_p99": extra(cells.total, "control", 99),
        "added_outside_code_ms_p50": extra(outside, "ipykernel", 50),
        "added_outside_code_ms_p99": extra(outside, "ipykernel", 99),
    }
    for name, values in cells.total.items():
        report[f"{name}_cell_ms_p50"] = percentile(values, 50) * 1000
        report[f"{name}_cell_ms_p99"] = percentile(values, 99) * 1000
        report[f"{name}_code_ms_p50"] = percentile(cells.own[name], 50) * 1000
        report[f"{name}_code_ms_p99"] = percentile(cells.own[name], 99) * 1000
        report[f"{name}_cells_ms"] = [round(value * 1000, 1) for value in values]
        report[f"{name}_code_ms"] = [round(value * 1000, 1) for value in cells.own[name]]
        report[f"{name}_reported_mib"] = cells.reported_mib[name]
    return report


def dill_baseline(total: int) -> dict:
    script = (
        "import time, dill, numpy as np, pandas as pd, sys, tempfile, os\n"
        + setup_code(total)
        + "\nscratch = tempfile.TemporaryDirectory()\npath = os.path.join(scratch.name, 'session.pkl')\n"
        "t = time.perf_counter(); dill.dump_module(path); dump = time.perf_counter() - t\n"
        "t = time.perf_counter(); dill.load_module(path); load = time.perf_counter() - t\n"
        "print(dump, load)\nscratch.cleanup()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    return {"dump_s": float(out[0]), "load_s": float(out[1])}


def kishu_python() -> Path | str:
    """The interpreter of Kishu's venv, made on first use; or why there is none."""
    python = KISHU_VENV / "bin" / "python"
    if python.exists():
        return python
    try:
        subprocess.run([sys.executable, "-m", "venv", str(KISHU_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", KISHU_REQUIREMENT, "numpy", "pandas"],
            check=True,
            capture_output=True,
            text=True,
        )
    except subprocess.CalledProcessError as err:
        return f"{KISHU_REQUIREMENT} did not install: {(err.stderr or '').strip().splitlines()[-1:]}"
    return python


def kishu_baseline(total: int, cells: int) -> dict:
    python = kishu_python()
    if isinstance(python, str):
        return {"skipped": python}
    results = {}
    for label, experimental in (("default", "0"), ("experimental_tracker", "1")):
        with tempfile.TemporaryDirectory(prefix="kishu-bench-") as home:
            run = subprocess.run(
                [str(python), str(HERE / "kishu_driver.py"), setup_code(total), CHANGE, str(cells), experimental, home],
                capture_output=True,
                text=True,
            )
        if run.returncode:
            results[label] = {"failed": run.stderr.strip().splitlines()[-3:]}
        else:
            # The last line that is a JSON object: Kishu or IPython may print after it.
            lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
            results[label] = json.loads(lines[-1])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20)
    parser.add_argument("--sizes", default="10MB,1GB")
    parser.add_argument("--no-warm", action="store_true", help="do not free fresh memory before each cell")
    parser.add_argument("--no-kishu", action="store_true")
    args = parser.parse_args(argv)
    # Sizes not run this time keep their last results.
    report: dict = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for label in args.sizes.split(","):
        total = SIZES[label]
        earlier = report.get(label, {})
        report[label] = bench_size(total, args.cells, warm=not args.no_warm)
        if not args.no_kishu:
            report[label]["kishu"] = kishu_baseline(total, min(args.cells, 5))
        elif "kishu" in earlier:
            report[label]["kishu"] = earlier["kishu"]  # not run this time: keep the last figures
        print(json.dumps({label: report[label]}, indent=2), flush=True)
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
