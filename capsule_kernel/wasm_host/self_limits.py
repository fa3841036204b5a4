"""The Wasm host limiting itself: defence in depth for a trusted process.

Runs in the Wasm HOST, first thing at start-up. The host runs no cell code
outside Wasm (the guest is confined by wasmtime: no sockets, threads or host
files but the mounts); still it gives up its network, its capabilities and
raises no rlimit, so a wasmtime bug would cost less. This is not the
subprocess sandbox's confinement: that one is applied from outside, before
the worker starts (``confinement.py``, ``launch.py``). Every measure reports
whether it took effect (architecture rule 7).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import resource
import signal
import socket
import struct
from typing import Any

_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_CAP_SYS_ADMIN = 21
_CAP_SYS_RESOURCE = 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SIOCSIFFLAGS = 0x8914
_IFF_UP_LOOPBACK_RUNNING = 0x1 | 0x8 | 0x40

_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def die_with_parent(parent_pid: int) -> None:
    """Ask the OS to kill us when the kernel dies, even by kill -9."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        # The kernel died before the request took effect.
        os._exit(1)


def _bring_up_loopback() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", _IFF_UP_LOOPBACK_RUNNING))


def isolate_network() -> tuple[bool, str]:
    """A fresh network namespace: only a private loopback, no route out."""
    try:
        os.unshare(os.CLONE_NEWNET)
    except (OSError, AttributeError):
        try:
            uid, gid = os.getuid(), os.getgid()
            os.unshare(os.CLONE_NEWUSER | os.CLONE_NEWNET)
            with open("/proc/self/setgroups", "w") as handle:
                handle.write("deny")
            with open("/proc/self/uid_map", "w") as handle:
                handle.write(f"{uid} {uid} 1")
            with open("/proc/self/gid_map", "w") as handle:
                handle.write(f"{gid} {gid} 1")
        except (OSError, AttributeError) as err:
            return False, f"not enforced: no network namespace available ({err.strerror or err})"
    try:
        _bring_up_loopback()
    except OSError:
        return True, "enforced: new network namespace (loopback down)"
    return True, "enforced: new network namespace with a private loopback"


def _set_rlimit(which: int, value: int | None) -> None:
    if value is None:
        # "Unlimited" means as much as the kernel itself may have.
        value = resource.getrlimit(which)[1]
    resource.setrlimit(which, (value, value))


def apply_rlimits(limits: dict[str, Any]) -> dict[str, str]:
    """Set address-space, open-file and process limits; report each."""
    report = {}
    for name, which in (("memory", resource.RLIMIT_AS), ("files", resource.RLIMIT_NOFILE)):
        try:
            _set_rlimit(which, limits.get(name))
            report[name] = "enforced: " + ("RLIMIT_AS" if name == "memory" else "RLIMIT_NOFILE")
        except (OSError, ValueError) as err:
            report[name] = f"not enforced: {err}"
    try:
        _set_rlimit(resource.RLIMIT_NPROC, limits.get("procs"))
        if os.geteuid() == 0:
            report["procs"] = "not enforced by RLIMIT_NPROC: the OS exempts root"
        else:
            report["procs"] = "enforced: RLIMIT_NPROC (counts every process of this user)"
    except (OSError, ValueError) as err:
        report["procs"] = f"not enforced: {err}"
    return report


def drop_privileges() -> str:
    """Give up the capabilities that would let user code lift its own limits.

    Without CAP_SYS_RESOURCE a process cannot raise a hard rlimit; without
    CAP_SYS_ADMIN it cannot leave its network namespace. No-new-privs stops a
    setuid binary from handing them back.
    """
    _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if os.geteuid() != 0:
        return "unprivileged user"
    for cap in (_CAP_SYS_ADMIN, _CAP_SYS_RESOURCE):
        _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        return "root: could not read capabilities"
    for cap in (_CAP_SYS_ADMIN, _CAP_SYS_RESOURCE):
        mask = ~(1 << (cap % 32)) & 0xFFFFFFFF
        entry = data[cap // 32]
        entry.effective &= mask
        entry.permitted &= mask
        entry.inheritable &= mask
    if _libc.capset(ctypes.byref(header), data) != 0:
        return "root: could not drop CAP_SYS_ADMIN / CAP_SYS_RESOURCE"
    return "root without CAP_SYS_ADMIN and CAP_SYS_RESOURCE"
