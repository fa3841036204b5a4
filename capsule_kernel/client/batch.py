"""``capsule-kernel run``: a notebook run headless through the capsule kernel, resumable after a crash.

Runs on the TRUSTED side (the user's own process, like Jupyter): it drives a
capsule kernel with nbclient, cell by cell, writes the output notebook after
every cell (papermill's habit), and records in it, per code cell, a hash
chained over the parameters and every cell source so far, the cell's
execution count, and which checkpoint covers its state.

``--resume`` reads that record back. The run continues from the first cell
that did not complete, or whose hash changed (its source, an earlier cell's
or a parameter), or whose state no recorded checkpoint covers. A kill in
the moment between a cell's reply and its snapshot's record leaves that
snapshot in the dead sandbox's journal (sandbox/keeper.py): the runner
adopts it first (``adopt_dead_run``, the same adoption a kernel does at
start), so such a cell counts as covered. The namespace comes back from the
checkpoint of the last covered cell (``%capsule restore``), and the cells
before it keep their saved outputs: they are not executed again. The
output notebook marks them ``restored``.

Checkpoints of a run live in the session ``batch:<output path>``, so each
output notebook has its own history.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

from capsule_kernel.kernel.untrusted_files import TrustedDirectory, UntrustedFile
from capsule_kernel.protocol.limits import LimitError, parse_duration

EXIT_OK = 0
EXIT_CELL_ERROR = 1  # (2, a usage error, is argparse's)
EXIT_KERNEL_DIED = 3
EXIT_USAGE = 2  # as argparse's: the command cannot start as asked
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
RECORD = "capsule"  # the key of Capsule's record in notebook and cell metadata
# How long a resume waits for the dead run's kernel to be gone before adopting its journal.
DEAD_KERNEL_PATIENCE_SECONDS = 30.0


def parameter_value(text: str) -> Any:
    """NAME=VALUE as papermill's -p reads it: a Python literal if it is one, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def inject_parameters(nb: Any, parameters: dict[str, Any]) -> None:
    """Papermill's way: a cell tagged injected-parameters right after the one tagged parameters."""
    nb.cells = [cell for cell in nb.cells if INJECTED_TAG not in cell.get("metadata", {}).get("tags", [])]
    if not parameters:
        return
    source = "# Parameters\n" + "".join(f"{name} = {value!r}\n" for name, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = [INJECTED_TAG]
    index = next((i + 1 for i, c in enumerate(nb.cells) if PARAMETERS_TAG in c.get("metadata", {}).get("tags", [])), 0)
    nb.cells.insert(index, cell)


def chain(nb: Any, parameters: dict[str, Any]) -> list[str]:
    """One hash per cell: of the parameters and the source of every code cell up to it."""
    digest = hashlib.sha256(json.dumps(parameters, sort_keys=True, default=repr).encode()).hexdigest()
    hashes = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            digest = hashlib.sha256((digest + "\0" + cell.source).encode()).hexdigest()
        hashes.append(digest)
    return hashes


@dataclass
class Resume:
    """Where a rerun starts, and the checkpoint that brings the state back."""

    start: int = 0  # index of the first cell to execute
    checkpoint: str | None = None  # id of the checkpoint to restore first
    checkpoint_session: str | None = None
    restored: tuple[int, ...] = ()  # indexes of the cells whose saved outputs are kept


def plan_resume(previous: Any, nb: Any, hashes: list[str]) -> Resume:
    """The longest prefix of completed, unchanged cells whose state a recorded checkpoint holds.

    A cell's record says which session ran it, its execution count there and
    the count whose checkpoint holds its state (``checkpoint_at``: None when
    it changed no name). The state after the prefix is the latest checkpoint
    of the last cell's session up to that cell's count (or what that run
    itself restored, ``base``); every cell of that session in the prefix
    must be held by it, or the prefix is shortened.
    """
    from capsule_kernel.kernel.checkpoint.home import default_home
    from capsule_kernel.kernel.checkpoint.store import CheckpointStore

    old = {cell.get("metadata", {}).get(RECORD, {}).get("hash"): cell for cell in previous.cells}
    bases = dict(previous.get("metadata", {}).get(RECORD, {}).get("bases", {}))
    prefix: list[tuple[int, Any, dict[str, Any]]] = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        saved = old.get(hashes[index])
        record = dict(saved.get("metadata", {}).get(RECORD, {})) if saved is not None else {}
        if not record.get("completed") or not record.get("session"):
            break
        prefix.append((index, saved, record))
    store = CheckpointStore(default_home())
    try:
        while prefix:
            _, _, last = prefix[-1]
            session = last["session"]
            held = [c for c in store.history(session) if c.execution_count <= last["count"]]
            target = max(held, key=lambda c: c.execution_count) if held else None
            target_count = target.execution_count if target is not None else -1
            unchanged = store.unchanged_counts(session)
            needs = [r.get("checkpoint_at") for _, _, r in prefix if r["session"] == session]
            if all(n is None or n <= target_count or n in unchanged for n in needs):
                break
            prefix.pop()
        if not prefix:
            return Resume()
        checkpoint_id, checkpoint_session = None, None
        if target is not None:
            checkpoint_id, checkpoint_session = target.id, session
        elif bases.get(session):
            checkpoint_id, checkpoint_session = bases[session]
    finally:
        store.close()
    for index, saved, _ in prefix:
        nb.cells[index].outputs = saved.get("outputs", [])
        nb.cells[index].execution_count = saved.get("execution_count")
        nb.cells[index].metadata[RECORD] = {**saved.get("metadata", {}).get(RECORD, {}), "restored": True}
    last_index = prefix[-1][0]
    return Resume(last_index + 1, checkpoint_id, checkpoint_session, tuple(i for i, _, _ in prefix))


def adopt_dead_run(previous: Any) -> None:
    """Record what the dead run's sandbox journaled after its kernel died, before the resume is planned.

    The run's next kernel would adopt it too (checkpoint/adoption.py), but
    only once it runs, after the plan, which would then re-run the cell. This
    waits for the dead run's kernel to be gone (a runner killed alone leaves
    its kernel to ipykernel's parent poller, about a second) and for its
    sandbox to finish its last snapshot (its keeper gives it at most
    KEEPER_LINGER_SECONDS), then records every journaled
    snapshot, under the checks a kernel applies, and settles those cells'
    durable promises. Runs in its own thread and event loop: papermill calls
    its engine from code that may already have a loop running.
    """
    session = previous.get("metadata", {}).get(RECORD, {}).get("session")
    if not session:
        return
    import asyncio
    import concurrent.futures
    import logging

    from capsule_kernel.kernel.checkpoint.promises import CellPromises
    from capsule_kernel.kernel.checkpoint.recorder import Checkpoints
    from capsule_kernel.kernel.sandbox.cgroups import kernel_pid_of
    from capsule_kernel.protocol.deaths import process_exists

    log = logging.getLogger("capsule_kernel.run")

    async def adopt() -> None:
        checkpoints = Checkpoints.open(log)
        if checkpoints.store is None:
            return
        # The dead run's kernel may outlive its runner by a moment (ipykernel's parent poller
        # ends it within a second); adoption only takes sandboxes whose kernel is gone.
        kernels = {kernel_pid_of(record.name) for record in checkpoints.store.sandboxes() if record.session == session}
        deadline = time.monotonic() + DEAD_KERNEL_PATIENCE_SECONDS
        while any(pid and process_exists(pid) for pid in kernels) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        promises = CellPromises.open(checkpoints.store.path, f"capsule-run-{os.getpid()}", log, os.environ)
        try:
            adopted = await checkpoints.adopt_orphans(promises, wait_for=session)
            await promises.settled()
        finally:
            await promises.close()
            checkpoints.store.close()
        for refusal in adopted.refused:
            print(f"capsule-kernel run: not adopted: {refusal}", file=sys.stderr)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, adopt()).result()


