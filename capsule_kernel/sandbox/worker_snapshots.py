"""Checkpointing INSIDE the subprocess sandbox: fork, serialize in the child.

After a successful cell the worker forks. The child, a copy-on-write image of
the namespace frozen at that instant, pickles what may have changed into the
chunk store and reports a JSON manifest; the parent answers the kernel at
once and runs the next cell while the child works (Redis saves the same
way). Only the next snapshot waits for the previous one, so the digests it
compares against are current.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from capsule_kernel.checkpoint import snapshot
from capsule_kernel.sandbox import protocol
from capsule_kernel.sandbox.worker_io import FrameChannel


class Snapshotter:
    def __init__(self, shell: Any, channel: FrameChannel, chunk_root: str | None, report_fd: int | None) -> None:
        self.shell = shell
        self.channel = channel
        # Snapshot children report to the kernel on their own pipe, so a
        # snapshot in flight still lands if this worker dies meanwhile.
        self.report_fd = report_fd
        self.root = Path(chunk_root) if chunk_root else None
        self.digests: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.ids: dict[str, int] = {}
        self._digests_known = threading.Event()
        self._digests_known.set()

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def wait(self) -> None:
        """Block until the snapshot in flight (if any) has told us its digests."""
        self._digests_known.wait()

    def forget(self) -> None:
        """The next snapshot saves every name (a new session starts full)."""
        self.wait()
        self.digests.clear()
        self.sizes.clear()
        self.ids.clear()

    def plan(self, candidates: list[str]) -> tuple[list[str], list[str], dict[str, int]] | None:
        """What the next snapshot must look at; None when nothing can have changed."""
        if self.root is None:
            return None
        self.wait()
        return snapshot.changed_names(
            self.shell.user_ns, set(self.shell.user_ns_hidden), self.ids, self.sizes, self.digests, candidates
        )

    def take(self, execution_count: int, plan: tuple[list[str], list[str], dict[str, int]]) -> None:
        """Fork; the child snapshots `plan` while this process serves on."""
        todo, removed, current = plan
        namespace = self.shell.user_ns
        previous = {name: self.digests[name] for name in todo if name in self.digests}
        read_fd, write_fd = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: the child uses none
            pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            self._child(namespace, todo, previous, write_fd, execution_count, removed)
        os.close(write_fd)
        self.channel.send({"type": "snapshot_started", "execution_count": execution_count, "pid": pid})
        self.ids = current
        self._digests_known.clear()
        threading.Thread(target=self._collect, args=(pid, read_fd), name="capsule-snapshot", daemon=True).start()

    def _child(
        self,
        namespace: dict[str, Any],
        names: list[str],
        previous: dict[str, str],
        digest_fd: int,
        execution_count: int,
        removed: list[str],
    ) -> None:
        status = 1
        digests: dict[str, Any] = {}
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            for signum in (signal.SIGUSR2, signal.SIGXCPU):
                signal.signal(signum, signal.SIG_DFL)
            # Locks of the parent's threads may be held: never print or use the channel here.
            sys.stdout = sys.stderr = io.StringIO()
            assert self.root is not None
            result = snapshot.take(namespace, names, previous, self.root)
            report = {
                "type": "snapshot",
                "execution_count": execution_count,
                "entries": result["entries"],
                "removed": removed,
                "written": result["written"],
            }
            digests = {name: [entry.get("digest"), entry.get("size", 0)] for name, entry in result["entries"].items()}
            status = 0
        except BaseException as err:  # noqa: BLE001 - report, never raise, in a forked child
            report = {
                "type": "snapshot_failed",
                "execution_count": execution_count,
                "reason": f"{type(err).__name__}: {err}",
            }
        try:
            if self.report_fd is not None:
                protocol.write_frame(self.report_fd, report)
            _write_all(digest_fd, json.dumps({"ok": status == 0, "digests": digests, "removed": removed}).encode())
            # Close before exiting: tearing down a large copy-on-write address
            # space takes a while, and the parent only needs the digests.
            os.close(digest_fd)
        finally:
            os._exit(status)

    def _collect(self, pid: int, read_fd: int) -> None:
        """Learn the new digests from the child, then reap it."""
        try:
            self._learn_digests(read_fd)
        finally:
            self._digests_known.set()
        os.waitpid(pid, 0)

    def _learn_digests(self, read_fd: int) -> None:
        chunks = []
        with os.fdopen(read_fd, "rb") as pipe:
            while block := pipe.read(1 << 20):
                chunks.append(block)
        try:
            result = json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            result = {}
        if not result.get("ok"):
            self.ids = {}  # compare everything next time
            return
        for name, (digest, size) in result["digests"].items():
            if digest:
                self.digests[name] = digest
                self.sizes[name] = size
            else:
                self.digests.pop(name, None)
        for name in result["removed"]:
            self.digests.pop(name, None)
            self.sizes.pop(name, None)

    def restore(self, entries: dict[str, Any], replace: bool) -> dict[str, Any]:
        """Load a checkpoint into the namespace; report what could not be."""
        self.wait()
        assert self.root is not None
        namespace = self.shell.user_ns
        restored, failed = [], {}
        if replace:
            for name in snapshot.saveable_names(namespace, set(self.shell.user_ns_hidden)):
                if name not in entries:
                    del namespace[name]
        for name, entry in entries.items():
            try:
                namespace[name] = snapshot.load(entry, self.root)
            except Exception as err:  # noqa: BLE001 - one bad value must not stop the others
                failed[name] = f"{type(err).__name__}: {err}"
                namespace.pop(name, None)
                continue
            restored.append(name)
        digests = {name: entry["digest"] for name, entry in entries.items() if "digest" in entry and name in restored}
        sizes = {name: entry.get("size", 0) for name, entry in entries.items() if name in restored}
        ids = {name: id(namespace[name]) for name in restored}
        if replace:
            self.digests, self.sizes, self.ids = digests, sizes, ids
        else:  # names merged in from elsewhere: what was known of the others still holds
            self.digests.update(digests)
            self.sizes.update(sizes)
            self.ids.update(ids)
        return {"restored": sorted(restored), "failed": failed}


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
