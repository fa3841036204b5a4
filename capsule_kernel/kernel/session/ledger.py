"""Auto mode's merge rule: where each name was last written, and which version each sandbox holds.

Learned only from snapshot reports the kernel recorded (never from what a
sandbox claims otherwise), so a name is brought into a sandbox exactly when
the other sandbox wrote it later than this one last saw it.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Any

KINDS = ("subprocess", "wasm")


@dataclass
class NameLedger:
    # name -> (sandbox kind that wrote it last, execution count, type name)
    origins: dict[str, tuple[str, int, str]] = field(default_factory=dict)
    # kind -> name -> the execution count of the version that sandbox holds
    held: dict[str, dict[str, int]] = field(default_factory=lambda: {kind: {} for kind in KINDS})

    def value_types(self, names: frozenset[str]) -> dict[str, str]:
        return {name: self.origins[name][2] for name in names if name in self.origins}

    def unknown(self, names: frozenset[str]) -> bool:
        """Whether a name may be in a snapshot not recorded yet (it is neither known nor a builtin)."""
        return any(name not in self.origins and not hasattr(builtins, name) for name in names)

    def mixed(self, kind: str) -> bool:
        """Whether another sandbox than ``kind`` wrote any name."""
        return any(origin != kind for origin, _, _ in self.origins.values())

    def stale(self, kind: str, name: str) -> bool:
        """The other sandbox wrote this name later than ``kind`` last saw it."""
        held = self.held.setdefault(kind, {})
        return name in self.origins and self.origins[name][0] != kind and held.get(name, -1) < self.origins[name][1]

    def fresh_sandbox(self, kind: str) -> None:
        self.held[kind] = {}

    def note_snapshot(self, kind: str, event: dict[str, Any]) -> None:
        count = int(event.get("execution_count", 0))
        held = self.held.setdefault(kind, {})
        for name, entry in event.get("entries", {}).items():
            self.origins[name] = (kind, count, str(entry.get("type", "")))
            held[name] = count
        for name in event.get("removed", []):
            self.origins.pop(name, None)
            held.pop(name, None)

    def note_held(self, kind: str, names: set[str] | None) -> None:
        """After a restore: this sandbox holds the checkpointed version of those names."""
        held = self.held.setdefault(kind, {})
        for name, (_, count, _) in self.origins.items():
            if names is None or name in names:
                held[name] = count

    def note_brought(self, kind: str, name: str) -> None:
        """Tried once per write: no retry storm."""
        self.held.setdefault(kind, {})[name] = self.origins[name][1]

    def replaced(self, kind: str, checkpoint: Any | None) -> None:
        """After a restore, resume or restart: the sandbox of ``kind`` alone holds the truth."""
        self.origins.clear()
        self.held = {k: {} for k in KINDS}
        if checkpoint is not None:
            for name, entry in checkpoint.entries.items():
                self.origins[name] = (kind, checkpoint.execution_count, str(entry.get("type", "")))
                self.held[kind][name] = checkpoint.execution_count
