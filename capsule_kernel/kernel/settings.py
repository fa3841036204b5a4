"""Kernel settings other than limits, from the same capsule.toml / [tool.capsule].

Read once at start-up; a bad value is skipped with a warning in the log,
never a failed start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsule_kernel.kernel.limit_settings import find_config_file
from capsule_kernel.protocol.limits import LimitError, parse_count, parse_duration, parse_switch

log = logging.getLogger(__name__)


DEFAULT_KEEP = 200
DEFAULT_GC_GRACE_SECONDS = 600.0
# Back to back, how long and how many short cells a coalesced snapshot may be deferred
# (inside/worker/snapshots.py); 0 (the default): never, every cell is its own checkpoint.
DEFAULT_COALESCE_SECONDS = 0.0
DEFAULT_COALESCE_CELLS = 64


_WORKDIR_ACCESS = ("rw", "ro", "none")
DEFAULT_INTERRUPT_GRACE_SECONDS = 3.0


@dataclass(frozen=True)
class SandboxSettings:
    """The operator's ``[sandbox]`` table: what the subprocess sandbox sees and who it is.

    ``workdir``: the notebook's working directory read-write (default), read-only
    or not at all; ``env``: variables to set in the sandbox; ``pass_env``: names of
    the kernel's variables to pass on (the rest of its environment never reaches
    a cell); ``require_confinement``: refuse to run cells where the OS cannot confine them;
    ``interrupt_grace``: how long a cell may ignore an interrupt before the sandbox
    is stopped.
    """

    workdir: str = "rw"
    env: tuple[tuple[str, str], ...] = ()
    pass_env: tuple[str, ...] = ()
    require_confinement: bool = False
    interrupt_grace: float = DEFAULT_INTERRUPT_GRACE_SECONDS

    @classmethod
    def parse(cls, table: object, where: str, environ: Mapping[str, str]) -> tuple[SandboxSettings, list[str]]:
        """From the config table and CAPSULE_REQUIRE_CONFINEMENT; bad values are skipped with a warning."""
        warnings: list[str] = []
        values: dict[str, object] = {}
        if not isinstance(table, dict):
            if table is not None:
                warnings.append(f"{where}: [sandbox] must be a table")
            table = {}
        workdir = table.get("workdir")
        if workdir is not None:
            if workdir in _WORKDIR_ACCESS:
                values["workdir"] = workdir
            else:
                warnings.append(f"{where}: sandbox.workdir: {workdir!r} is not one of rw, ro, none")
        env = table.get("env", {})
        if isinstance(env, dict) and all(isinstance(v, str | int | float) for v in env.values()):
            values["env"] = tuple((str(k), str(v)) for k, v in env.items())
        else:
            warnings.append(f'{where}: sandbox.env must be a table of NAME = "value"')
        passed = table.get("pass_env", [])
        if isinstance(passed, list) and all(isinstance(name, str) for name in passed):
            values["pass_env"] = tuple(passed)
        else:
            warnings.append(f"{where}: sandbox.pass_env must be a list of variable names")
        if "uid" in table:
            warnings.append(f"{where}: sandbox.uid is ignored: the sandbox's uid is set with CAPSULE_SANDBOX_UID")
        for key, raw, parser in (
            (
                "require_confinement",
                environ.get("CAPSULE_REQUIRE_CONFINEMENT", table.get("require_confinement")),
                parse_switch,
            ),
            ("interrupt_grace", table.get("interrupt_grace"), parse_duration),
        ):
            if raw is None:
                continue
            try:
                value = parser(raw)
            except LimitError as err:
                warnings.append(f"{where}: sandbox.{key}: {err}")
                continue
            if value is not None:
                values[key] = value
        return cls(**values), warnings


# Fuel of the --compute presets, as the Wasm task runners Capsule learns from name them.
COMPUTE_PRESETS = {"low": 10**8, "medium": 2 * 10**9, "high": 5 * 10**10}
# What a task failed of: the envelope's error types (see session/task_envelope.py).
TASK_ERROR_TYPES = ("exception", "timeout", "cpu", "memory", "fuel", "crash", "cancelled", "refused", "input")
RETRYABLE_ERRORS = ("exception", "timeout", "cpu", "memory", "fuel", "crash")
# The task-level limits (the rest of [limits] applies to task sandboxes as it does to the notebook's).
TASK_LIMITS = ("timeout", "memory", "cpu", "fuel")


@dataclass(frozen=True)
class TaskSettings:
    """The operator's ``[tasks]`` table: defaults of every ``%%capsule task`` option, and the scheduler's.

    ``sandbox``: wasm, subprocess, or None (Wasm when the analyzer says the
    body can run there); ``max_parallel``: background tasks running at once;
    ``warm``: sandboxes kept started per kind once tasks are used;
    ``limits``: default task limits (timeout, memory, cpu, fuel), raw values
    in the ``[limits]`` vocabulary; ``compute``: fuel of the presets.
    """

    sandbox: str | None = None
    max_parallel: int = field(default_factory=lambda: os.cpu_count() or 2)
    warm: int = 1
    retries: int = 0
    backoff: float = 1.0
    backoff_max: float = 30.0
    retry_on: tuple[str, ...] = ("crash", "timeout")
    limits: tuple[tuple[str, str], ...] = ()
    compute: tuple[tuple[str, int], ...] = tuple(COMPUTE_PRESETS.items())

    @classmethod
    def parse(cls, table: object, where: str) -> tuple[TaskSettings, list[str]]:
        warnings: list[str] = []
        if not isinstance(table, dict):
            if table is not None:
                warnings.append(f"{where}: [tasks] must be a table")
            return cls(), warnings
        values: dict[str, Any] = {}
        sandbox = table.get("sandbox")
        if sandbox in ("wasm", "subprocess"):
            values["sandbox"] = sandbox
        elif sandbox is not None:
            warnings.append(f"{where}: tasks.sandbox: {sandbox!r} is not wasm or subprocess")
        for key, parser in (
            ("max_parallel", parse_count),
            ("warm", parse_count),
            ("retries", parse_count),
            ("backoff", parse_duration),
            ("backoff_max", parse_duration),
        ):
            if key not in table:
                continue
            try:
                value = parser(table[key])
            except LimitError as err:
                warnings.append(f"{where}: tasks.{key}: {err}")
                continue
            if value is not None and (key != "max_parallel" or value >= 1):
                values[key] = value
        retry_on = table.get("retry_on")
        if retry_on is not None:
            kinds = retry_on if isinstance(retry_on, list) else str(retry_on).split(",")
            unknown = [k for k in kinds if str(k).strip() not in RETRYABLE_ERRORS]
            if unknown:
                warnings.append(f"{where}: tasks.retry_on: {unknown} (known: {', '.join(RETRYABLE_ERRORS)})")
            else:
                values["retry_on"] = tuple(str(k).strip() for k in kinds)
        values["limits"] = tuple((name, str(table[name])) for name in TASK_LIMITS if name in table)
        compute = table.get("compute", {})
        if isinstance(compute, dict):
            presets = dict(COMPUTE_PRESETS)
            for name, raw in compute.items():
                if name in presets and isinstance(raw, int | float) and raw > 0:
                    presets[name] = int(raw)
                else:
                    warnings.append(f"{where}: tasks.compute.{name}: not a preset (low, medium, high) with fuel > 0")
            values["compute"] = tuple(presets.items())
        return cls(**values), warnings


@dataclass(frozen=True)
class KernelSettings:
    auto_resume: bool = False
    keep: int | None = DEFAULT_KEEP
    gc_grace: float = DEFAULT_GC_GRACE_SECONDS
    coalesce: float = DEFAULT_COALESCE_SECONDS
    coalesce_cells: int = DEFAULT_COALESCE_CELLS
    # Where cells run unless %capsule mode says otherwise: subprocess, wasm or auto.
    mode: str = "subprocess"
    # Host directories Wasm cells may use: [{"path": absolute path, "writable": bool}].
    fs_access: tuple[dict[str, object], ...] = ()
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)
    tasks: TaskSettings = field(default_factory=TaskSettings)
    source: Path | None = None
    warnings: tuple[str, ...] = field(default=())
    # Where the mode came from, and the whole capsule table (policy.py reads its other keys).
    mode_source: str = "default"
    table: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, cwd: Path | None = None, environ: Mapping[str, str] | None = None) -> KernelSettings:
        environ = os.environ if environ is None else environ
        warnings = []
        try:
            found = find_config_file(Path.cwd() if cwd is None else cwd)
        except LimitError as err:
            found = None
            warnings.append(str(err))
        path, table = found or (None, {})
        values: dict[str, object] = {}
        checkpoints = table.get("checkpoints", {})
        for key, raw, parser in (
            ("auto_resume", table.get("auto_resume"), parse_switch),
            ("keep", checkpoints.get("keep"), parse_count),
            ("gc_grace", checkpoints.get("gc_grace"), parse_duration),
            ("coalesce", checkpoints.get("coalesce"), parse_duration),
            ("coalesce_cells", checkpoints.get("coalesce_cells"), parse_count),
        ):
            if raw is None:
                continue
            try:
                values[key] = parser(raw)
            except LimitError as err:
                warnings.append(f"{path}: {key}: {err}")
        for key in ("gc_grace", "coalesce", "coalesce_cells"):
            if values.get(key) is None:
                values.pop(key, None)
        mode = environ.get("CAPSULE_MODE") or table.get("mode")
        if mode in ("subprocess", "wasm", "auto"):
            values["mode"] = mode
            values["mode_source"] = "environment CAPSULE_MODE" if environ.get("CAPSULE_MODE") else str(path)
        elif mode is not None:
            warnings.append(f"{path or 'CAPSULE_MODE'}: mode: {mode!r} is not subprocess, wasm or auto")
        access = table.get("fs_access", {})
        if isinstance(access, dict):
            mounts = []
            for key, writable in (("read", False), ("write", True)):
                for entry in access.get(key, []) or []:
                    target = Path(str(entry)).expanduser()
                    target = target if target.is_absolute() or path is None else path.parent / target
                    if target.is_dir():
                        mounts.append({"path": str(target.resolve()), "writable": writable})
                    else:
                        warnings.append(f"{path}: fs_access.{key}: {entry} is not a directory; not mounted")
            values["fs_access"] = tuple(mounts)
        else:
            warnings.append(f"{path}: fs_access must be a table with read = [...] and write = [...]")
        values["sandbox"], sandbox_warnings = SandboxSettings.parse(table.get("sandbox"), str(path), environ)
        warnings += sandbox_warnings
        values["tasks"], task_warnings = TaskSettings.parse(table.get("tasks"), str(path))
        warnings += task_warnings
        for warning in warnings:
            log.warning(warning)
        return cls(**values, source=path, warnings=tuple(warnings), table=dict(table))


# The IPython configuration a client gives the kernel's command line (nbclient passes
# --HistoryManager.hist_file=:memory:) that the sandbox's IPython takes, as ipykernel's shell would.
SANDBOX_IPYTHON_SECTIONS = (
    "HistoryManager", "InteractiveShell", "ZMQInteractiveShell", "IPCompleter", "PlainTextFormatter", "InlineBackend",
)  # fmt: skip


def sandbox_ipython_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON part of those sections (the profile's start-up code: ipython_profile.py)."""
    import json

    chosen: dict[str, Any] = {}
    for section in SANDBOX_IPYTHON_SECTIONS:
        values = config.get(section)
        if not isinstance(values, Mapping):
            continue
        kept = {}
        for key, value in values.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                continue
            kept[str(key)] = value
        if kept:
            chosen[section] = kept
    return chosen
