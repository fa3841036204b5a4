"""The operator's limits as layered at start-up: defaults < capsule.toml < CAPSULE_*, each with its source.

Kernel side only (it reads files and the store's distrust records); the limit
vocabulary itself is protocol/limits.py, which the sandboxes share. A config
file a sandbox wrote is never read: policy belongs to the operator.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from capsule_kernel.kernel.checkpoint.home import default_home
from capsule_kernel.kernel.policy_files import distrusted
from capsule_kernel.kernel.untrusted_files import MAX_CONFIG_BYTES, is_regular, read_regular
from capsule_kernel.protocol.limits import (
    ENV_PREFIX,
    LIMIT_NAMES,
    PARSERS,
    LimitError,
    Limits,
    default_limits,
    sandbox_uid,
)


def written_by_a_sandbox(path: Path) -> bool:
    """A config file a sandbox made or changed.

    A root kernel's sandboxes have their own uid, so their files show it; any
    kernel distrusts a file it saw change while a cell ran (policy_files.py).
    """

    try:
        if os.geteuid() == 0 and path.stat().st_uid == sandbox_uid():
            return True
    except OSError:
        return False
    return distrusted(path, default_home())


def find_config_file(start: Path) -> tuple[Path, dict[str, Any]] | None:
    """The nearest capsule.toml, or pyproject.toml with [tool.capsule], upwards.

    Returns the file and its capsule table (empty if it has none).
    Raises LimitError when the nearest such file is not valid TOML. A file
    that a sandbox wrote (it may write the notebook's directory) is skipped:
    policy belongs to the operator, not to the code it governs.
    """
    for directory in (start, *start.parents):
        candidate = directory / "capsule.toml"
        if is_regular(candidate) and not written_by_a_sandbox(candidate):
            return candidate, _load_toml(candidate)
        candidate = directory / "pyproject.toml"
        if is_regular(candidate) and not written_by_a_sandbox(candidate):
            table = _load_toml(candidate).get("tool", {}).get("capsule")
            if isinstance(table, dict):
                return candidate, table
    return None


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        # Opened once, no link followed, no FIFO waited on, no more than a config's size read.
        return tomllib.loads(read_regular(path, MAX_CONFIG_BYTES).decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise LimitError(f"cannot read {path}: {err}") from None


@dataclass
class LimitSettings:
    """The layered limits in force, with the source of each value.

    ``warnings`` collects configuration problems (a bad value in a file or an
    environment variable): the value is skipped, the kernel keeps running and
    the user sees why in ``%capsule limits``.
    """

    limits: Limits = field(default_factory=default_limits)
    sources: dict[str, str] = field(default_factory=lambda: dict.fromkeys(LIMIT_NAMES, "default"))
    warnings: list[str] = field(default_factory=list)
    config_file: Path | None = None

    @classmethod
    def load(cls, cwd: Path | None = None, environ: Mapping[str, str] | None = None) -> LimitSettings:
        """Defaults, then the config file, then the environment."""
        settings = cls()
        cwd = Path.cwd() if cwd is None else cwd
        environ = os.environ if environ is None else environ
        try:
            found = find_config_file(cwd)
        except LimitError as err:
            settings.warnings.append(str(err))
            found = None
        if found:
            path, table = found
            settings.config_file = path
            where = "capsule.toml" if path.name == "capsule.toml" else "pyproject.toml [tool.capsule]"
            section = table.get("limits", {})
            if not isinstance(section, dict):
                settings.warnings.append(f"{path}: [limits] must be a table")
                section = {}
            for name, raw in section.items():
                settings._apply_one(name, raw, f"{where} ({path})", strict=False)
        for name in LIMIT_NAMES:
            variable = ENV_PREFIX + name.upper()
            if variable in environ:
                settings._apply_one(name, environ[variable], f"environment {variable}", strict=False)
        return settings

    def _apply_one(self, name: str, raw: Any, source: str, *, strict: bool) -> None:
        if name not in PARSERS:
            message = f"{source}: unknown limit {name!r} (known: {', '.join(LIMIT_NAMES)})"
            if strict:
                raise LimitError(message)
            self.warnings.append(message)
            return
        try:
            value = PARSERS[name](raw)
        except LimitError as err:
            if strict:
                raise
            self.warnings.append(f"{source}: {name}: {err}; keeping {self.limits.describe(name)}")
            return
        self.limits = replace(self.limits, **{name: value})
        self.sources[name] = source

    def apply(self, name: str, raw: Any, source: str) -> None:
        """One operator value from a later layer; a bad one is a warning, never a failed start."""
        self._apply_one(name, raw, source, strict=False)

    @staticmethod
    def parse_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
        """Parse run-time changes; LimitError on any bad one, before anything changes."""
        parsed = {}
        for name, raw in changes.items():
            if name not in PARSERS:
                raise LimitError(f"unknown limit {name!r} (known: {', '.join(LIMIT_NAMES)})")
            parsed[name] = PARSERS[name](raw)
        return parsed

    def override(self, changes: Mapping[str, Any], source: str) -> Limits:
        """Apply run-time changes all or nothing; raise LimitError on any bad one."""
        parsed = self.parse_changes(changes)
        self.limits = replace(self.limits, **parsed)
        for name in parsed:
            self.sources[name] = source
        return self.limits
