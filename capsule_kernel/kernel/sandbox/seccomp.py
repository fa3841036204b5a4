"""The seccomp filter every subprocess sandbox runs under, built on the trusted side.

The filter is compiled to BPF once per kernel process with libseccomp
(through pyseccomp's ctypes binding) and handed to bubblewrap on a pipe
(``bwrap --seccomp FD``), which loads it just before it executes the worker:
the sandbox never installs its own filter, so it cannot leave one out.

It is a deny list on top of what the namespaces and the dropped capabilities
already forbid: the calls that inspect or change other processes (ptrace,
process_vm_*), the kernel (modules, kexec, bpf, perf events, keyrings),
mounts, and userfaultfd / io_uring, two favourite tools of kernel exploits.
A denied call fails with EPERM, as it would for an unprivileged user, so
programs that probe for a feature keep working. Calls of a foreign ABI
(32-bit x86 from a 64-bit process, x32) kill the process: libseccomp's
default for an architecture the filter does not name.
"""

from __future__ import annotations

import errno
import functools
import tempfile
from dataclasses import dataclass

DENIED_SYSCALLS = (
    # other processes
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    # mounts and namespaces
    "mount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "setns",
    "unshare",
    # the kernel itself
    "bpf",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "open_by_handle_at",
    "name_to_handle_at",
    "lookup_dcookie",
    "syslog",
    "acct",
    "quotactl",
    "swapon",
    "swapoff",
    "reboot",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "iopl",
    "ioperm",
)


@dataclass(frozen=True)
class SeccompProgram:
    """A compiled filter, or why there is none."""

    bpf: bytes | None
    denied: tuple[str, ...]
    problem: str | None = None

    @property
    def available(self) -> bool:
        return self.bpf is not None


@functools.cache
def program() -> SeccompProgram:
    """The BPF program for this machine's architecture, compiled once."""
    try:
        import pyseccomp
    except (ImportError, OSError) as err:  # pyseccomp raises OSError when libseccomp.so.2 is missing
        return SeccompProgram(None, (), f"libseccomp is not available ({err})")
    try:
        rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        denied = []
        for name in DENIED_SYSCALLS:
            try:
                rules.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
            except (ValueError, RuntimeError, OSError):
                continue  # a call this architecture or libseccomp does not know
            denied.append(name)
        with tempfile.TemporaryFile() as handle:
            rules.export_bpf(handle)
            handle.seek(0)
            return SeccompProgram(handle.read(), tuple(denied))
    except Exception as err:  # noqa: BLE001 - any libseccomp failure means: no filter, said plainly
        return SeccompProgram(None, (), f"the filter could not be built ({type(err).__name__}: {err})")
