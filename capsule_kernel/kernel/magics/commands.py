"""The ``%capsule`` subcommands' table and its dispatch, run by the kernel (never the sandbox).

The commands live by topic: sandbox_cmds.py (limits, status, mode, mount),
checkpoint_cmds.py (log, diff, restore, resume, gc, session, restart),
task_cmds.py (tasks, task); views.py is how they show things.

Each command takes the session (magics/context.py: a narrow interface) and
returns mime bundles to show; a bad argument, or a change the operator's
policy does not allow, raises MagicUsageError before anything changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from capsule_kernel.kernel.checkpoint.rows import CheckpointRefused
from capsule_kernel.kernel.magics.checkpoint_cmds import (
    cmd_diff,
    cmd_gc,
    cmd_log,
    cmd_restart,
    cmd_restore,
    cmd_resume,
    cmd_session,
)
from capsule_kernel.kernel.magics.network_cmds import cmd_network
from capsule_kernel.kernel.magics.parser import MagicHelp, MagicUsageError, parse, usage_text
from capsule_kernel.kernel.magics.sandbox_cmds import cmd_limits, cmd_mode, cmd_mount, cmd_status
from capsule_kernel.kernel.magics.task_cmds import cmd_task, cmd_tasks
from capsule_kernel.kernel.magics.views import Bundle

if TYPE_CHECKING:
    from capsule_kernel.kernel.magics.context import MagicContext


def cmd_help(ctx: MagicContext, args: Any) -> list[Bundle]:  # noqa: ARG001
    return [{"text/plain": usage_text()}]


COMMANDS = {
    "mode": cmd_mode,
    "mount": cmd_mount,
    "limits": cmd_limits,
    "status": cmd_status,
    "log": cmd_log,
    "restore": cmd_restore,
    "diff": cmd_diff,
    "resume": cmd_resume,
    "gc": cmd_gc,
    "session": cmd_session,
    "restart": cmd_restart,
    "task": cmd_task,
    "tasks": cmd_tasks,
    "network": cmd_network,
    "help": cmd_help,
}


async def run(ctx: MagicContext, line: str) -> list[Bundle]:
    """Run one %capsule line the kernel read from a cell's source; MagicUsageError for bad arguments."""
    try:
        args = parse(line)
    except MagicHelp as help_text:
        return [{"text/plain": str(help_text)}]
    return await run_parsed(ctx, args)


async def run_parsed(ctx: MagicContext, args: Any) -> list[Bundle]:
    """Run a line the kernel has parsed (magics/authority.py decides which may run)."""
    if args.command is None:
        return [{"text/plain": usage_text()}]
    try:
        result = COMMANDS[args.command](ctx, args)
        if hasattr(result, "__await__"):
            result = await result
    except CheckpointRefused as err:
        raise MagicUsageError(f"%capsule {args.command}: {err}") from None
    return result
