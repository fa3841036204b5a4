"""What the operator set, read once, with provenance; and what a notebook may change of it.

Layers, later wins: built-in defaults < ``capsule.toml`` / ``[tool.capsule]``
< ``CAPSULE_*`` environment variables < kernel options (traitlets on
CapsuleKernel: ``--CapsuleKernel.mode=wasm`` in a kernelspec's argv,
``c.CapsuleKernel.limits = {...}`` in a Jupyter config file). Those are the
operator's. What a notebook changes at run time (``%capsule limits``,
``%capsule mode``, ``%capsule mount``) is a narrower layer on top, checked
here, on the trusted side: it may lower a limit but never raise it above the
operator's value, and it may not widen the routing mode, the mounts or the
network unless the operator allows it (``notebook_may_widen``) or, for the
mode, at all when the operator set ``lock_mode``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from capsule_kernel.kernel.limit_settings import LimitSettings
from capsule_kernel.kernel.settings import KernelSettings
from capsule_kernel.protocol import allowed_hosts
from capsule_kernel.protocol.limits import LIMIT_NAMES, LimitError, Limits, format_value, parse_switch

log = logging.getLogger(__name__)

# What a notebook may be allowed to widen beyond the operator's values.
WIDENABLE = ("limits", "mode", "mounts", "network", "session")
# Narrow to wide: a notebook may always move left of the operator's mode.
MODE_ORDER = ("wasm", "auto", "subprocess")


class PolicyRefused(Exception):
    """A notebook asked for more than the operator allows: a one-line message naming the setting."""


@dataclass(frozen=True)
class KernelOptions:
    """The kernel's traitlets (``CapsuleKernel.mode`` etc.), the operator's last layer."""

    mode: str | None = None
    lock_mode: bool | None = None
    limits: Mapping[str, Any] = field(default_factory=dict)
    notebook_may_widen: tuple[str, ...] | None = None


@dataclass
class Policy:
    """The operator's values (ceilings and locks) and the notebook's narrower layer."""

    limits: LimitSettings
    settings: KernelSettings
    mode: str
    mode_source: str
    lock_mode: bool
    widen: frozenset[str]
    problems: list[str] = field(default_factory=list)
    # The operator's limits: a notebook's ceiling.
    ceiling: Limits = field(default_factory=Limits)
    ceiling_sources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        cwd: Path | None = None,
        environ: Mapping[str, str] | None = None,
        options: KernelOptions | None = None,
    ) -> Policy:
        environ = os.environ if environ is None else environ
        options = options or KernelOptions()
        limits = LimitSettings.load(cwd, environ)
        settings = KernelSettings.load(cwd, environ)
        for name, raw in dict(options.limits).items():
            limits.apply(str(name), raw, "kernel option CapsuleKernel.limits")
        problems = [*limits.warnings, *settings.warnings]
        table = settings.table
        mode, mode_source = settings.mode, settings.mode_source
        if options.mode is not None:
            if options.mode in MODE_ORDER:
                mode, mode_source = options.mode, "kernel option CapsuleKernel.mode"
            else:
                problems.append(f"CapsuleKernel.mode: {options.mode!r} is not subprocess, wasm or auto")
        lock_mode, problems = _switch(
            ("kernel option CapsuleKernel.lock_mode", options.lock_mode),
            ("environment CAPSULE_LOCK_MODE", environ.get("CAPSULE_LOCK_MODE")),
            (f"{settings.source}: lock_mode", table.get("lock_mode")),
            problems=problems,
        )
        widen, problems = _widen(
            ("kernel option CapsuleKernel.notebook_may_widen", options.notebook_may_widen),
            ("environment CAPSULE_NOTEBOOK_MAY_WIDEN", environ.get("CAPSULE_NOTEBOOK_MAY_WIDEN")),
            (f"{settings.source}: notebook_may_widen", table.get("notebook_may_widen")),
            problems=problems,
        )
        for problem in problems:
            log.warning(problem)
        return cls(
            limits=limits,
            settings=settings,
            mode=mode,
            mode_source=mode_source,
            lock_mode=lock_mode,
            widen=widen,
            problems=list(dict.fromkeys(problems)),
            ceiling=limits.limits,
            ceiling_sources=dict(limits.sources),
        )

    # -- what a notebook may change ---------------------------------------------------

    def notebook_limits(self, changes: Mapping[str, Any]) -> Limits:
        """Parse and check a notebook's limit changes, all or nothing; apply them if allowed."""
        self._check_ceilings(self.limits.parse_changes(changes))
        return self.limits.override(changes, "%capsule limits")

    def task_limits(self, changes: Mapping[str, Any]) -> Limits:
        """The limits of one task: the notebook's, changed by the task's options, under the same ceilings.

        The notebook's own limits stay as they are.
        """
        parsed = self.limits.parse_changes(changes)
        self._check_ceilings(parsed)
        return replace(self.limits.limits, **parsed)

    def check_task_sandbox(self, kind: str) -> None:
        """A task may run in Wasm always; in the subprocess sandbox only where a notebook cell could."""
        if kind == "subprocess" and self.mode == "wasm" and "mode" not in self.widen:
            raise PolicyRefused(
                f"a task may not run in the subprocess sandbox: the operator's mode is wasm ({self.mode_source})"
            )

    def _check_ceilings(self, parsed: Mapping[str, Any]) -> None:
        if "limits" not in self.widen:
            for name, value in parsed.items():
                if name == "network":
                    continue
                ceiling = getattr(self.ceiling, name)
                if ceiling is not None and (value is None or value > ceiling):
                    raise PolicyRefused(
                        f"{name} {format_value(name, value)} is above the operator's {format_value(name, ceiling)} "
                        f"({self.ceiling_sources.get(name, 'default')}); a notebook may only lower it"
                    )
        if "network" in parsed and "network" not in self.widen:
            self._check_network(parsed["network"])

    def _check_network(self, wanted: bool | tuple[str, ...]) -> None:
        """A notebook may narrow the network: off, or hosts the operator's list (or "on") allows."""
        ceiling, source = self.ceiling.network, self.ceiling_sources.get("network", "default")
        if wanted is False or ceiling is True:
            return
        if wanted is True or ceiling is False:
            said = "on" if wanted is True else "the hosts " + ", ".join(wanted)
            allowed = "off" if ceiling is False else "only " + ", ".join(ceiling)
            raise PolicyRefused(
                f"network {said}: the operator's network is {allowed} ({source}); a notebook may only narrow it "
                "(the operator can allow more with notebook_may_widen)"
            )
        outside = allowed_hosts.covers(allowed_hosts.parse_rules(ceiling), allowed_hosts.parse_rules(wanted))
        if outside is not None:
            raise PolicyRefused(
                f"network: {outside.text} is not within the operator's allowed hosts ({', '.join(ceiling)}; "
                f"{source}); a notebook may only narrow them"
            )

    def check_mode(self, current: str, wanted: str) -> None:
        """A notebook may narrow the routing mode; widening it beyond the operator's needs their leave."""
        if wanted == current:
            return
        if self.lock_mode:
            raise PolicyRefused(f"the routing mode is locked to {self.mode} by the operator (lock_mode)")
        wider = MODE_ORDER.index(wanted) > MODE_ORDER.index(self.mode)
        if wider and "mode" not in self.widen:
            raise PolicyRefused(
                f"mode {wanted} is wider than the operator's {self.mode} ({self.mode_source}); "
                "a notebook may only narrow it"
            )

    def check_mount(self, path: Path, writable: bool) -> None:
        """A new mount must lie inside one the operator declared, with no more access, unless allowed."""
        if "mounts" in self.widen:
            return
        for mount in self.settings.fs_access:
            root = Path(str(mount["path"]))
            if (path == root or root in path.parents) and (mount.get("writable") or not writable):
                return
        access = "read-write" if writable else "read-only"
        raise PolicyRefused(
            f"{path} ({access}) is not within the operator's mounts (fs_access); a notebook may not add "
            'mounts (the operator can allow it with notebook_may_widen = ["mounts"])'
        )

    def check_session(self, name: str, owner: str | None, notebook: str) -> None:
        """A notebook may switch into a session it created (or a new one); another's needs the operator's leave.

        `owner` is the store's answer: None for a session no one has used,
        "" for one whose owner row failed its MAC.
        """
        if owner is None or owner == notebook or name == notebook or "session" in self.widen:
            return
        whose = f"notebook {owner}" if owner else "a notebook this store cannot authenticate"
        raise PolicyRefused(
            f"session {name} belongs to {whose}, not to this one ({notebook}); a notebook may switch only "
            'into sessions it created (the operator can allow it with notebook_may_widen = ["session"])'
        )

    def describe(self) -> list[list[str]]:
        """Rows for %capsule status: the locks and what a notebook may widen."""
        widen = ", ".join(sorted(self.widen)) or "nothing (a notebook may only narrow the operator's values)"
        return [
            ["mode source", self.mode_source + (" (locked)" if self.lock_mode else "")],
            ["may widen", widen],
        ]


def _switch(*layers: tuple[str, Any], problems: list[str]) -> tuple[bool, list[str]]:
    """The first layer that sets a switch wins (layers are given from the operator's last)."""
    for where, raw in layers:
        if raw is None:
            continue
        try:
            return bool(parse_switch(raw)), problems
        except LimitError as err:
            problems = [*problems, f"{where}: {err}"]
    return False, problems


def _widen(*layers: tuple[str, Any], problems: list[str]) -> tuple[frozenset[str], list[str]]:
    for where, raw in layers:
        if raw is None:
            continue
        items: Iterable[Any] = raw.split(",") if isinstance(raw, str) else raw if isinstance(raw, list | tuple) else ()
        names = {str(item).strip() for item in items if str(item).strip()}
        unknown = names - set(WIDENABLE)
        if unknown or not isinstance(raw, str | list | tuple):
            problems = [*problems, f"{where}: {sorted(unknown) or raw!r} not among {', '.join(WIDENABLE)}"]
        return frozenset(names & set(WIDENABLE)), problems
    return frozenset(), problems


__all__ = ["LIMIT_NAMES", "KernelOptions", "Policy", "PolicyRefused"]
