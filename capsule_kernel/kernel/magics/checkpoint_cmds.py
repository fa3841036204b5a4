"""%capsule log, diff, restore, resume, gc, session and restart: the notebook's checkpoints and its session."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from capsule_kernel.kernel.checkpoint.rows import switched_in_by_another
from capsule_kernel.kernel.magics.parser import MagicUsageError
from capsule_kernel.kernel.magics.views import Bundle, at, find_checkpoint, table
from capsule_kernel.protocol.limits import format_duration, format_size

if TYPE_CHECKING:
    from capsule_kernel.kernel.magics.context import MagicContext


async def cmd_log(ctx: MagicContext, args: Any) -> list[Bundle]:
    store = ctx.checkpoints.store
    if store is None:
        return [{"text/plain": f"Checkpoints are off: {ctx.checkpoints.problem}"}]
    if args.n < 1:
        raise MagicUsageError("%capsule log: -n must be at least 1")
    await ctx.checkpoints_settled()
    timed_rows: list[tuple[float, list[str]]] = []
    for checkpoint in store.history(ctx.session_name, args.n):
        changed = ", ".join(checkpoint.changed[:6]) + (" ..." if len(checkpoint.changed) > 6 else "")
        unsaved = "; ".join(f"{name}: {why}" for name, why in sorted(checkpoint.unsaved.items()))
        timed_rows.append(
            (
                checkpoint.created,
                [
                    f"[{checkpoint.execution_count}]",
                    checkpoint.id[:8],
                    checkpoint.first_line[:40],
                    changed or "-",
                    format_size(checkpoint.size) if checkpoint.size else "0 B",
                    at(checkpoint.created),
                    checkpoint.status + (f" (by {checkpoint.origin})" if checkpoint.switched_in else ""),
                    unsaved or "-",
                ],
            )
        )
    if ctx.promises is not None:
        await ctx.promises.settled()
        for cell in (await ctx.promises.interrupted(ctx.session_name))[-args.n :]:
            param = cell["param"] or {}
            created = cell["created"] / 1000
            when = at(created)
            first = str(param.get("first_line", ""))[:40]
            timed_rows.append((created, [f"[{cell['cell']}]", "-", first, "-", "-", when, "interrupted", "-"]))
    # This kernel's cells whose snapshot failed: no checkpoint of their own (a later one holds their state).
    recorded = {row[0] for _, row in timed_rows}
    for count, (session, reason, when) in list(ctx.checkpoints.failures.items())[-args.n :]:
        if session == ctx.session_name and f"[{count}]" not in recorded:
            first = ctx.checkpoints.first_line(count)[:40]
            said = "".join(ch if ch.isprintable() else "?" for ch in reason[:80])  # the sandbox's words, shown as text
            timed_rows.append((when, [f"[{count}]", "-", first, "-", "-", at(when), "failed", said]))
    rows = [row for _, row in sorted(timed_rows, key=lambda item: item[0])]
    title = f"Checkpoints of session {ctx.session_name}"
    if not rows:
        return [{"text/plain": f"{title}: none yet (one is taken after every successful cell)"}]
    headers = ["cell", "checkpoint", "first line", "changed", "size", "time", "status", "not saved"]
    return [table(title, headers, rows)]


async def cmd_restore(ctx: MagicContext, args: Any) -> list[Bundle]:
    await ctx.checkpoints_settled()
    target = find_checkpoint(ctx, args.ref, "restore")
    sandbox = await ctx.ready_sandbox()
    before = await ctx.checkpoints.current_names(sandbox)
    outcome = await ctx.checkpoints.restore(target, sandbox, replace=True)
    await ctx.namespace_replaced(target)
    ctx.checkpoints.record_restore(ctx.session_name, ctx.execution_count, f"%capsule restore {args.ref}", target)
    removed = sorted(set(before) - set(target.entries))
    lines = [f"The namespace is now as after cell [{target.execution_count}]: {outcome}."]
    if removed:
        lines.append("Removed (created later): " + ", ".join(removed))
    lines.append("This restore is itself a checkpoint: %capsule log shows it, and you can go forward again.")
    return [{"text/plain": "\n".join(lines)}]


async def cmd_resume(ctx: MagicContext, args: Any) -> list[Bundle]:
    store = ctx.checkpoints.store
    if store is None:
        raise MagicUsageError(f"%capsule resume: checkpoints are off ({ctx.checkpoints.problem})")
    await ctx.checkpoints_settled()
    # A kernel that died right after a reply: its sandbox's last snapshots are journaled; adopt them first.
    await ctx.adopt_orphans(wait=True)
    latest = find_checkpoint(ctx, args.ref, "resume") if args.ref else store.latest(ctx.session_name)
    if latest is None:
        raise MagicUsageError(f"%capsule resume: session {ctx.session_name} has no checkpoint to resume from")
    if not args.ref and (why := switched_in_by_another(latest, ctx.notebook)):
        raise MagicUsageError(f"%capsule resume: {why}")
    shown = [{"text/plain": await ctx.resume(latest)}]
    lost = [] if args.ref else await ctx.lost_cells(latest)
    if lost:
        firsts = [str((cell["param"] or {}).get("first_line", ""))[:60] for cell in lost]
        named = ", ".join(f"[{cell['cell']}] {first!r}" for cell, first in zip(lost, firsts, strict=True))
        shown.append(
            {
                "text/plain": f"Not in it: cell{'s' if len(lost) > 1 else ''} {named}, which the earlier kernel ran "
                "but whose state was not saved before it died; run them again."
            }
        )
    rerun = await ctx.tasks.rerun_interrupted()
    if rerun:
        shown.append({"text/plain": f"Interrupted task(s) run again in the background: {', '.join(rerun)}"})
    return shown


async def cmd_gc(ctx: MagicContext, args: Any) -> list[Bundle]:  # noqa: ARG001
    if ctx.checkpoints.store is None:
        raise MagicUsageError(f"%capsule gc: checkpoints are off ({ctx.checkpoints.problem})")
    await ctx.checkpoints_settled()
    grace = ctx.settings.gc_grace
    dropped, files, freed = await ctx.checkpoints.collect_garbage(grace)
    keep = ctx.checkpoints.keep
    return [
        {
            "text/plain": (
                f"Freed {format_size(freed) if freed else '0 B'} ({files} chunk files); dropped {dropped} checkpoints "
                f"beyond the newest {keep if keep else 'unlimited'} per session. Chunks used in the last "
                f"{format_duration(grace)} are kept in case another kernel is writing them."
            )
        }
    ]


async def cmd_session(ctx: MagicContext, args: Any) -> list[Bundle]:
    if args.name is None:
        return [{"text/plain": f"Session: {ctx.session_name} ({ctx.session_source})"}]
    name = args.name.strip()
    if not name:
        raise MagicUsageError("%capsule session: the name must not be empty")
    await ctx.switch_session(name, "%capsule session")
    return [{"text/plain": f"Checkpoints now go to session {name}."}]


def _describe(entry: dict[str, Any]) -> str:
    shape = (
        f" shape={tuple(entry['shape'])}" if "shape" in entry else (f" len={entry['len']}" if "len" in entry else "")
    )
    return f"{entry.get('type', '?')}{shape}: {entry.get('repr', '')}"


async def cmd_diff(ctx: MagicContext, args: Any) -> list[Bundle]:
    await ctx.checkpoints_settled()
    a = find_checkpoint(ctx, args.a, "diff")
    b = find_checkpoint(ctx, args.b, "diff")
    rows = []
    for name in sorted(set(a.entries) | set(b.entries)):
        old, new = a.entries.get(name), b.entries.get(name)
        if old is None:
            rows.append(["added", name, "-", _describe(new)])
        elif new is None:
            rows.append(["removed", name, _describe(old), "-"])
        elif _identity(old, a.entries) != _identity(new, b.entries):
            rows.append(["changed", name, _describe(old), _describe(new)])
    title = f"From cell [{a.execution_count}] ({a.id[:8]}) to cell [{b.execution_count}] ({b.id[:8]})"
    if not rows:
        return [{"text/plain": f"{title}: no differences"}]
    return [table(title, ["", "name", f"[{a.execution_count}]", f"[{b.execution_count}]"], rows)]


def _identity(entry: dict[str, Any], entries: dict[str, Any]) -> str:
    """What a value holds, for diff: an alias holds what its target does."""
    target = entries.get(entry.get("alias", ""))
    if target is not None and "alias" not in target:
        return _identity(target, entries)
    return entry.get("digest") or entry.get("module") or entry.get("error", "")


async def cmd_restart(ctx: MagicContext, args: Any) -> list[Bundle]:  # noqa: ARG001
    await ctx.restart_sandbox("restarted by %capsule restart")
    text = f"Started a fresh sandbox (pid {ctx.sandbox.pid}); the namespace was reset."
    return [{"text/plain": text}]
