"""Host-side observers for the escape suite: what a cell must not have touched."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from tests.harness import wait_until

CGROUP_ROOT = Path("/sys/fs/cgroup")


def kernel_pid(kernel) -> int:
    return kernel.km.provisioner.process.pid


def sandbox_cgroups(kernel, controller: str) -> list[Path]:
    """The cgroup directories the kernel made for its sandboxes (v1 layout, then v2)."""
    pid = kernel_pid(kernel)
    for root in (CGROUP_ROOT / controller / "capsule", CGROUP_ROOT / "capsule"):
        found = sorted(root.glob(f"capsule-{pid}-*"))
        if found:
            return found
    return []


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def processes_with(fragment: str) -> list[int]:
    """Host pids whose command line contains fragment."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmdline:
            found.append(int(entry.name))
    return found


def status_field(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise KeyError(field)


class Sentinel:
    """A host process of the kernel's own user that no cell may kill or trace."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(60)"])

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive_and_untraced(self) -> bool:
        return self.process.poll() is None and status_field(self.pid, "TracerPid") == "0"

    def stop(self) -> None:
        self.process.kill()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass  # traced by a sandbox that got through: reaped once the kernel's teardown ends the tracer


def wait_gone(fragment: str, timeout: float = 15.0) -> list[int]:
    """Poll until no host process mentions fragment; return what is left at the deadline."""
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not processes_with(fragment), timeout=timeout, what=f"no process with {fragment!r}")
    return processes_with(fragment)


def owned_by_root_kernel() -> bool:
    return os.getuid() == 0
