"""How a subprocess sandbox is confined: a policy turned into one command line.

Runs in the KERNEL (trusted). Nothing here runs inside the sandbox: the
worker starts already confined, so none of its code, not even its first
import, has more rights than the sandbox (architecture rule 8). The whole
confinement is data that can be printed, logged and tested::

    /bin/sh -c LAUNCH capsule-launch CGROUP.procs... --      join the cgroup, set rlimits
      setpriv --reuid U --regid G --clear-groups --          (a root kernel) an unprivileged uid
      bwrap --unshare-user --unshare-pid ... --seccomp FD --  namespaces, mounts, seccomp
        python -P -m capsule_kernel.inside.worker.worker CONFIG

bubblewrap (Flatpak's sandbox) builds the namespaces and the mount view:
own user, PID, IPC, UTS and cgroup namespaces (and network, when it is off),
no capabilities, no-new-privs, no new user namespaces inside, a seccomp
filter (``seccomp.py``), a read-only view of the system and of the Python
environment, the working directory, private size-limited /tmp, /dev/shm and
HOME, a private spool for checkpoint chunks, the declared mounts, and nothing
else: not the rest of HOME, not the Jupyter runtime directory, not the
checkpoint store. ``--die-with-parent`` plus the PID namespace mean that no
process the sandbox starts outlives it.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from capsule_kernel.protocol.limits import sandbox_uid

SANDBOX_HOME = Path("/home/capsule")
SANDBOX_SPOOL = Path("/run/capsule/spool")
# network = [hosts]: the kernel's proxy socket, inside; the relay's port on the sandbox's own loopback.
SANDBOX_PROXY_SOCKET = Path("/run/capsule/proxy.sock")
RELAY_PORT = 3128
SANDBOX_HOSTNAME = "capsule"
# Config files the kernel reads from the working directory: shown read-only
# (and, being mount points, impossible to delete) when it is writable.
POLICY_FILES = ("capsule.toml", "pyproject.toml")
# Top-level system directories shown read-only (or re-created as the symlinks they are).
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
# Files and directories of /etc that programs need; nothing else of /etc is visible.
ETC_ENTRIES = (
    "resolv.conf",
    "hosts",
    "host.conf",
    "nsswitch.conf",
    "gai.conf",
    "protocols",
    "services",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "pki",
    "localtime",
    "timezone",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "fonts",
    "mime.types",
    "matplotlibrc",
    "os-release",
    "debian_version",
    "inputrc",
    "magic",
    "mailcap",
)
# What of the kernel's environment a cell sees, unless the operator adds more.
ENV_NAMES = frozenset(
    {
        "PATH",
        "LANG",
        "LANGUAGE",
        "TERM",
        "COLORTERM",
        "TZ",
        "MPLBACKEND",
        "JPY_SESSION_NAME",
        "VIRTUAL_ENV",
        "CONDA_PREFIX",
        "CONDA_DEFAULT_ENV",
        "NO_COLOR",
        "FORCE_COLOR",
        "CLICOLOR",
        "PAGER",
        "CAPSULE_CRASH_AT",  # the operator's test hook (protocol/crash_points.py): the sandbox's steps too
    }
)
ENV_PREFIXES = ("LC_", "PYTHON", "OPENBLAS_", "OMP_", "MKL_", "NUMEXPR_", "CUDA_")
# Never passed, whatever the allowlist says: they would change how the worker itself starts.
ENV_NEVER = frozenset({"PYTHONSTARTUP", "PYTHONINSPECT", "PYTHONBREAKPOINT", "LD_PRELOAD", "LD_LIBRARY_PATH"})

# The launch script: join each cgroup given before "--", apply the rlimits,
# then become the rest of the command line. Its inputs are file paths and
# integers produced by the kernel; the sandbox has not started yet.
_LAUNCH = (
    'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; '
    '[ -n "$CAPSULE_RLIMIT_FILES" ] && { ulimit -n "$CAPSULE_RLIMIT_FILES" || exit 125; }; '
    '[ -n "$CAPSULE_RLIMIT_AS_KB" ] && { ulimit -v "$CAPSULE_RLIMIT_AS_KB" || exit 125; }; '
    '[ -n "$CAPSULE_RLIMIT_AS_SOFT_KB" ] && { ulimit -S -v "$CAPSULE_RLIMIT_AS_SOFT_KB" || exit 125; }; '
    '[ -n "$CAPSULE_RLIMIT_NPROC" ] && { ulimit -u "$CAPSULE_RLIMIT_NPROC" || exit 125; }; '
    "unset CAPSULE_RLIMIT_FILES CAPSULE_RLIMIT_AS_KB CAPSULE_RLIMIT_AS_SOFT_KB CAPSULE_RLIMIT_NPROC; "
    'exec "$@"'
)


@dataclass(frozen=True)
class Bind:
    """A host directory shown in the sandbox at the same path."""

    path: Path
    writable: bool = False
    fd: int | None = None  # the O_PATH descriptor the kernel held since it checked the mount (held_mounts.py)


@dataclass(frozen=True)
class Identity:
    """Who the sandbox is on the host."""

    uid: int
    gid: int
    switch: bool  # the kernel is root: become uid/gid (setpriv) before bwrap

    @property
    def shares_kernel_uid(self) -> bool:
        return self.uid == os.getuid()


@dataclass(frozen=True)
class Policy:
    """Everything the sandbox may see and do, decided by the kernel before it starts."""

    workdir: Path
    identity: Identity
    environment: Mapping[str, str]
    workdir_access: str = "rw"  # rw | ro | none
    mounts: tuple[Bind, ...] = ()
    network: bool = False  # the host's network (network = "on"); else a private namespace, loopback only
    # The kernel's allowed-hosts proxy socket (network = [hosts]), shown at SANDBOX_PROXY_SOCKET.
    proxy_socket: Path | None = None
    disk: int | None = None  # bytes of each private tmpfs (/tmp, /dev/shm, HOME)
    memory: int | None = None  # RLIMIT_AS of each process (the cgroup caps the whole)
    files: int | None = None
    procs_rlimit: int | None = None  # only when there is no pids cgroup
    spool: Path | None = None
    state: Path | None = None  # shown as HOME/.ipython: this notebook's IPython history
    cgroup_procs: tuple[Path, ...] = ()
    python_paths: tuple[Path, ...] = ()
    hidden: tuple[Path, ...] = ()
    notes: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Availability:
    """Whether this machine can confine a sandbox, and if not, why."""

    bwrap: str | None
    problem: str | None

    @property
    def confined(self) -> bool:
        return self.problem is None


@dataclass
class LaunchFds:
    """Descriptors bwrap reads at start (the kernel closes its copies after the spawn).

    Directories are bound from descriptors the kernel opened (``--bind-fd``):
    bubblewrap runs as the sandbox's unprivileged uid, which may not be able to
    walk the path to them (the Python of a root kernel often lives in /root).
    """

    seccomp: int | None = None
    info: int | None = None
    passwd: int | None = None
    group: int | None = None
    paths: dict[Path, int] = field(default_factory=dict)
    # bubblewrap closes a descriptor once it has bound it: later binds of the same place get a copy.
    copies: list[int] = field(default_factory=list)
    _used: set[int] = field(default_factory=set)

    def all(self) -> tuple[int, ...]:
        fixed = (self.seccomp, self.info, self.passwd, self.group)
        return (*(fd for fd in fixed if fd is not None), *self.paths.values(), *self.copies)

    def open_binds(self, policy: Policy) -> None:
        """An O_PATH descriptor for every directory the policy binds."""
        places = [*policy.python_paths, *(mount.path for mount in policy.mounts)]
        if policy.workdir_access != "none":
            places.append(policy.workdir)
        if policy.spool is not None:
            places.append(policy.spool)
        if policy.state is not None:
            places.append(policy.state)
        for mount in policy.mounts:
            if mount.fd is not None and mount.path not in self.paths:
                self.paths[mount.path] = os.dup(mount.fd)  # bubblewrap closes what it binds: a copy
        for place in places:
            if place not in self.paths:
                self.paths[place] = os.open(place, os.O_PATH)

    def bind(self, path: Path, writable: bool) -> list[str]:
        """The bwrap option showing host `path` at the same place in the sandbox."""
        fd = self.paths.get(path)
        if fd is None:
            return ["--bind" if writable else "--ro-bind", str(path), str(path)]
        if fd in self._used:
            fd = os.dup(fd)
            self.copies.append(fd)
        self._used.add(fd)
        return ["--bind-fd" if writable else "--ro-bind-fd", str(fd), str(path)]


# -- who the sandbox is ------------------------------------------------------------


def sandbox_identity(environ: Mapping[str, str] | None = None) -> Identity:
    """The sandbox's host uid/gid: never root.

    A kernel that runs as root hands the sandbox an unprivileged uid (the
    operator's CAPSULE_SANDBOX_UID, else 65533); any other kernel's sandbox
    keeps the kernel's uid, without any capability, inside its own user
    namespace.
    """
    if os.getuid() != 0:
        return Identity(os.getuid(), os.getgid(), switch=False)
    uid = sandbox_uid(environ)
    return Identity(uid, uid, switch=True)


def _identity_files(identity: Identity) -> tuple[bytes, bytes]:
    name = "capsule"
    if identity.shares_kernel_uid:
        try:
            name = pwd.getpwuid(identity.uid).pw_name
        except KeyError:
            pass
    passwd = (
        f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"{name}:x:{identity.uid}:{identity.gid}:Capsule sandbox:{SANDBOX_HOME}:/bin/sh\n"
        f"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    group = f"root:x:0:\n{name}:x:{identity.gid}:\nnogroup:x:65534:\n"
    return passwd.encode(), group.encode()


# -- what the sandbox sees -----------------------------------------------------------


def sandbox_environment(
    base: Mapping[str, str], extra: Mapping[str, str] | None = None, passed: Iterable[str] = ()
) -> dict[str, str]:
    """The allowlisted part of the kernel's environment, plus what the operator configured."""
    passed = set(passed)
    env = {
        name: value
        for name, value in base.items()
        if (name in ENV_NAMES or name.startswith(ENV_PREFIXES) or name in passed) and name not in ENV_NEVER
    }
    env.update(extra or {})
    env["HOME"] = str(SANDBOX_HOME)
    env["USER"] = env["LOGNAME"] = "capsule"
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    env["CAPSULE_SANDBOX"] = "subprocess"
    return env


@functools.cache
def trusted_python_paths() -> tuple[Path, ...]:
    """Directories the kernel, the worker and the Wasm host import from (shown read-only).

    The kernel's own sys.path (``__main__.harden`` already took away the
    working directory Python puts first), plus the interpreter's prefixes:
    nothing a sandbox can write may be on it. Computed once per kernel: its
    import path does not change after start-up.
    """
    here = {"", "."}
    candidates = [
        Path(sys.prefix),
        Path(sys.base_prefix),
        Path(sys.exec_prefix),
        Path(os.path.realpath(sys.executable)).parent.parent,
        *(Path(entry) for entry in sys.path if entry not in here),
    ]
    paths: list[Path] = []
    for candidate in candidates:
        try:
            resolved = candidate.resolve()
        except OSError:
            continue
        if resolved.exists() and resolved not in paths:
            paths.append(resolved)
    return _outermost(paths)


def _outermost(paths: Iterable[Path]) -> tuple[Path, ...]:
    """Drop every path that lies inside another one of the list."""
    ordered = sorted(set(paths), key=lambda path: len(path.parts))
    kept: list[Path] = []
    for path in ordered:
        if not any(path == other or path.is_relative_to(other) for other in kept):
            kept.append(path)
    return tuple(kept)


def hidden_paths(home: Path | None, extra: Iterable[Path]) -> tuple[Path, ...]:
    """What must stay invisible even when a bound directory contains it.

    The kernel's HOME dot-files and dot-directories (~/.ssh, ~/.bashrc,
    ~/.jupyter...), the Jupyter runtime directory (connection files hold the
    kernel's key) and the checkpoint store.
    """
    hidden = [Path(path) for path in extra]
    if home is not None and home.is_dir():
        try:
            hidden.extend(entry for entry in home.iterdir() if entry.name.startswith("."))
        except OSError:
            pass
    return tuple(dict.fromkeys(path.resolve() for path in hidden if path.exists()))


# -- can we confine here? --------------------------------------------------------------


@functools.cache
def availability(uid: int, gid: int, switch: bool) -> Availability:
    """Probe once per process: run a trivial command under the same namespaces."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return Availability(None, "bubblewrap (bwrap) is not installed (Debian: apt-get install bubblewrap)")
    command = [
        bwrap,
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-net",
        "--unshare-cgroup-try",
        "--disable-userns",
        "--die-with-parent",
        "--ro-bind",
        "/",
        "/",
        "--proc",
        "/proc",
        "true",
    ]
    if switch:
        command = [_setpriv(), f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *command]
    try:
        done = subprocess.run(command, capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return Availability(bwrap, f"bubblewrap could not run ({err})")
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()
        return Availability(bwrap, f"bubblewrap cannot create namespaces here ({why[-1] if why else done.returncode})")
    return Availability(bwrap, None)


def _setpriv() -> str:
    return shutil.which("setpriv") or "/usr/bin/setpriv"


# -- the command line ---------------------------------------------------------------------


def data_pipe(data: bytes) -> int:
    """A pipe's read end that holds `data` (small: it must fit the pipe buffer)."""
    read_fd, write_fd = os.pipe()
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(write_fd, view) :]
    finally:
        os.close(write_fd)
    return read_fd


