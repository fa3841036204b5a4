"""The ``capsule-kernel`` command: install, uninstall, version.

``capsule-kernel install`` writes the kernelspec (kernel.json and logos) so
JupyterLab, VS Code, nbclient and papermill offer "Capsule (sandboxed Python)".
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from capsule_kernel import __version__

KERNEL_NAME = "capsule"
DISPLAY_NAME = "Capsule (sandboxed Python)"


def kernelspec_source() -> Path:
    """The kernelspec/ folder: packaged in a wheel, at the repo root in a checkout."""
    packaged = Path(__file__).resolve().parents[1] / "kernelspec"
    if (packaged / "kernel.json").is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "kernelspec"


def build_kernelspec(target: Path, display_name: str, python: str, env: dict[str, str] | None = None) -> None:
    """Copy the logos and write kernel.json pointing at this interpreter (and the operator's variables)."""
    source = kernelspec_source()
    spec = json.loads((source / "kernel.json").read_text())
    spec["argv"] = [python, "-P", "-m", "capsule_kernel", "-f", "{connection_file}"]
    spec["display_name"] = display_name
    if env:
        spec["env"] = dict(env)
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "kernel.json" and item.is_file():
            shutil.copy(item, target / item.name)
    (target / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")


def install(args: argparse.Namespace) -> int:
    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / args.name
        build_kernelspec(staged, args.display_name, sys.executable, dict(args.env))
        prefix = sys.prefix if args.sys_prefix else args.prefix
        dest = KernelSpecManager().install_kernel_spec(
            str(staged), kernel_name=args.name, user=args.user, prefix=prefix
        )
    print(f"Installed kernelspec {args.name!r} ({args.display_name}) in {dest}")
    return 0


def uninstall(args: argparse.Namespace) -> int:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().remove_kernel_spec(args.name)
    except (KeyError, NoSuchKernel):
        print(f"No kernelspec named {args.name!r} is installed", file=sys.stderr)
        return 1
    print(f"Removed kernelspec {args.name!r}")
    return 0


def _variable(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not name.replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name.strip(), value


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="capsule-kernel", description="The Capsule Jupyter kernel.")
    root.add_argument("--version", action="version", version=f"capsule-kernel {__version__}")
    commands = root.add_subparsers(dest="command", required=True)
    inst = commands.add_parser("install", help="install the 'capsule' kernelspec")
    where = inst.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="for the current user (~/.local/share/jupyter)")
    where.add_argument("--sys-prefix", action="store_true", help="in this Python environment (sys.prefix)")
    where.add_argument("--prefix", metavar="PATH", help="under PATH/share/jupyter/kernels")
    inst.add_argument("--name", default=KERNEL_NAME, help=f"kernelspec name (default {KERNEL_NAME})")
    inst.add_argument(
        "--display-name", default=DISPLAY_NAME, help=f"name shown in frontends (default {DISPLAY_NAME!r})"
    )
    inst.add_argument(
        "--env",
        action="append",
        default=[],
        type=_variable,
        metavar="NAME=VALUE",
        help="an operator setting for every kernel of this spec, e.g. CAPSULE_MODE=wasm (repeatable)",
    )
    inst.set_defaults(run=install)
    batch = commands.add_parser(
        "run", help="run a notebook through the capsule kernel (nbclient); --resume continues a run that died"
    )
    _batch_arguments(batch)
    rm = commands.add_parser("uninstall", help="remove the kernelspec")
    rm.add_argument("--name", default=KERNEL_NAME)
    rm.set_defaults(run=uninstall)
    return root


def _batch_arguments(sub: argparse.ArgumentParser) -> None:
    from capsule_kernel.client import batch

    batch.add_arguments(sub)
    sub.set_defaults(run=batch.run)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
