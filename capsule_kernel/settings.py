"""Kernel settings other than limits, from the same capsule.toml / [tool.capsule].

Read once at start-up; a bad value is skipped with a warning in the log,
never a failed start.
"""

from __future__ import annotations

import logging
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
    source: Path | None = None
    warnings: tuple[str, ...] = field(default=())

    @classmethod
    def load(cls, cwd: Path | None = None) -> KernelSettings:
        try:
            found = find_config_file(Path.cwd() if cwd is None else cwd)
        except LimitError as err:
            return cls(warnings=(str(err),))
        if not found:
            return cls()
        path, table = found
        warnings = []
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
        for warning in warnings:
            log.warning(warning)
        return cls(**values, source=path, warnings=tuple(warnings))