class Progress:
    """A bar on a terminal; a line per cell elsewhere (CI logs)."""

    def __init__(self, total: int, stream: Any = sys.stderr) -> None:
        self.stream = stream
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="cell", file=stream)

    def cell(self, index: int, status: str, seconds: float, first_line: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(status)
        else:
            print(f"cell {index}: {status} in {seconds:.2f} s  {first_line[:60]}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class BatchRun:
    """One run attempt of a notebook: its session, each cell's hash, where it resumes; shared by both runners."""

    nb: Any
    hashes: list[str]
    session: str
    resume: Resume

    @classmethod
    def prepare(cls, nb: Any, output: Path, parameters: dict[str, Any], previous: Any | None) -> BatchRun:
        """Chain the hashes, plan the resume from ``previous`` (the dead run's output), record the run's metadata."""
        import uuid

        hashes = chain(nb, parameters)
        if previous is not None:
            adopt_dead_run(previous)
        resume = plan_resume(previous, nb, hashes) if previous is not None else Resume()
        # A session per run attempt: execution counts never collide with a dead run's checkpoints.
        session = f"batch:{output}#{uuid.uuid4().hex[:8]}"
        bases = dict(previous.get("metadata", {}).get(RECORD, {}).get("bases", {})) if previous is not None else {}
        if resume.checkpoint is not None:
            bases[session] = [resume.checkpoint, resume.checkpoint_session]
        nb.metadata[RECORD] = {
            "session": session,
            "parameters": {name: repr(value) for name, value in parameters.items()},
            "restored_cells": len(resume.restored),
            "bases": bases,
        }
        return cls(nb, hashes, session, resume)

    def environment(self) -> dict[str, str]:
        # The notebook is the output path; each attempt is a session of it (so a resume may open the last).
        return {**os.environ, "CAPSULE_SESSION": self.session, "CAPSULE_NOTEBOOK": self.session.rsplit("#", 1)[0]}

    def restore(self, client: Any) -> None:
        """Bring back the dead run's state, in this run's own session (its sandbox's IPython history is new)."""
        resume = self.resume
        if resume.checkpoint is None:
            return
        for line in (
            f"%capsule session {shlex.quote(resume.checkpoint_session or self.session)}",
            f"%capsule resume {resume.checkpoint[:12]}",
            f"%capsule session {shlex.quote(self.session)}",
        ):
            _kernel_line(client, line)

    def skipped(self, index: int) -> bool:
        return index < self.resume.start

    def record(self, index: int, reply: dict[str, Any], allow_errors: bool) -> bool:
        """Note what the cell's reply says (did it complete, which checkpoint holds it); True if it failed."""
        cell = self.nb.cells[index]
        failed = reply.get("content", {}).get("status") != "ok"
        cell.metadata[RECORD] = {
            "hash": self.hashes[index],
            "completed": not failed or allow_errors,
            "session": self.session,
            "count": cell.get("execution_count"),
            "checkpoint_at": reply.get("metadata", {}).get("capsule", {}).get("checkpoint_at"),
        }
        return failed


def run(args: argparse.Namespace) -> int:
    """Run (or resume) one notebook; the exit code says how it ended."""
    source = Path(args.notebook).resolve()
    output = Path(args.output).resolve() if args.output else source.with_name(source.stem + ".out.ipynb")
    # Opened now, before any sandbox runs: the sandbox may write this directory, so every later
    # read and write of the output goes through this descriptor, never through a link it made.
    with TrustedDirectory(output.parent) as directory:
        return _run(args, source, output, directory)


def _run(args: argparse.Namespace, source: Path, output: Path, directory: TrustedDirectory) -> int:
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, DeadKernelError

    parameters = dict(args.parameters or [])
    nb = nbformat.read(source, as_version=4)
    inject_parameters(nb, parameters)
    try:
        previous = read_output(directory, output.name) if args.resume else None
    except (UntrustedFile, ValueError) as err:
        print(f"capsule-kernel run: cannot resume from {output}: {err}", file=sys.stderr)
        return EXIT_USAGE
    batch = BatchRun.prepare(nb, output, parameters, previous)
    env = batch.environment()
    if args.mode:
        env["CAPSULE_MODE"] = args.mode
    replies: dict[int, dict[str, Any]] = {}

    def on_cell_executed(cell: Any, cell_index: int, execute_reply: dict[str, Any]) -> None:  # noqa: ARG001
        replies[cell_index] = execute_reply

    client = NotebookClient(
        nb,
        kernel_name=args.kernel,
        timeout=args.timeout,
        allow_errors=True,
        resources={"metadata": {"path": str(source.parent)}},
        on_cell_executed=on_cell_executed,
    )
    code_cells = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    progress = Progress(len(code_cells))
    status = EXIT_OK
    try:
        with client.setup_kernel(env=env):
            batch.restore(client)
            for index in code_cells:
                cell = nb.cells[index]
                first_line = cell.source.split("\n", 1)[0]
                if batch.skipped(index):
                    progress.cell(index, "restored", 0.0, first_line)
                    continue
                began = time.monotonic()
                client.execute_cell(cell, index)
                failed = batch.record(index, replies.pop(index, {}), args.allow_errors)
                progress.cell(index, "error" if failed else "ok", time.monotonic() - began, first_line)
                write_output(directory, output.name, nb)
                if failed:
                    status = EXIT_CELL_ERROR
                    if not args.allow_errors:
                        break
    except DeadKernelError as err:
        progress.close()
        write_output(directory, output.name, nb)
        print(f"capsule-kernel run: the kernel died ({err}); run again with --resume to continue", file=sys.stderr)
        return EXIT_KERNEL_DIED
    except CellExecutionError as err:  # a timeout of a cell
        progress.close()
        write_output(directory, output.name, nb)
        print(f"capsule-kernel run: {err}", file=sys.stderr)
        return EXIT_CELL_ERROR
    progress.close()
    write_output(directory, output.name, nb)
    return status


# The largest output notebook a resume reads back (a bigger one is refused, not read).
MAX_OUTPUT_BYTES = 1 << 30


def read_output(directory: TrustedDirectory, name: str) -> Any:
    """The previous run's output notebook, if it is a regular file there (a link or a FIFO is refused)."""
    if not directory.exists(name):
        return None
    return nbformat.reads(directory.read(name, MAX_OUTPUT_BYTES).decode("utf-8"), as_version=4)


def write_output(directory: TrustedDirectory, name: str, nb: Any) -> None:
    """The output notebook, replaced whole (never written through whatever the sandbox left at its name)."""
    text = nbformat.writes(nb)
    directory.write(name, (text if text.endswith("\n") else text + "\n").encode("utf-8"))


def _kernel_line(client: Any, code: str) -> None:
    """One %capsule line of the runner's own, outside the notebook (it leaves no cell behind)."""
    from jupyter_core.utils import run_sync

    errors: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "error":
            errors.append(f"{msg['content']['ename']}: {msg['content']['evalue']}")

    reply = run_sync(client.kc.execute_interactive)(code, store_history=False, timeout=600, output_hook=hook)
    if reply["content"].get("status") != "ok" or errors:
        raise RuntimeError(f"{code}: {'; '.join(errors) or reply['content'].get('evalue')}")


def add_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("notebook", help="the notebook to run")
    sub.add_argument("-o", "--output", help="the output notebook (default: NOTEBOOK.out.ipynb beside it)")
    sub.add_argument(
        "-p", "--parameter", dest="parameters", action="append", type=_parameter, metavar="NAME=VALUE",
        help="a parameter, injected after the cell tagged 'parameters' (a Python literal, else a string)",
    )  # fmt: skip
    sub.add_argument("--resume", action="store_true", help="continue a run that died, from its output notebook")
    sub.add_argument("--timeout", type=_seconds, default=None, metavar="DURATION", help="per cell, e.g. 10m")
    sub.add_argument("--mode", choices=("subprocess", "wasm", "auto"), help="where cells run (CAPSULE_MODE)")
    sub.add_argument("--allow-errors", action="store_true", help="go on after a cell fails (exit code 1 still)")
    sub.add_argument("--kernel", default="capsule", help="the kernelspec (default: capsule)")


def _parameter(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, parameter_value(value)


def _seconds(text: str) -> float | None:
    try:
        return parse_duration(text)
    except LimitError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