def identity_pipes(identity: Identity) -> tuple[int, int]:
    passwd, group = _identity_files(identity)
    return data_pipe(passwd), data_pipe(group)


def bwrap_arguments(policy: Policy, fds: LaunchFds) -> list[str]:
    """The bubblewrap options for a policy, in the order bubblewrap applies them."""
    args = [
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--hostname",
        SANDBOX_HOSTNAME,
    ]
    if not policy.network:
        args.append("--unshare-net")
    if fds.info is not None:
        args += ["--info-fd", str(fds.info)]
    if fds.seccomp is not None:
        args += ["--seccomp", str(fds.seccomp)]
    # Private, size-limited scratch space first: binds below /tmp then land on top of it.
    args += ["--proc", "/proc", "--dev", "/dev"]
    size = [] if policy.disk is None else ["--size", str(policy.disk)]
    args += ["--perms", "1777", *size, "--tmpfs", "/tmp"]
    args += ["--perms", "1777", *size, "--tmpfs", "/dev/shm"]
    args += ["--perms", "0700", *size, "--tmpfs", str(SANDBOX_HOME)]
    for name in SYSTEM_DIRS:
        host = Path("/") / name
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), str(host)]
        elif host.is_dir():
            args += ["--ro-bind", str(host), str(host)]
    for name in ETC_ENTRIES:
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    if fds.passwd is not None:
        args += ["--ro-bind-data", str(fds.passwd), "/etc/passwd"]
    if fds.group is not None:
        args += ["--ro-bind-data", str(fds.group), "/etc/group"]
    for path in policy.python_paths:
        args += fds.bind(path, writable=False)
    writable = []
    for mount in policy.mounts:
        args += fds.bind(mount.path, mount.writable)
        writable += [mount.path] if mount.writable else []
    bound = [mount.path for mount in policy.mounts]
    if policy.workdir_access in ("rw", "ro"):
        rw = policy.workdir_access == "rw"
        args += fds.bind(policy.workdir, rw)
        bound.append(policy.workdir)
        writable += [policy.workdir] if rw else []
    # What a bound directory must not reveal: an empty directory (or /dev/null) over it.
    for secret in policy.hidden:
        if any(secret == path or secret.is_relative_to(path) for path in bound):
            if secret.is_dir():
                args += ["--tmpfs", str(secret)]
            else:
                args += ["--ro-bind", "/dev/null", str(secret)]
    # Policy is the operator's: the config files the kernel reads there stay as they are.
    if policy.workdir_access == "rw":
        for name in POLICY_FILES:
            config = policy.workdir / name
            if config.is_file() and not config.is_symlink():
                args += ["--ro-bind", str(config), str(config)]
    # Nothing the sandbox can write may be on a trusted import path: show those read-only again.
    for path in policy.python_paths:
        if any(path == place or path.is_relative_to(place) for place in writable):
            args += fds.bind(path, writable=False)
    for source, target in ((policy.spool, SANDBOX_SPOOL), (policy.state, SANDBOX_HOME / ".ipython")):
        if source is not None:
            fd = fds.paths.get(source)
            args += ["--bind", str(source)] if fd is None else ["--bind-fd", str(fd)]
            args.append(str(target))
    if policy.proxy_socket is not None:
        # The one way out of the private network namespace: the kernel's proxy (kernel/network/proxy.py).
        # By path (a descriptor of a socket cannot be bound): its directory lets anyone pass, not list,
        # and no sandbox sees the host's /tmp, where it is, except through this one bind.
        args += ["--ro-bind", str(policy.proxy_socket), str(SANDBOX_PROXY_SOCKET)]
    chdir = policy.workdir if policy.workdir_access != "none" else SANDBOX_HOME
    args += ["--chdir", str(chdir)]
    return args


