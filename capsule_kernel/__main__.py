"""``python -P -m capsule_kernel -f CONNECTION_FILE`` starts the kernel.

IPKernelApp parses the command line, so ``-f FILE`` and ``--f=FILE`` (the form
VS Code passes) both work, and it sets up the sockets, heartbeat and iopub.

Before anything else is imported, the kernel drops its working directory (the
notebook's, which the sandbox may write) from ``sys.path``, as ipykernel's
launcher does, so that a ``json.py`` planted by a cell is never imported by
the kernel; the kernelspec also passes ``-P``, which keeps Python from adding
it in the first place. And it marks itself non-dumpable: no process of the
same user may ptrace it or read its memory (the HMAC key) through /proc.
"""

from __future__ import annotations

import os
import sys


def harden() -> None:
    """Drop the working directory Python put first on the import path; forbid ptrace and /proc/<pid>/mem.

    Only the entry Python prepends (``""`` or the working directory, without
    ``-P``) goes: the same directory added later by a ``.pth`` file (an
    editable install) is the package's own, not the notebook's.
    """
    here = os.getcwd()
    if sys.path and sys.path[0] in ("", ".", here, os.path.realpath(here)):
        del sys.path[0]
    try:
        import ctypes

        _PR_SET_DUMPABLE = 4
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main() -> None:
    harden()
    from ipykernel.kernelapp import IPKernelApp

    from capsule_kernel.kernel.face import CapsuleKernel

    IPKernelApp.launch_instance(kernel_class=CapsuleKernel)


if __name__ == "__main__":
    main()
