"""Parsing ``%capsule`` lines: argparse that never exits and errors in one line."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable

from capsule_kernel.protocol.limits import LIMIT_NAMES


class MagicUsageError(Exception):
    """Wrong arguments: a one-line message; nothing was changed."""


class MagicHelp(Exception):
    """--help was asked for; the text is the help to show."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise MagicUsageError(f"{self.prog}: {message} (see {self.prog} --help)")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]  # noqa: ARG002
        raise MagicUsageError(message or f"{self.prog}: invalid arguments")

    def print_help(self, file=None) -> None:  # noqa: ANN001, ARG002
        raise MagicHelp(self.format_help())


SUBCOMMANDS = {
    "status": "sandbox kind, pid, uptime, limits in force, memory in use, cells run",
    "limits": "show the limits in force and where each came from, or change them",
    "log": "checkpoints of this session: cell, id, names changed, size, time, unsaved names",
    "restore": "make the namespace exactly what it was after a cell (N, or a checkpoint id prefix)",
    "diff": "names added, removed and changed between two checkpoints",
    "resume": "restore this session's latest checkpoint, or REF (after the kernel itself died); counts go on from it",
    "session": "show or set the session this notebook's checkpoints belong to",
    "gc": "drop checkpoints beyond the retention limit and chunks nothing refers to; report what was freed",
    "restart": "start a fresh sandbox with an empty namespace",
    "mode": "show or set where cells run: subprocess, wasm, or auto (the analyzer decides per cell)",
    "mount": "show the host paths Wasm cells may use, or add one (read-only unless --rw)",
    "task": "%%capsule task NAME [options] + a body: run it as an isolated, limited, retried task; "
    "task wait [NAME...], task cancel NAME",
    "tasks": "this session's tasks: name, id, state, attempts, duration, sandbox, fuel, peak memory",
    "network": "the network setting, and what the allowed-hosts proxy allowed and refused, request by request",
    "help": "this list",
}

_LIMIT_HELP = {
    "memory": "memory of the whole sandbox (cgroup) and of each process (RLIMIT_AS), e.g. 512MB, 1GiB, unlimited",
    "cpu": "CPU time per cell, e.g. 500ms, 30s, 5m, unlimited",
    "timeout": "wall-clock time per cell, e.g. 30s, 5m, 1h, unlimited",
    "files": "open file descriptors, e.g. 256",
    "procs": "processes and threads, e.g. 64",
    "network": "on, off, or allowed hosts: pypi.org,*.example.com (narrows only; applies after %capsule restart)",
    "disk": "size of each private tmpfs: /tmp, /dev/shm, HOME (applies after %capsule restart), e.g. 1GiB",
    "fuel": "Wasm instructions per cell (Wasm cells only), e.g. 5G, 2.5e9, unlimited",
}


def _status_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--last-crash", dest="last_crash", action="store_true",
                     help="the whole native dump of the last sandbox crash")  # fmt: skip


def _log_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("-n", type=int, default=20, metavar="N", help="show the last N checkpoints (default 20)")


def _restore_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("ref", metavar="N", help="an execution count as %%capsule log shows it, or a checkpoint id prefix")


def _session_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("name", nargs="?", metavar="NAME", help="the new session name")


def _resume_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("ref", nargs="?", metavar="REF", help="an execution count or checkpoint id prefix")


def _diff_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("a", metavar="A", help="earlier checkpoint (execution count or id prefix)")
    sub.add_argument("b", metavar="B", help="later checkpoint (execution count or id prefix)")


def _mode_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("mode", nargs="?", choices=("subprocess", "wasm", "auto"), help="the routing mode")


def _mount_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("path", nargs="?", metavar="PATH", help="a host directory")
    sub.add_argument("--rw", action="store_true", help="let Wasm cells write there too")
    sub.add_argument("--remove", action="store_true", help="take PATH away again")


def _limits_arguments(sub: argparse.ArgumentParser) -> None:
    for limit in LIMIT_NAMES:
        sub.add_argument(f"--{limit}", metavar="VALUE", help=_LIMIT_HELP[limit].replace("%", "%%"))


