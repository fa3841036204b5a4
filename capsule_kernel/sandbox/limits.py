"""One vocabulary for sandbox limits, and where each value came from.

Layers, later wins: built-in defaults, then ``capsule.toml`` (``[limits]``) or
``pyproject.toml`` (``[tool.capsule.limits]``) found from the working directory
upwards, then ``CAPSULE_*`` environment variables, then ``%capsule limits`` at
run time. Every value remembers its source so ``%capsule limits`` can say why a
limit is what it is. A malformed value never half-applies: parsing happens
before anything changes.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

LIMIT_NAMES = ("memory", "cpu", "timeout", "files", "procs", "network", "disk", "fuel")
# Limits that only the Wasm sandbox can enforce.
WASM_ONLY_LIMITS = ("fuel",)

ENV_PREFIX = "CAPSULE_"
# After an interrupt or the deadline, how long a Wasm cell may take to notice
# (at its next print, sleep or input) before the instance is stopped hard.
STOP_GRACE_SECONDS = 1.0
# Each private tmpfs of a subprocess sandbox (/tmp, /dev/shm, HOME) holds at most this.
DEFAULT_DISK = 2 * 1024**3

_UNLIMITED = {"unlimited", "none", "off", "inf", "infinity", "0"}

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


class LimitError(ValueError):
    """A limit value that cannot be understood; the message is shown to users."""


def parse_size(text: str | int) -> int | None:
    """'512MB', '1GiB', '256k', 1048576 -> bytes; 'unlimited' -> None.

    Bare k/m/g are binary (as in ulimit and docker); KB/MB/GB are decimal;
    KiB/MiB/GiB are binary.
    """
    if isinstance(text, bool):
        raise LimitError(f"invalid size {text!r}")
    if isinstance(text, int):
        return text if text > 0 else None
    if text.strip().lower() in _UNLIMITED:
        return None
    match = _NUMBER_UNIT.match(text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise LimitError(f"invalid size {text!r} (examples: 512MB, 1GiB, 256k, unlimited)")
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise LimitError(f"invalid size {text!r}: must be positive")
    return value


def parse_duration(text: str | int | float) -> float | None:
    """'500ms', '30s', '5m', '1h', 12 -> seconds; 'unlimited' -> None."""
    if isinstance(text, bool):
        raise LimitError(f"invalid duration {text!r}")
    if isinstance(text, (int, float)):
        return float(text) if text > 0 else None
    if text.strip().lower() in _UNLIMITED:
        return None
    match = _NUMBER_UNIT.match(text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _DURATION_UNITS:
        raise LimitError(f"invalid duration {text!r} (examples: 500ms, 30s, 5m, 1h, unlimited)")
    value = float(match.group(1)) * _DURATION_UNITS[unit]
    if value <= 0:
        raise LimitError(f"invalid duration {text!r}: must be positive")
    return value


def parse_count(text: str | int) -> int | None:
    """'256' or 256 -> 256; 'unlimited' -> None."""
    if isinstance(text, bool):
        raise LimitError(f"invalid count {text!r}")
    if isinstance(text, int):
        return text if text > 0 else None
    if text.strip().lower() in _UNLIMITED:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        raise LimitError(f"invalid count {text!r} (a whole number, or unlimited)") from None
    if value <= 0:
        raise LimitError(f"invalid count {text!r}: must be positive")
    return value


_FUEL_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_fuel(text: str | int) -> int | None:
    """Wasm fuel units per cell: '5000000000', '5G', '2.5e9', 'unlimited'.

    Suffixes are decimal (k, M, G, T): fuel counts instructions, not bytes.
    """
    if isinstance(text, bool):
        raise LimitError(f"invalid fuel {text!r}")
    if isinstance(text, int):
        return text if text > 0 else None
    if text.strip().lower() in _UNLIMITED:
        return None
    cleaned = text.strip().replace("_", "").replace(",", "")
    unit = cleaned[-1:].lower() if cleaned[-1:].isalpha() and cleaned[-1:].lower() != "e" else ""
    number = cleaned[: len(cleaned) - len(unit)]
    try:
        value = int(float(number) * _FUEL_UNITS[unit])
    except (ValueError, KeyError):
        raise LimitError(f"invalid fuel {text!r} (examples: 5000000000, 5G, 2.5e9, unlimited)") from None
    if value <= 0:
        raise LimitError(f"invalid fuel {text!r}: must be positive")
    return value


def parse_switch(text: str | bool) -> bool:
    """'on'/'off' (also true/false, yes/no, 1/0) -> bool."""
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in {"on", "true", "yes", "1", "allow", "allowed"}:
        return True
    if lowered in {"off", "false", "no", "0", "deny", "denied"}:
        return False
    raise LimitError(f"invalid switch {text!r} (on or off)")


_PARSERS = {
    "memory": parse_size,
    "cpu": parse_duration,
    "timeout": parse_duration,
    "files": parse_count,
    "procs": parse_count,
    "network": parse_switch,
    "disk": parse_size,
    "fuel": parse_fuel,
}


def format_size(value: int | None) -> str:
    if value is None:
        return "unlimited"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= scale:
            number = value / scale
            return f"{number:.0f} {unit}" if number == int(number) else f"{number:.1f} {unit}"
    return f"{value} B"


def format_duration(value: float | None) -> str:
    if value is None:
        return "unlimited"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120 or value % 60:
        return f"{value:g} s"
    if value < 7200 or value % 3600:
        return f"{value / 60:g} min"
    return f"{value / 3600:g} h"


def format_value(name: str, value: Any) -> str:
    if name in ("memory", "disk"):
        return format_size(value)
    if name in ("cpu", "timeout"):
        return format_duration(value)
    if name == "network":
        return "on" if value else "off"
    if name == "fuel" and value is not None:
        return f"{value:,} units per cell"
    return "unlimited" if value is None else str(value)


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * 1024**3


@dataclass(frozen=True)
class Limits:
    """The limits one sandbox runs under. None means unlimited."""

    memory: int | None = None
    cpu: float | None = None
    timeout: float | None = None
    files: int | None = None
    procs: int | None = None
    network: bool = False
    disk: int | None = None
    fuel: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in LIMIT_NAMES}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Limits:
        return cls(**{name: data[name] for name in LIMIT_NAMES if name in data})

    def describe(self, name: str) -> str:
        return format_value(name, getattr(self, name))


def default_limits() -> Limits:
    """Built-in defaults: generous enough for data work, tight on what leaks.

    Memory is half the machine's RAM (address space, so leave room for virtual
    reservations); no CPU or wall-clock cap, since long training cells are
    normal; 1024 open files; 512 processes; no network; 2 GiB in each private
    tmpfs; no fuel cap (Wasm cells still report the fuel they used).
    """
    return Limits(
        memory=_physical_memory() // 2,
        cpu=None,
        timeout=None,
        files=1024,
        procs=512,
        network=False,
        disk=DEFAULT_DISK,
        fuel=None,
    )


# The host uid of every subprocess sandbox when the kernel runs as root (the
# operator may pick another with CAPSULE_SANDBOX_UID; never from a file, since
# the sandbox can write files in the notebook's directory).
DEFAULT_SANDBOX_UID = 65533
SANDBOX_UID_VARIABLE = "CAPSULE_SANDBOX_UID"


def sandbox_uid(environ: Mapping[str, str] | None = None) -> int:
    """The uid a root kernel gives its sandboxes (never 0)."""
    raw = (os.environ if environ is None else environ).get(SANDBOX_UID_VARIABLE, "")
    if raw.isdigit() and 0 < int(raw) < 2**32 - 1:
        return int(raw)
    return DEFAULT_SANDBOX_UID


def written_by_a_sandbox(path: Path) -> bool:
    """A config file a sandbox made or changed.

    A root kernel's sandboxes have their own uid, so their files show it; any
    kernel distrusts a file it saw change while a cell ran (policy_files.py).
    """
    from capsule_kernel.checkpoint.store import default_home
    from capsule_kernel.policy_files import distrusted

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
    from capsule_kernel.untrusted_files import is_regular  # kernel side only: the guest shares this module

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
    from capsule_kernel.untrusted_files import MAX_CONFIG_BYTES, read_regular

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
        if name not in _PARSERS:
            message = f"{source}: unknown limit {name!r} (known: {', '.join(LIMIT_NAMES)})"
            if strict:
                raise LimitError(message)
            self.warnings.append(message)
            return
        try:
            value = _PARSERS[name](raw)
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
            if name not in _PARSERS:
                raise LimitError(f"unknown limit {name!r} (known: {', '.join(LIMIT_NAMES)})")
            parsed[name] = _PARSERS[name](raw)
        return parsed

    def override(self, changes: Mapping[str, Any], source: str) -> Limits:
        """Apply run-time changes all or nothing; raise LimitError on any bad one."""
        parsed = self.parse_changes(changes)
        self.limits = replace(self.limits, **parsed)
        for name in parsed:
            self.sources[name] = source
        return self.limits
