"""%capsule tasks and %capsule task wait|cancel: the session's tasks as the user sees them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from capsule_kernel.kernel.magics.parser import MagicUsageError
from capsule_kernel.kernel.magics.views import Bundle, table

if TYPE_CHECKING:
    from capsule_kernel.kernel.magics.context import MagicContext


async def cmd_tasks(ctx: MagicContext, args: Any) -> list[Bundle]:  # noqa: ARG001
    headers, rows = ctx.tasks.table()
    if not rows:
        return [{"text/plain": f"Session {ctx.session_name} has no tasks yet (%%capsule task NAME runs one)."}]
    notes = []
    if any(row[2] == "interrupted" for row in rows):
        notes.append("interrupted: the kernel that ran it is gone; re-run its cell or %capsule resume")
    return [table(f"Tasks of session {ctx.session_name}", headers, rows, notes)]


async def cmd_task(ctx: MagicContext, args: Any) -> list[Bundle]:
    """`task wait [NAME...]` and `task cancel NAME` (a task itself needs a cell body: %%capsule task NAME)."""
    from capsule_kernel.kernel.tasks import envelope as task_envelope
    from capsule_kernel.kernel.tasks.spec import TaskRefused

    try:
        if args.name == "wait":
            return [task_envelope.bundle(envelope) for envelope in await ctx.tasks.wait(list(args.names))]
        if args.name == "cancel":
            if len(args.names) != 1:
                raise MagicUsageError("%capsule task cancel NAME: name one task")
            stopped = await ctx.tasks.cancel(args.names[0])
            word = "cancelled" if stopped else "had already ended"
            return [{"text/plain": f"task {args.names[0]} {word}"}]
    except TaskRefused as err:
        raise MagicUsageError(f"%capsule task {args.name}: {err}") from None
    raise MagicUsageError(f"%capsule task {args.name}: a task needs a body: write %%capsule task {args.name} "
                          "as the first line of a cell, then its code")  # fmt: skip