def proxy_environment(port: int = RELAY_PORT) -> dict[str, str]:
    """The variables that point HTTP clients (requests, urllib, httpx, aiohttp, pip, conda, curl) at the relay."""
    url = f"http://127.0.0.1:{port}"
    names = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "PIP_PROXY")
    # No NO_PROXY: every request goes to the proxy, 127.0.0.1 too, which there names the host's
    # loopback, reached only when the operator lists it (a server a cell starts is not reached by name).
    return {name: url for name in names} | {name.lower(): url for name in names}


def launch_prefix(cgroup_procs: Iterable[Path]) -> list[str]:
    """The launch script: join the cgroups, apply the rlimits, exec what follows."""
    return ["/bin/sh", "-c", _LAUNCH, "capsule-launch", *map(str, cgroup_procs), "--"]


def launch_command(policy: Policy, command: list[str], fds: LaunchFds, bwrap: str) -> list[str]:
    """The full command line: cgroup and rlimits, then the uid, then bubblewrap, then `command`."""
    argv = launch_prefix(policy.cgroup_procs)
    if policy.identity.switch:
        identity = policy.identity
        argv += [_setpriv(), f"--reuid={identity.uid}", f"--regid={identity.gid}", "--clear-groups", "--"]
    argv += [bwrap, *bwrap_arguments(policy, fds), "--", *command]
    return argv


