"""``python -m capsule_kernel -f CONNECTION_FILE`` starts the kernel.

IPKernelApp parses the command line, so ``-f FILE`` and ``--f=FILE`` (the form
VS Code passes) both work, and it sets up the sockets, heartbeat and iopub.
"""

from __future__ import annotations


def main() -> None:
    from ipykernel.kernelapp import IPKernelApp

    from capsule_kernel.kernel import CapsuleKernel

    IPKernelApp.launch_instance(kernel_class=CapsuleKernel)


if __name__ == "__main__":
    main()
