"""One cgroup per sandbox, created and owned by the kernel: memory, pids and CPU.

RLIMIT_AS and RLIMIT_NPROC are per process (four forked children hold four
times the memory limit) or per user (and do not bind root), so the limits
that must hold for the whole sandbox live in a cgroup the kernel creates
before the sandbox starts. The sandbox joins it before its first instruction
(the launch script in ``confinement.py`` writes its own pid into
``cgroup.procs`` and then executes bubblewrap), cannot see it (no /sys in the
sandbox, its own cgroup namespace) and could not write it anyway (the files
belong to the kernel's user).

cgroup v1 (one hierarchy per controller, as on this project's CI machines)
and v2 (one unified hierarchy) are both handled; a controller the kernel
cannot write is reported as not enforced, never pretended.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from capsule_kernel.protocol.deaths import process_exists

ROOT = Path("/sys/fs/cgroup")
# Parent of every sandbox's cgroup, so that they are easy to find and clean up.
PARENT = "capsule"
CONTROLLERS = ("memory", "pids", "cpu")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _v2_root() -> Path | None:
    """The unified hierarchy, where the controllers we need are available."""
    for candidate in (ROOT, ROOT / "unified"):
        available = _read(candidate / "cgroup.controllers").split()
        if available and all(name in available for name in CONTROLLERS):
            return candidate
    return None


@dataclass
class SandboxCgroup:
    """The cgroup directories of one sandbox (one per v1 controller, or one v2 directory)."""

    version: int
    dirs: dict[str, Path]  # controller -> directory ("memory", "pids", "cpu"/"cpuacct")
    notes: dict[str, str] = field(default_factory=dict)

    # -- creation ---------------------------------------------------------------

    @classmethod
    def create(cls, name: str) -> tuple[SandboxCgroup | None, str]:
        """Make the cgroup; return it (or None) and a sentence for %capsule status."""
        sweep()
        v1 = {controller: ROOT / controller for controller in ("memory", "pids", "cpuacct")}
        if all((path / "cgroup.procs").exists() for path in v1.values()):
            return cls._create_v1(name, v1)
        root = _v2_root()
        if root is not None:
            return cls._create_v2(name, root)
        return None, "no cgroup hierarchy with the memory, pids and cpu controllers is mounted"

    @classmethod
    def _create_v1(cls, name: str, roots: dict[str, Path]) -> tuple[SandboxCgroup | None, str]:
        dirs = {}
        try:
            for controller, root in roots.items():
                path = root / PARENT / name
                path.mkdir(parents=True, exist_ok=True)
                dirs[controller] = path
        except OSError as err:
            group = cls(1, dirs)
            group.remove()
            return None, f"cannot create a cgroup under {ROOT} (v1): {err.strerror or err}"
        group = cls(1, dirs)
        # Tmpfs pages and swap count too: memsw holds memory + swap where swap accounting is on.
        return group, "cgroup v1 (memory, pids, cpuacct)"

    @classmethod
    def _create_v2(cls, name: str, root: Path) -> tuple[SandboxCgroup | None, str]:
        parent = root / PARENT
        try:
            parent.mkdir(exist_ok=True)
            wanted = " ".join(f"+{controller}" for controller in CONTROLLERS)
            with contextlib.suppress(OSError):
                (root / "cgroup.subtree_control").write_text(wanted)
            (parent / "cgroup.subtree_control").write_text(wanted)
            path = parent / name
            path.mkdir(exist_ok=True)
        except OSError as err:
            return None, f"cannot create a cgroup under {root} (v2): {err.strerror or err}"
        return cls(2, dict.fromkeys(("memory", "pids", "cpuacct"), path)), "cgroup v2 (memory, pids, cpu)"

    # -- limits -------------------------------------------------------------------

    def procs_files(self) -> list[Path]:
        """Where the launch script writes its pid: one file per hierarchy."""
        return sorted({path / "cgroup.procs" for path in self.dirs.values()})

    def set_memory(self, limit: int | None) -> str:
        """The memory of every process in the sandbox together, tmpfs pages included."""
        path = self.dirs["memory"]
        try:
            if self.version == 1:
                value = "-1" if limit is None else str(limit)
                memsw = path / "memory.memsw.limit_in_bytes"
                if limit is not None and memsw.exists():
                    # Raise the plain limit first when the combined one must not fall below it.
                    (path / "memory.limit_in_bytes").write_text(value)
                    memsw.write_text(value)
                else:
                    if memsw.exists():
                        memsw.write_text(value)
                    (path / "memory.limit_in_bytes").write_text(value)
                swap = "memory and swap" if memsw.exists() else "memory (swap not accounted here)"
            else:
                (path / "memory.max").write_text("max" if limit is None else str(limit))
                with contextlib.suppress(OSError):
                    (path / "memory.swap.max").write_text("0" if limit is not None else "max")
                swap = "memory, swap off"
        except OSError as err:
            return f"not enforced: cannot write the memory cgroup ({err.strerror or err})"
        return f"enforced: cgroup v{self.version} {swap} of the whole sandbox"

    def set_pids(self, limit: int | None) -> str:
        try:
            (self.dirs["pids"] / "pids.max").write_text("max" if limit is None else str(limit))
        except OSError as err:
            return f"not enforced: cannot write the pids cgroup ({err.strerror or err})"
        return f"enforced: cgroup v{self.version} pids of the whole sandbox"

    # -- readings -------------------------------------------------------------------

    def cpu_seconds(self) -> float | None:
        """CPU time used by every process of the sandbox so far (user + system)."""
        if self.version == 1:
            text = _read(self.dirs["cpuacct"] / "cpuacct.usage").strip()
            return int(text) / 1e9 if text.isdigit() else None
        for line in _read(self.dirs["cpuacct"] / "cpu.stat").splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec" and value.strip().isdigit():
                return int(value) / 1e6
        return None

    def memory_bytes(self) -> int | None:
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        text = _read(self.dirs["memory"] / name).strip()
        return int(text) if text.isdigit() else None

    def peak_memory_bytes(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        text = _read(self.dirs["memory"] / name).strip()
        return int(text) if text.isdigit() else None

    def oom_kills(self) -> int:
        """How many processes the memory limit has killed in this cgroup."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in _read(self.dirs["memory"] / name).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return 0

    def pids(self) -> list[int]:
        found = []
        for line in _read(self.dirs["pids"] / "cgroup.procs").split():
            if line.isdigit():
                found.append(int(line))
        return found

    # -- the end ----------------------------------------------------------------------

    def kill_all(self) -> None:
        """SIGKILL every process still in the cgroup (whatever it did to escape its pid namespace)."""
        if self.version == 2:
            with contextlib.suppress(OSError):
                (self.dirs["pids"] / "cgroup.kill").write_text("1")
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> bool:
        """Remove the directories; False while processes are still leaving them."""
        removed = True
        for path in set(self.dirs.values()):
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                removed = False
        return removed


def kernel_pid_of(name: str) -> int | None:
    """The pid of the kernel that named a sandbox capsule-<kernel pid>-<random> (its cgroup, spool, ledger row)."""
    parts = name.split("-")
    if len(parts) != 3 or parts[0] != "capsule" or not parts[1].isdigit():
        return None
    return int(parts[1])


def left_by_a_gone_kernel(path: Path) -> bool:
    """Whether a sandbox's cgroup or spool (named capsule-<kernel pid>-<random>) outlived its kernel."""
    pid = kernel_pid_of(path.name)
    return pid is not None and pid != os.getpid() and not process_exists(pid)


def sweep() -> None:
    """Remove the empty cgroups of kernels that are gone.

    A cgroup can only be removed once its last process has fully exited; the
    kernel retries after a sandbox ends, and whatever a killed kernel left is
    removed here, by the next kernel.
    """
    for parent in (ROOT / "memory" / PARENT, ROOT / "pids" / PARENT, ROOT / "cpuacct" / PARENT, ROOT / PARENT):
        try:
            entries = [entry for entry in parent.iterdir() if left_by_a_gone_kernel(entry)]
        except OSError:
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                entry.rmdir()
