"""Names crossing between the two sandboxes, only through checkpoints (auto mode).

A part of SessionController (a mixin over its state: ledger, checkpoints,
relay). A value made in the Wasm sandbox is marked so in its manifest by the
kernel, and the subprocess sandbox then loads it as data only.
"""

from __future__ import annotations

from capsule_kernel.kernel.checkpoint.rows import CheckpointRefused
from capsule_kernel.kernel.sandbox.process import SandboxDied, SandboxProcess


class NameMovement:
    """Before a cell: the names it reads that the other sandbox wrote later, restored from the checkpoint."""

    async def _bring_names(self, sandbox: SandboxProcess, reads: frozenset[str]) -> None:
        """Merge into this sandbox the names the cell reads that the other sandbox wrote later."""
        wanted = sorted(name for name in reads if self.ledger.stale(sandbox.kind, name))
        if not wanted:
            return
        try:
            latest = self.checkpoints.latest(self.session_name)
        except CheckpointRefused as err:
            self.relay.note(f"Not brought over from the other sandbox: {err}\n")
            return
        if latest is None:
            return
        entries = {name: latest.entries[name] for name in wanted if name in latest.entries}
        # An alias comes with its target (one object), unless this sandbox holds the target's latest already.
        for entry in list(entries.values()):
            target = entry.get("alias")
            if (
                target
                and target not in entries
                and target in latest.entries
                and self.ledger.stale(sandbox.kind, target)
            ):
                entries[target] = latest.entries[target]
                wanted.append(target)
        failed: dict[str, str] = {}
        try:
            result = await sandbox.restore(entries, replace=False)
            failed = dict(result.get("failed", {}))
        except (SandboxDied, TimeoutError) as err:
            failed = dict.fromkeys(entries, f"the transfer failed: {err}")
        for name in wanted:
            self.ledger.note_brought(sandbox.kind, name)
            if name not in entries:
                failed.setdefault(name, "it was not in the last checkpoint")
        if failed:
            other = "subprocess" if sandbox.kind == "wasm" else "wasm"
            lines = "".join(f"  {name}: {why}\n" for name, why in sorted(failed.items()))
            self.relay.note(f"Not brought over from the {other} sandbox:\n{lines}")
