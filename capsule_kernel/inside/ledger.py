"""What the last snapshot saved, so the next one pickles only what changed.

Both sandboxes keep one: the digest and size of each saved name (as the
snapshot reported them), and the object ids at the last snapshot
(``snapshot.changed_names`` compares against both). A restore sets it to
what was loaded; a new session forgets it, so its first snapshot is full.
It is an optimisation only: the kernel verifies every chunk by its hash,
so a wrong ledger costs a larger snapshot, never a wrong checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class SnapshotLedger:
    def __init__(self) -> None:
        self.digests: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        # Object ids at the latest snapshot: what the next one compares to.
        self.ids: dict[str, int] = {}

    def forget(self) -> None:
        """The next snapshot saves every name."""
        self.digests.clear()
        self.sizes.clear()
        self.ids.clear()

    def learn(self, saved: Mapping[str, tuple[str | None, int]], removed: Iterable[str]) -> None:
        """A snapshot's result: each saved name's (digest, size); a None digest was not saved."""
        for name, (digest, size) in saved.items():
            if digest:
                self.digests[name] = digest
                self.sizes[name] = size
            else:
                self.digests.pop(name, None)
        for name in removed:
            self.digests.pop(name, None)
            self.sizes.pop(name, None)

    def restored(
        self, entries: Mapping[str, Any], names: Iterable[str], namespace: Mapping[str, Any], *, replace: bool
    ) -> None:
        """A checkpoint's ``names`` were loaded from ``entries``: they are saved as they are now."""
        names = [name for name in names if name in namespace]
        digests = {name: entries[name]["digest"] for name in names if "digest" in entries[name]}
        sizes = {name: entries[name].get("size", 0) for name in digests}
        # Every loaded name (with or without a digest), so that deleting one later is reported.
        ids = {name: id(namespace[name]) for name in names}
        if replace:
            self.digests, self.sizes, self.ids = digests, sizes, ids
        else:  # merged in: what was known of the other names still holds
            self.digests.update(digests)
            self.sizes.update(sizes)
            self.ids.update(ids)


def clear_for_replace(namespace: dict[str, Any], saveable: Iterable[str], entries: Mapping[str, Any]) -> None:
    """Before a replacing restore: drop the user's names the checkpoint does not have."""
    for name in list(saveable):
        if name not in entries:
            del namespace[name]
