"""What the kernel sets up around one subprocess sandbox before it starts, and removes after.

Runs in the KERNEL. One Launch per sandbox process: its cgroup (memory,
pids, CPU for the whole sandbox), its private chunk spool, its POSIX ACL on
the working directory (a root kernel only), the descriptors bubblewrap
reads (seccomp program, identity files, directories to bind), and the
command line that applies all of it before the worker's first instruction
(``confinement.py``). ``SubprocessSandbox`` only talks to the worker; this
module decides what the worker is allowed to be.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from capsule_kernel.keeper import keeper as keeper_module
from capsule_kernel.kernel.sandbox import confinement, held_mounts, seccomp, workdir_acl
from capsule_kernel.kernel.sandbox.cgroups import SandboxCgroup
from capsule_kernel.protocol.limits import format_size

if TYPE_CHECKING:
    from capsule_kernel.kernel.settings import SandboxSettings
    from capsule_kernel.protocol.limits import Limits


class SandboxRequest(Protocol):
    """What a launch reads of the sandbox it is for (SubprocessSandbox has it): no import back up."""

    sandbox_settings: SandboxSettings
    limits: Limits
    environ: Mapping[str, str]
    chunk_root: Path | None
    state_dir: Path | None
    cwd: Path
    mounts: list[dict[str, Any]]
    proxy_socket: Path | None  # the allowed-hosts proxy's socket (network = [hosts]), started before the launch
    def hidden_paths(self) -> list[Path]: ...


# CAPSULE_CONFINEMENT=off runs the worker without bubblewrap (benchmarks, and the escape
# suite's proof that its attacks succeed against an unconfined sandbox).
SWITCH_VARIABLE = "CAPSULE_CONFINEMENT"
# After the kernel dies, how long its sandbox may go on to finish its snapshots (keeper.py);
# the sandbox's supervisor gives snapshot children as long.
KEEPER_LINGER_SECONDS = 60.0


class ConfinementRequired(Exception):
    """The operator set require_confinement and this machine cannot confine a sandbox."""


@dataclass
class Launch:
    """The outside of one sandbox process."""

    argv_prefix: list[str]
    env: dict[str, str]
    fds: confinement.LaunchFds
    cwd: str = "/"
    cgroup: SandboxCgroup | None = None
    spool: Path | None = None
    spool_inside: str | None = None
    info_read: int | None = None
    copy_chunks: bool = False
    confined: bool = False
    # Started under keeper.py, which outlives the kernel for the sandbox's last snapshots.
    kept: bool = False
    enforcement: dict[str, str] = field(default_factory=dict)

    def argv(self, command: list[str], lifeline: int | None = None) -> list[str]:
        """The whole command line; with a lifeline, under the keeper (keeper.py), which holds its read end."""
        if lifeline is None or not self.kept:
            return [*self.argv_prefix, *command]
        procs = [str(path) for path in self.cgroup.procs_files()] if self.cgroup is not None else []
        keeper = [sys.executable, "-I", "-S", str(Path(keeper_module.__file__).resolve())]
        return [*keeper, str(lifeline), str(KEEPER_LINGER_SECONDS), *procs, "--", *self.argv_prefix, *command]

    def discard(self, *, keep_spool: bool = False) -> None:
        """Undo what start-up made (the process never ran, or it has been reaped).

        `keep_spool`: snapshot reports of the last moments may still be being
        adopted; the caller removes the spool a little later (remove_spool).
        """
        if self.info_read is not None:
            with contextlib.suppress(OSError):
                os.close(self.info_read)
            self.info_read = None
        if self.cgroup is not None:
            self.cgroup.kill_all()
            if self.cgroup.remove():
                self.cgroup = None
        if not keep_spool:
            self.remove_spool()

    def remove_spool(self) -> None:
        if self.spool is not None:
            shutil.rmtree(self.spool, ignore_errors=True)

    # -- building ----------------------------------------------------------------------

    @classmethod
    def plain(cls, environ: dict[str, str], cwd: str) -> Launch:
        """A trusted helper process (the Wasm host): no confinement beyond its own."""
        return cls([], dict(environ), confinement.LaunchFds(), cwd=cwd)

    @classmethod
    def for_sandbox(cls, name: str, sandbox: SandboxRequest) -> Launch:
        """Cgroup, spool, identity, mounts and bubblewrap for one subprocess sandbox."""
        settings = sandbox.sandbox_settings
        limits = sandbox.limits
        identity = confinement.sandbox_identity()
        available = confinement.availability(identity.uid, identity.gid, identity.switch)
        if sandbox.environ.get(SWITCH_VARIABLE, "").lower() in ("off", "0", "false", "no"):
            # The operator's choice alone (an environment variable of the kernel, which no cell can set).
            reason = f"switched off by the operator ({SWITCH_VARIABLE}=off)"
            available = confinement.Availability(available.bwrap, reason)
        if not available.confined and settings.require_confinement:
            raise ConfinementRequired(f"cells are refused: require_confinement = true, and {available.problem}")
        enforcement: dict[str, str] = {}
        cgroup, cgroup_note = SandboxCgroup.create(name)
        if cgroup is None:
            enforcement["memory"] = f"per process only: RLIMIT_AS ({cgroup_note})"
            enforcement["procs"] = (
                f"per user only: RLIMIT_NPROC counts every process of uid {identity.uid} ({cgroup_note})"
            )
            enforcement["cgroup"] = f"not enforced: {cgroup_note}"
        else:
            enforcement["memory"] = memory_enforcement(cgroup, limits.memory)
            enforcement["procs"] = cgroup.set_pids(limits.procs)
            enforcement["cgroup"] = f"enforced: {cgroup_note}, created by the kernel, not visible inside"
        spool = _make_spool(sandbox.chunk_root, name, identity)
        state = _own_directory(sandbox.state_dir, identity)
        workdir = Path(sandbox.cwd).resolve()
        access = settings.workdir
        if workdir == Path("/"):
            access, enforcement["workdir"] = "none", "not shown: the working directory is / (the whole host)"
        environment = confinement.sandbox_environment(sandbox.environ, dict(settings.env), settings.pass_env)
        hosts = limits.allowed_hosts
        if hosts is not None and sandbox.proxy_socket is not None:
            environment.update(confinement.proxy_environment())
        if not available.confined:
            # Said plainly at start and in %capsule status; the limits still hold.
            enforcement["confinement"] = f"not a security boundary here: {available.problem}"
            enforcement["network"] = (
                "allowed (network = on)"
                if limits.network is True
                else "not enforced: the sandbox is not confined here, so it shares the host's network"
            )
            enforcement["files"] = "enforced: RLIMIT_NOFILE per process, set before the worker starts"
            procs = tuple(cgroup.procs_files()) if cgroup else ()
            env = dict(environment, HOME=str(Path.home()))
            env.update(confinement.rlimit_environment(limits.files, limits.memory, None if cgroup else limits.procs))
            launch = cls(
                confinement.launch_prefix(procs), env, confinement.LaunchFds(), cgroup=cgroup, spool=spool, kept=True
            )
            launch.spool_inside = str(spool) if spool else None
            launch.cwd = str(workdir)
            launch.enforcement = enforcement
            return launch
        if access == "rw" and identity.switch:
            enforcement["workdir"] = f"{workdir}: " + workdir_acl.grant(workdir, identity.uid)
        program = seccomp.program()
        # Each mount comes with the descriptor the kernel held since it checked it (held_mounts.py):
        # the path is not resolved again here, where a sandbox may have changed what it names.
        mounts = tuple(
            confinement.Bind(Path(str(m["path"])), bool(m.get("writable")), m.get("fd")) for m in sandbox.mounts
        )
        hidden = confinement.hidden_paths(Path(os.environ.get("HOME") or Path.home()), sandbox.hidden_paths())
        policy = confinement.Policy(
            workdir=workdir,
            identity=identity,
            environment=environment,
            workdir_access=access,
            mounts=mounts,
            network=limits.network is True,
            proxy_socket=sandbox.proxy_socket if hosts is not None else None,
            disk=limits.disk,
            memory=limits.memory,
            files=limits.files,
            procs_rlimit=limits.procs if cgroup is None else None,
            spool=spool,
            state=state,
            cgroup_procs=tuple(cgroup.procs_files()) if cgroup else (),
            python_paths=confinement.trusted_python_paths(),
            hidden=hidden,
        )
        if not program.available:
            policy.notes["seccomp"] = program.problem or "no filter"
        if access == "rw" and any(workdir == p or workdir.is_relative_to(p) for p in policy.python_paths):
            enforcement["workdir"] = (
                f"{workdir}: read-only, because it holds code the kernel imports (a trusted import path)"
            )
        if identity.switch:
            for mount in mounts:  # like the working directory: an ACL entry lets the sandbox's uid in
                # Through the held descriptor: the ACL lands on the directory that was checked.
                target = Path(held_mounts.fd_path(mount.fd)) if mount.fd is not None else mount.path
                workdir_acl.grant(target, identity.uid, writable=mount.writable)
            # bubblewrap binds as the sandbox's uid: let it walk to what it binds.
            own = [place for place in (spool, state) if place is not None]
            for place in [*policy.python_paths, *(m.path for m in mounts), workdir, *own]:
                workdir_acl.ensure_passage(place, identity.uid)
        fds = confinement.LaunchFds()
        info_read, fds.info = os.pipe()
        if program.bpf is not None:
            fds.seccomp = confinement.data_pipe(program.bpf)
        fds.passwd, fds.group = confinement.identity_pipes(identity)
        fds.open_binds(policy)
        assert available.bwrap is not None
        argv = confinement.launch_command(policy, [], fds, available.bwrap)
        launch = cls(
            argv,
            confinement.launch_environment(policy),
            fds,
            cgroup=cgroup,
            spool=spool,
            spool_inside=str(confinement.SANDBOX_SPOOL) if spool else None,
            info_read=info_read,
            copy_chunks=identity.shares_kernel_uid,
            confined=True,
            kept=True,
        )
        enforcement.update(confinement.describe(policy, available, program.denied))
        enforcement["network"] = _network_enforcement(limits)
        enforcement["files"] = "enforced: RLIMIT_NOFILE per process, set before the worker starts"
        if limits.disk is not None:
            enforcement["disk"] = f"enforced: {format_size(limits.disk)} in each of /tmp, /dev/shm and HOME (tmpfs)"
        launch.enforcement = enforcement
        return launch


def memory_enforcement(cgroup: SandboxCgroup, limit: int | None) -> str:
    """Set the whole sandbox's memory limit; the words for %capsule limits (RLIMIT_AS stays per process)."""
    return cgroup.set_memory(limit) + " (and RLIMIT_AS per process)"


