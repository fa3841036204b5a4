"""One vocabulary for sandbox limits: the names, their parsers, their wording (512MB, 30s...).

Shared by the kernel, the worker, the Wasm host and the guest (stdlib only). The
layers (defaults < capsule.toml or pyproject.toml < CAPSULE_* < %capsule limits),
each value with its source, are the kernel's: kernel/limit_settings.py. A
malformed value never half-applies: parsing happens before anything changes.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from capsule_kernel.protocol import allowed_hosts

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


def parse_network(value: Any) -> bool | tuple[str, ...]:
    """`on`, `off`, or the allowed hosts: a list, or a comma list in one string (CAPSULE_NETWORK)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        with contextlib.suppress(LimitError):
            return parse_switch(value)
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple):
        raise LimitError(f"invalid network {value!r} (on, off, or a list of allowed hosts)")
    try:
        rules = allowed_hosts.parse_rules(value)
    except allowed_hosts.RuleError as err:
        raise LimitError(str(err)) from None
    return tuple(rule.text for rule in rules)


PARSERS = {
    "memory": parse_size,
    "cpu": parse_duration,
    "timeout": parse_duration,
    "files": parse_count,
    "procs": parse_count,
    "network": parse_network,
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
        if isinstance(value, tuple | list):
            return "only " + ", ".join(value)
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
    # False: loopback only; True: the host's network; a tuple: only these hosts, through the kernel's proxy.
    network: bool | tuple[str, ...] = False
    disk: int | None = None
    fuel: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in LIMIT_NAMES}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Limits:
        values = {name: data[name] for name in LIMIT_NAMES if name in data}
        if isinstance(values.get("network"), list):
            values["network"] = tuple(values["network"])
        return cls(**values)

    @property
    def allowed_hosts(self) -> tuple[str, ...] | None:
        """The allowed hosts when the network is a list of them (else None: on or off)."""
        return self.network if isinstance(self.network, tuple) else None

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
