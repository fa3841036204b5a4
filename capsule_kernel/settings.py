"""Kernel settings other than limits, from the same capsule.toml / [tool.capsule].

Read once at start-up; a bad value is skipped with a warning in the log,
never a failed start.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from capsule_kernel.sandbox.limits import LimitError, find_config_file, parse_count, parse_duration, parse_switch

log = logging.getLogger(__name__)


DEFAULT_KEEP = 200
DEFAULT_GC_GRACE_SECONDS = 600.0


@dataclass(frozen=True)
class KernelSettings:
    auto_resume: bool = False
    keep: int | None = DEFAULT_KEEP
    gc_grace: float = DEFAULT_GC_GRACE_SECONDS
    # Where cells run unless %capsule mode says otherwise: subprocess, wasm or auto.
    mode: str = "subprocess"
    # Host directories Wasm cells may use: [{"path": absolute path, "writable": bool}].
    fs_access: tuple[dict[str, object], ...] = ()
    source: Path | None = None
    warnings: tuple[str, ...] = field(default=())

    @classmethod
    def load(cls, cwd: Path | None = None) -> KernelSettings:
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
        ):
            if raw is None:
                continue
            try:
                values[key] = parser(raw)
            except LimitError as err:
                warnings.append(f"{path}: {key}: {err}")
        if values.get("gc_grace") is None:
            values.pop("gc_grace", None)
        mode = os.environ.get("CAPSULE_MODE") or table.get("mode")
        if mode in ("subprocess", "wasm", "auto"):
            values["mode"] = mode
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
        for warning in warnings:
            log.warning(warning)
        return cls(**values, source=path, warnings=tuple(warnings))