def build_parser() -> _Parser:
    parser = _Parser(
        prog="%capsule",
        description="Capsule kernel controls.",
        add_help=True,
        exit_on_error=False,
    )
    commands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=_Parser)
    for name, text in SUBCOMMANDS.items():
        escaped = text.replace("%", "%%")  # argparse %-formats help strings
        sub = commands.add_parser(name, help=escaped, description=escaped, exit_on_error=False)
        add_arguments = _ARGUMENTS.get(name)
        if add_arguments is not None:
            add_arguments(sub)
    return parser


def _task_arguments(sub: argparse.ArgumentParser) -> None:
    """The options of %%capsule task (the vocabulary of [tasks] and of @task)."""
    sub.add_argument("name", metavar="NAME", help="the task's name: its result is bound to it (or: wait, cancel)")
    sub.add_argument("names", nargs="*", metavar="NAME", help="for wait and cancel: which tasks")
    sub.add_argument("--sandbox", choices=("wasm", "subprocess"), help="where it runs (default: Wasm if it can)")
    sub.add_argument("--timeout", metavar="DURATION", help="wall-clock limit of each attempt, e.g. 30s")
    sub.add_argument("--memory", metavar="SIZE", help="memory of its sandbox, e.g. 512MB")
    sub.add_argument("--cpu", metavar="DURATION", help="CPU time of each attempt (subprocess sandbox), e.g. 10s")
    sub.add_argument("--fuel", metavar="N", help="Wasm instructions of each attempt, e.g. 2e9")
    sub.add_argument("--compute", choices=("low", "medium", "high"), help="a fuel preset: 1e8, 2e9, 5e10")
    sub.add_argument("--retries", metavar="N", help="attempts after the first (default 0)")
    sub.add_argument("--backoff", metavar="DURATION", help="first wait before a retry, doubled each time (1s)")
    sub.add_argument(
        "--retry-on", dest="retry_on", metavar="KINDS", help="failures that are retried (crash,timeout by default)"
    )
    sub.add_argument(
        "--allowed-hosts", dest="allowed_hosts", metavar="HOSTS",
        help="only these hosts (within the operator's network), e.g. api.example.com,*.example.org",
    )  # fmt: skip
    sub.add_argument("--id", metavar="KEY", help="the task's identity (default: a hash of name, body and inputs)")
    sub.add_argument("--in", dest="inputs", metavar="A,B", help="the notebook names copied in (default: what it reads)")
    sub.add_argument("--background", action="store_true", help="return at once; a live status line shows progress")
    sub.add_argument("--mount", action="append", metavar="PATH[:rw]", help="a host directory for this task")
    sub.add_argument("--rerun", action="store_true", help="run it even if it succeeded before with the same key")


# Each subcommand's own arguments (the others take none).
_ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "status": _status_arguments,
    "limits": _limits_arguments,
    "log": _log_arguments,
    "restore": _restore_arguments,
    "diff": _diff_arguments,
    "resume": _resume_arguments,
    "session": _session_arguments,
    "mode": _mode_arguments,
    "mount": _mount_arguments,
    "task": _task_arguments,
    "network": _log_arguments,
}


def parse(line: str) -> argparse.Namespace:
    """Split a magic line like a shell would and parse it."""
    try:
        words = shlex.split(line)
    except ValueError as err:
        raise MagicUsageError(f"%capsule: {err}") from None
    if not words:
        raise MagicHelp(usage_text())
    try:
        return build_parser().parse_args(words)
    except argparse.ArgumentError as err:
        raise MagicUsageError(f"%capsule: {err} (see %capsule --help)") from None


def usage_text() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["Usage: %capsule SUBCOMMAND [options]   (%capsule SUBCOMMAND --help for details)", ""]
    lines += [f"  {name.ljust(width)}  {text}" for name, text in SUBCOMMANDS.items()]
    return "\n".join(lines)
