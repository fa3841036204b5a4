"""The config files in the notebook's directory, watched for changes a sandbox could have made.

Runs in the KERNEL. The kernel reads its policy (limits, mounts, mode) from
the nearest ``capsule.toml`` or ``pyproject.toml [tool.capsule]``, starting
in the notebook's working directory, which the sandbox may write. A root
kernel tells a file its sandbox wrote by its owner (the sandbox has its own
uid); a kernel that shares its uid with the sandbox cannot. So the kernel
notes the files' state when it starts and after every cell: a file that
changed while a sandbox could write it is distrusted, by content hash,
in CAPSULE_HOME (which no sandbox can reach), and no later kernel reads it
as configuration. Editing it while no kernel runs makes it trusted again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

from capsule_kernel.kernel.untrusted_files import MAX_CONFIG_BYTES, read_regular

NAMES = ("capsule.toml", "pyproject.toml")
_LEDGER = "distrusted-config.json"
_MAX_ENTRIES = 1000
_RACY_NS = 2_000_000_000


def _digest(path: Path) -> str | None:
    """The file's hash; a link, a FIFO or a file over the config size has none (it is never read as config)."""
    try:
        return hashlib.sha256(read_regular(path, MAX_CONFIG_BYTES)).hexdigest()
    except OSError:
        return None


def distrusted(path: Path, home: Path) -> bool:
    """Whether this file's content was seen changing under a running sandbox."""
    digest = _digest(path)
    if digest is None:
        return False
    try:
        return digest in json.loads((home / _LEDGER).read_text())
    except (OSError, ValueError):
        return False


class PolicyFileWatch:
    """The state of the notebook directory's config files, compared after each cell."""

    def __init__(self, directory: Path, home: Path) -> None:
        self.directory = directory
        self.home = home
        # name -> (stat identity, digest): a file is read and hashed again only when its
        # identity moved. The identity includes st_ctime_ns, which no sandbox can set back
        # (utime sets mtime, and moves ctime), so an in-place rewrite that restores size and
        # mtime is still seen. The clock behind ctime is coarse (a few ms), so a file changed
        # within _RACY_NS of now is hashed every time, as git treats "racily clean" entries.
        self._stats: dict[str, tuple[tuple[int, ...] | None, str | None]] = {}
        self.seen = self._state()

    def _state(self) -> dict[str, str | None]:
        state = {}
        for name in NAMES:
            path = self.directory / name
            try:
                info = os.lstat(path)  # the name itself: a link the sandbox made is not followed
                identity: tuple[int, ...] | None = (
                    info.st_dev,
                    info.st_ino,
                    info.st_size,
                    info.st_mtime_ns,
                    info.st_ctime_ns,
                )
            except OSError:
                identity = None
            known = self._stats.get(name)
            settled = identity is None or time.time_ns() - identity[4] > _RACY_NS
            if known is not None and known[0] == identity and settled:
                state[name] = known[1]
                continue
            digest = _digest(path) if identity is not None else None
            self._stats[name] = (identity, digest)
            state[name] = digest
        return state

    def check(self) -> list[str]:
        """Names of the config files that changed since last time (now distrusted)."""
        now = self._state()
        changed = [name for name in NAMES if now[name] != self.seen[name] and now[name] is not None]
        self.seen = now
        if changed:
            self._distrust([now[name] for name in changed])
        return changed

    def _distrust(self, digests: list[str | None]) -> None:
        ledger = self.home / _LEDGER
        try:
            known = json.loads(ledger.read_text())
        except (OSError, ValueError):
            known = []
        known = [d for d in known if d not in digests] + [d for d in digests if d]
        temporary = ledger.with_name(f".{_LEDGER}.{os.getpid()}")
        with contextlib.suppress(OSError):
            ledger.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(known[-_MAX_ENTRIES:]))
            os.replace(temporary, ledger)
