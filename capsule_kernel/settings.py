"""Kernel settings other than limits, from the same capsule.toml / [tool.capsule].

Read once at start-up; a bad value is skipped with a warning in the log,
never a failed start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from capsule_kernel.sandbox.limits import LimitError, find_config_file, parse_switch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelSettings:
    auto_resume: bool = False
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
        auto_resume = False
        if "auto_resume" in table:
            try:
                auto_resume = parse_switch(table["auto_resume"])
            except LimitError as err:
                warnings.append(f"{path}: auto_resume: {err}")
        for warning in warnings:
            log.warning(warning)
        return cls(auto_resume=auto_resume, source=path, warnings=tuple(warnings))