def rlimit_environment(
    files: int | None, memory: int | None, procs: int | None, *, memory_soft: bool = False
) -> dict[str, str]:
    """The launch script's inputs for the per-process limits (it unsets them before bwrap).

    `memory_soft`: a cgroup caps the whole sandbox, so RLIMIT_AS is only the
    soft limit that turns one process's huge allocation into a MemoryError
    (the worker moves it when %capsule limits changes the memory limit).
    """
    env = {}
    if files is not None:
        env["CAPSULE_RLIMIT_FILES"] = str(int(files))
    if memory is not None:
        key = "CAPSULE_RLIMIT_AS_SOFT_KB" if memory_soft else "CAPSULE_RLIMIT_AS_KB"
        env[key] = str(max(1, int(memory) // 1024))
    if procs is not None:
        env["CAPSULE_RLIMIT_NPROC"] = str(int(procs))
    return env


def launch_environment(policy: Policy) -> dict[str, str]:
    """The sandbox's environment plus the launch script's rlimit inputs."""
    soft = bool(policy.cgroup_procs)
    return {
        **policy.environment,
        **rlimit_environment(policy.files, policy.memory, policy.procs_rlimit, memory_soft=soft),
    }


def describe(policy: Policy, availability: Availability, seccomp_denied: tuple[str, ...]) -> dict[str, str]:
    """Each measure and whether it holds, for %capsule status and the start-up note."""
    if not availability.confined:
        return {"confinement": f"not a security boundary here: {availability.problem}"}
    who = policy.identity
    user = (
        f"enforced: uid {who.uid} (unprivileged; the kernel runs as root)"
        if who.switch
        else f"enforced: uid {who.uid} without capabilities in its own user namespace"
    )
    report = {
        "confinement": "enforced: bubblewrap, applied before the worker's first instruction",
        "user": user,
        "namespaces": "enforced: user, pid, ipc, uts, cgroup" + ("" if policy.network else ", net"),
        "capabilities": "enforced: none (no-new-privs; no new user namespaces inside)",
        "seccomp": (
            f"enforced: {len(seccomp_denied)} system calls denied ({', '.join(seccomp_denied[:6])}, ...)"
            if seccomp_denied
            else "not enforced: " + policy.notes.get("seccomp", "no filter")
        ),
        "filesystem": (
            "enforced: system and Python environment read-only; "
            f"working directory {policy.workdir_access}; private /tmp, /dev/shm and HOME; "
            "no HOME dot-files, Jupyter runtime directory or checkpoint store"
        ),
        "mounts": ", ".join(f"{m.path} ({'rw' if m.writable else 'ro'})" for m in policy.mounts) or "none",
        "environment": f"enforced: cleared; {len(policy.environment)} allowlisted variables",
    }
    report.update(policy.notes)
    return report
