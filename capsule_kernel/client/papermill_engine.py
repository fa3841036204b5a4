"""A papermill engine that resumes: ``papermill IN.ipynb OUT.ipynb -k capsule --engine capsule``.

Runs on the TRUSTED side (papermill's process). It is papermill's own
nbclient engine, with capsule-kernel run's bookkeeping (batch.py): each
cell of OUT.ipynb records its hash chain, session, execution count and the
checkpoint that holds its state. With ``CAPSULE_RESUME=1`` in papermill's
environment, a rerun after the kernel died keeps the completed, unchanged
cells of OUT.ipynb (their outputs, and their state from its checkpoint)
and executes the rest. Papermill injects the parameters into the notebook
before the engine sees it, so a changed parameter changes the injected
cell's hash and everything from there runs again.

Registered as the ``capsule`` entry point of ``papermill.engine``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nbclient.exceptions import CellExecutionError
from papermill.clientwrap import PapermillNotebookClient
from papermill.engines import NBClientEngine, logger
from papermill.iorw import LocalHandler, papermill_io
from papermill.utils import merge_kwargs, remove_args

from capsule_kernel.client.batch import RECORD, BatchRun, read_output
from capsule_kernel.kernel.untrusted_files import TrustedDirectory

# The output directory of the run in progress, opened before its kernel started.
_guarded: dict[str, Any] = {}


def guard_output(output_path: Any) -> TrustedDirectory | None:
    """Make papermill's own writes of OUT.ipynb go through a directory opened now, never through a link.

    Papermill writes the output itself, after every cell and once more after
    the engine returns, with iorw's LocalHandler (``open(path, "w")``, which
    follows a link the sandbox may have put in the output's place). Papermill
    offers no way to replace its local handler (a second "local" registration
    loses to the first), so the engine gives the handler it uses a ``write``
    that sends this one output path to ``TrustedDirectory`` (batch.py's way)
    and every other path to papermill's own.
    """
    handler = papermill_io.get_handler(str(output_path))
    if not isinstance(handler, LocalHandler):
        return None  # s3://, gs:// ...: not a directory a sandbox writes
    target = os.path.abspath(str(output_path))
    previous = _guarded.pop("directory", None)
    if previous is not None:
        previous.close()
    directory = TrustedDirectory(Path(target).resolve().parent)
    _guarded["directory"] = directory

    def write(buf: str, path: str) -> None:
        if os.path.abspath(path) == target:
            directory.write(Path(target).name, buf.encode("utf-8"))
        else:
            LocalHandler.write(handler, buf, path)

    handler.write = write
    return directory


class CapsuleNotebookClient(PapermillNotebookClient):
    """Papermill's client, skipping the cells a resume keeps and recording every cell it runs."""

    def __init__(self, nb_man: Any, batch: BatchRun, **kwargs: Any) -> None:
        super().__init__(nb_man, **kwargs)
        self.batch = batch
        self._replies: dict[int, dict[str, Any]] = {}
        self.on_cell_executed = self._keep_reply

    def _keep_reply(self, cell: Any, cell_index: int, execute_reply: dict[str, Any]) -> None:  # noqa: ARG002
        self._replies[cell_index] = execute_reply

    def execute(self, **kwargs: Any) -> Any:
        return super().execute(env=self.batch.environment(), **kwargs)

    def papermill_execute_cells(self) -> None:
        self.batch.restore(self)
        for index, cell in enumerate(self.nb.cells):
            if self.batch.skipped(index):
                continue  # its saved output stays; its state came back with the restore
            try:
                self.nb_man.cell_start(cell, index)
                self.execute_cell(cell, index)
            except CellExecutionError as ex:
                self.nb_man.cell_exception(self.nb.cells[index], cell_index=index, exception=ex)
                break
            finally:
                if cell.cell_type == "code":
                    self.batch.record(index, self._replies.pop(index, {}), allow_errors=False)
                self.nb_man.cell_complete(self.nb.cells[index], cell_index=index)


class CapsuleEngine(NBClientEngine):
    """Papermill's nbclient engine, with Capsule's resume (see the module's docstring)."""

    # The dead run's output, read before papermill overwrites OUT.ipynb at the run's start.
    _previous: Any = None

    @classmethod
    def execute_notebook(cls, nb: Any, kernel_name: str, output_path: Any = None, **kwargs: Any) -> Any:
        cls._previous = None
        resume = os.environ.get("CAPSULE_RESUME", "").lower() in ("1", "true", "yes", "on")
        directory = guard_output(output_path) if output_path else None
        if resume and directory is not None:
            previous = read_output(directory, Path(str(output_path)).name)
            cls._previous = previous if previous is not None and RECORD in previous.get("metadata", {}) else None
        return super().execute_notebook(nb, kernel_name, output_path=output_path, **kwargs)

    @classmethod
    def execute_managed_notebook(
        cls,
        nb_man: Any,
        kernel_name: str,
        log_output: bool = False,
        stdout_file: Any = None,
        stderr_file: Any = None,
        start_timeout: int = 60,
        execution_timeout: int | None = None,
        **kwargs: Any,
    ) -> Any:
        output_path = getattr(nb_man, "output_path", None)
        output = Path(str(output_path)).resolve() if output_path else Path.cwd() / "papermill-output.ipynb"
        batch = BatchRun.prepare(nb_man.nb, output, {}, cls._previous)
        # As NBClientEngine does, with our client.
        kwargs = remove_args(["input_path", "timeout", "startup_timeout"], **kwargs)
        final = merge_kwargs(
            kwargs,
            timeout=execution_timeout,
            startup_timeout=start_timeout,
            kernel_name=kernel_name,
            log=logger,
            log_output=log_output,
            stdout_file=stdout_file,
            stderr_file=stderr_file,
        )
        return CapsuleNotebookClient(nb_man, batch, **final).execute()