def _own_directory(path: Path | None, identity: confinement.Identity) -> Path | None:
    """A directory that belongs to the sandbox's uid (made if missing)."""
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)
        if identity.switch:
            os.chown(path, identity.uid, identity.gid)
    except OSError:
        return None
    return path


def _make_spool(chunk_root: Path | None, name: str, identity: confinement.Identity) -> Path | None:
    """The sandbox's private directory for new chunks, beside the store (same filesystem)."""
    if chunk_root is None:
        return None
    # Spools that dead kernels left are adopted and removed by checkpoint/adoption.py, which
    # knows whether their keeper still lets a last snapshot finish (never swept from here).
    spool = chunk_root.parent / "spool" / name
    spool.mkdir(parents=True, exist_ok=True)
    spool.chmod(0o700)
    if identity.switch:
        os.chown(spool, identity.uid, identity.gid)
    return spool



def _network_enforcement(limits: Limits) -> str:
    """What %capsule status says of the network of a confined sandbox."""
    hosts = limits.allowed_hosts
    if hosts is not None:
        return (
            "enforced: a private network namespace; only " + ", ".join(hosts) + " through the kernel's proxy "
            "(HTTP and HTTPS; %capsule network lists each request)"
        )
    if limits.network is True:
        return "allowed (network = on): the host's network"
    return "enforced: a private network namespace with only loopback"
