"""The user's IPython profile, for the sandbox: read by the kernel, run only inside the sandbox.

ipykernel applies the profile to its shell as it starts: the extensions
(`storemagic` by default), the startup files in the profile's `startup/`
directory and `$PYTHONSTARTUP`, then `exec_lines` and `exec_files`. The
capsule kernel never runs user code, so it reads these sources here (they
are the user's own files, next to its configuration) and hands them to each
new subprocess sandbox, whose worker runs them in that order
(sandbox/worker_profile.py) and reports what failed; the kernel shows that
with the first cell. A profile problem never stops a sandbox.

The sources travel in the worker's start-up argument, so their total is
capped (STARTUP_BUDGET_BYTES); a file over it is named as not run.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STARTUP_BUDGET_BYTES = 64 * 1024
_DEFAULT_EXTENSIONS = ("storemagic",)


def _strings(value: Any) -> list[str]:
    return [str(item) for item in value] if isinstance(value, list | tuple) else []


class _Sources:
    """Files read for the sandbox, within one budget; what could not be read is a problem."""

    def __init__(self) -> None:
        self.left = STARTUP_BUDGET_BYTES
        self.problems: list[str] = []

    def read(self, path: Path, what: str) -> dict[str, Any] | None:
        try:
            if not path.is_file():
                self.problems.append(f"{what} {path}: not a regular file; not run")
                return None
            size = path.stat().st_size
            if size > self.left:
                self.problems.append(
                    f"{what} {path}: {size} bytes, over what is left of the {STARTUP_BUDGET_BYTES}-byte "
                    "budget for the sandbox's start-up code; not run"
                )
                return None
            source = path.read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            self.problems.append(f"{what} {path}: {err.strerror or err}; not run")
            return None
        self.left -= size
        return {"name": str(path), "source": source, "ipy": path.suffix == ".ipy"}


def profile_for_sandbox(
    config: Mapping[str, Any], startup_dir: str | None, environ: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """InteractiveShellApp's part for the sandbox's worker, and the problems met reading it."""
    environ = os.environ if environ is None else environ
    app = config.get("InteractiveShellApp")
    app = app if isinstance(app, Mapping) else {}
    sources = _Sources()
    extensions = _strings(app.get("default_extensions", list(_DEFAULT_EXTENSIONS))) + _strings(app.get("extensions"))
    startup: list[dict[str, Any]] = []
    if app.get("exec_PYTHONSTARTUP", True) and environ.get("PYTHONSTARTUP"):
        found = sources.read(Path(environ["PYTHONSTARTUP"]).expanduser(), "PYTHONSTARTUP")
        if found is not None:
            startup.append(found)
    if startup_dir and os.path.isdir(startup_dir):
        # IPython's order: the .py files, then the .ipy files, each sorted by name.
        names = sorted(glob.glob(os.path.join(startup_dir, "*.py"))) + sorted(
            glob.glob(os.path.join(startup_dir, "*.ipy"))
        )
        for name in names:
            found = sources.read(Path(name), "startup file")
            if found is not None:
                startup.append(found)
    exec_files = []
    for name in _strings(app.get("exec_files")):
        found = sources.read(Path(name).expanduser(), "exec_files entry")
        if found is not None:
            exec_files.append(found)
    shell_app = {
        "extensions": extensions,
        "startup": startup,
        "exec_lines": _strings(app.get("exec_lines")),
        "exec_files": exec_files,
    }
    return shell_app, sources.problems
