"""What each ``%capsule`` subcommand does, run by the kernel (never the sandbox).

Each command takes the session (magics/context.py: a narrow interface) and
returns mime bundles to show; a bad argument, or a change the operator's
policy does not allow, raises MagicUsageError before anything changes.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capsule_kernel.kernel.checkpoint.store import Checkpoint, CheckpointRefused, switched_in_by_another
from capsule_kernel.kernel.magics.parser import MagicHelp, MagicUsageError, parse, usage_text
from capsule_kernel.kernel.policy import PolicyRefused
from capsule_kernel.protocol.limits import LIMIT_NAMES, LimitError, format_duration, format_size
from capsule_kernel.wasm_host.runtime import RuntimeUnavailable, find_runtime

if TYPE_CHECKING:
    from capsule_kernel.kernel.magics.context import MagicContext

Bundle = dict[str, str]


def _table(title: str, headers: list[str], rows: list[list[str]], notes: list[str] | None = None) -> Bundle:
    """The same table as plain text (terminals, logs) and HTML (notebooks)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    text_lines = [title, "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=False)).rstrip()]
    text_lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in rows]
    text_lines += notes or []
    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td style='text-align:left'>{html.escape(str(c))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    notes_html = "".join(f"<p>{html.escape(n)}</p>" for n in notes or [])
    return {
        "text/plain": "\n".join(text_lines),
        "text/html": f"<b>{html.escape(title)}</b><table><tr>{head}</tr>{body}</table>{notes_html}",
    }


def limits_table(ctx: MagicContext, title: str = "Sandbox limits", notes: dict[str, str] | None = None) -> Bundle:
    settings = ctx.limit_settings
    enforcement = ctx.sandbox.enforcement if ctx.sandbox else {}
    rows = []
    for name in LIMIT_NAMES:
        how = (notes or {}).get(name) or enforcement.get(name) or _kernel_enforced(name)
        rows.append([name, settings.limits.describe(name), settings.sources[name], how])
    extra = [f"warning: {w}" for w in settings.warnings]
    return _table(title, ["limit", "value", "set by", "enforcement"], rows, extra)


def _kernel_enforced(name: str) -> str:
    if name == "timeout":
        return "enforced by the kernel: interrupt, then kill after a grace period"
    if name == "cpu":
        return "watched by the kernel on the sandbox's cgroup: an exception at the limit, a stop 5 CPU s later"
    if name == "fuel":
        return "Wasm cells only: wasmtime fuel, topped up before each cell"
    return ""


async def cmd_limits(ctx: MagicContext, args: Any) -> list[Bundle]:
    changes = {name: getattr(args, name) for name in LIMIT_NAMES if getattr(args, name) is not None}
    await ctx.sandbox_started()
    if not changes:
        return [limits_table(ctx)]
    try:
        new = ctx.policy.notebook_limits(changes)
    except (LimitError, PolicyRefused) as err:
        raise MagicUsageError(f"%capsule limits: {err}") from None
    notes = ctx.sandbox.update_limits(new) if ctx.sandbox else {}
    shown = {name: notes[name] for name in changes if name in notes}
    return [limits_table(ctx, "Sandbox limits (changed: " + ", ".join(changes) + ")", shown)]


async def cmd_status(ctx: MagicContext, args: Any) -> list[Bundle]:
    if getattr(args, "last_crash", False):
        if ctx.last_crash is None:
            return [{"text/plain": "No sandbox of this kernel has crashed with a native dump."}]
        return [{"text/plain": "The last sandbox crash, as its faulthandler wrote it:\n" + ctx.last_crash}]
    await ctx.sandbox_started()
    sandbox = ctx.sandbox
    rows = [["sandbox", sandbox.kind if sandbox else "none"]]
    if sandbox is not None:
        alive = sandbox.alive
        uptime = time.monotonic() - sandbox.started_at if alive and sandbox.started_at else None
        memory = sandbox.memory_in_use() if alive else None
        rows += [
            ["state", "running" if alive else f"stopped ({sandbox.death_reason or 'not started'})"],
            ["pid", str(sandbox.pid) if alive else "-"],
            ["python", sandbox.python_version],
            ["uptime", format_duration(uptime) if uptime else "-"],
            ["memory in use", format_size(memory) if memory else "-"],
            ["cells run", str(sandbox.cells_run)],
        ]
    rows.append(["routing mode", ctx.routing_mode])
    wasm = ctx.sandboxes.get("wasm")
    if wasm is not None and wasm is not sandbox:
        rows.append(["wasm sandbox", f"pid {wasm.pid}, {wasm.cells_run} cells" if wasm.alive else "stopped"])
    if wasm is not None:
        last = f"{wasm.last_fuel:,}" if getattr(wasm, "last_fuel", None) is not None else "-"
        rows.append(["wasm fuel", f"last cell {last}; this instance {getattr(wasm, 'total_fuel', 0):,}"])
    rows += [["session cells", str(ctx.execution_count - 1)]]
    rows += [["session", f"{ctx.session_name} ({ctx.session_source})"]]
    store = ctx.checkpoints.store
    if store is None:
        rows.append(["checkpoints", f"off: {ctx.checkpoints.problem}"])
    else:
        latest = store.latest(ctx.session_name)
        where = f"{store.path}"
        rows.append(
            [
                "checkpoints",
                f"last after cell [{latest.execution_count}] ({latest.id[:8]}), in {where}"
                if latest
                else f"none yet, in {where}",
            ]
        )
    for name in LIMIT_NAMES:
        rows.append(
            [f"limit: {name}", f"{ctx.limit_settings.limits.describe(name)} ({ctx.limit_settings.sources[name]})"]
        )
    rows += ctx.policy.describe()
    rows += [["config problem", problem] for problem in ctx.policy.problems]
    if sandbox is not None:
        # What confines the sandbox, measure by measure, as the kernel set it up.
        for measure in CONFINEMENT_MEASURES:
            if measure in sandbox.enforcement:
                rows.append([measure, sandbox.enforcement[measure]])
    return [_table("Capsule status", ["", ""], rows)]


CONFINEMENT_MEASURES = (
    "confinement",
    "user",
    "namespaces",
    "capabilities",
    "seccomp",
    "filesystem",
    "workdir",
    "mounts",
    "environment",
    "cgroup",
    "privileges",
)


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
                    _when(checkpoint.created),
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
            when = _when(created)
            first = str(param.get("first_line", ""))[:40]
            timed_rows.append((created, [f"[{cell['cell']}]", "-", first, "-", "-", when, "interrupted", "-"]))
    rows = [row for _, row in sorted(timed_rows, key=lambda item: item[0])]
    title = f"Checkpoints of session {ctx.session_name}"
    if not rows:
        return [{"text/plain": f"{title}: none yet (one is taken after every successful cell)"}]
    headers = ["cell", "checkpoint", "first line", "changed", "size", "time", "status", "not saved"]
    return [_table(title, headers, rows)]


def _by_id(checkpoint: Checkpoint, ref: str) -> bool:
    return len(ref) >= 8 and checkpoint.id.startswith(ref)


def _checkpoint(ctx: MagicContext, ref: str, command: str) -> Checkpoint:
    store = ctx.checkpoints.store
    if store is None:
        raise MagicUsageError(f"%capsule {command}: checkpoints are off ({ctx.checkpoints.problem})")
    found = store.find(ctx.session_name, ref)
    if not found:
        raise MagicUsageError(
            f"%capsule {command}: no checkpoint {ref!r} in session {ctx.session_name} (see %capsule log)"
        )
    if len(found) > 1:
        named = "; ".join(
            f"{checkpoint.id[:8]} ([{checkpoint.execution_count}] {_when(checkpoint.created)}, {checkpoint.status})"
            for checkpoint in found[:6]
        )
        raise MagicUsageError(
            f"%capsule {command}: {ref!r} names {len(found)} checkpoints of session {ctx.session_name} "
            f"(counts start again after a restart): {named}. Give the checkpoint id instead, "
            f"e.g. %capsule {command} {found[0].id[:8]}"
        )
    checkpoint = found[0]
    if checkpoint.foreign_to(ctx.notebook) and not _by_id(checkpoint, ref):
        raise MagicUsageError(
            f"%capsule {command}: checkpoint {checkpoint.id[:8]} ([{checkpoint.execution_count}]) was written by "
            f"notebook {checkpoint.origin} after it switched into session {checkpoint.session}; loading it runs "
            f"that notebook's code here, so only its id brings it back: %capsule {command} {checkpoint.id[:12]}"
        )
    return checkpoint


def _when(created: float) -> str:
    """A checkpoint's time as %capsule log shows it: with the date (a session spans days and kernels)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))


async def cmd_restore(ctx: MagicContext, args: Any) -> list[Bundle]:
    await ctx.checkpoints_settled()
    target = _checkpoint(ctx, args.ref, "restore")
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
    latest = _checkpoint(ctx, args.ref, "resume") if args.ref else store.latest(ctx.session_name)
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


async def cmd_tasks(ctx: MagicContext, args: Any) -> list[Bundle]:  # noqa: ARG001
    headers, rows = ctx.tasks.table()
    if not rows:
        return [{"text/plain": f"Session {ctx.session_name} has no tasks yet (%%capsule task NAME runs one)."}]
    notes = []
    if any(row[2] == "interrupted" for row in rows):
        notes.append("interrupted: the kernel that ran it is gone; re-run its cell or %capsule resume")
    return [_table(f"Tasks of session {ctx.session_name}", headers, rows, notes)]


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
    a = _checkpoint(ctx, args.a, "diff")
    b = _checkpoint(ctx, args.b, "diff")
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
    return [_table(title, ["", "name", f"[{a.execution_count}]", f"[{b.execution_count}]"], rows)]


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


def cmd_mode(ctx: MagicContext, args: Any) -> list[Bundle]:
    explanations = {
        "subprocess": "every cell runs in the subprocess sandbox (CPython with your packages, under OS limits)",
        "wasm": "every cell runs in the Wasm sandbox; cells it cannot run (native imports, shell) are refused",
        "auto": "the analyzer sends pure-Python, stdlib-only cells to Wasm and the rest to the subprocess sandbox; "
        "names a cell reads are brought over from the other sandbox",
    }
    if args.mode is None:
        text = f"Routing mode: {ctx.routing_mode}: {explanations[ctx.routing_mode]}."
        return [{"text/plain": text + "\nChange it with %capsule mode subprocess | wasm | auto."}]
    try:
        ctx.policy.check_mode(ctx.routing_mode, args.mode)
    except PolicyRefused as err:
        raise MagicUsageError(f"%capsule mode: refused: {err}") from None
    if args.mode in ("wasm", "auto"):
        try:
            find_runtime()
        except RuntimeUnavailable as err:
            raise MagicUsageError(f"%capsule mode {args.mode}: no Wasm runtime: {err}") from None
    old, ctx.routing_mode = ctx.routing_mode, args.mode
    return [{"text/plain": f"Routing mode: {args.mode} (was {old}): {explanations[args.mode]}."}]


async def cmd_mount(ctx: MagicContext, args: Any) -> list[Bundle]:
    if args.path is None:
        if args.rw or args.remove:
            raise MagicUsageError("%capsule mount: --rw and --remove need a PATH")
        rows = [[m["path"], "read-write" if m.get("writable") else "read-only"] for m in ctx.mounts]
        notes = [
            "Both sandboxes see these directories at the same paths. Wasm cells see no other host file;",
            "the subprocess sandbox also sees the working directory and a read-only system and Python.",
        ]
        return [_table("Mounts", ["path", "access"], rows or [["(none)", "-"]], notes)]
    if args.remove:
        path = Path(args.path).expanduser().resolve()
        before = len(ctx.mounts)
        ctx.mounts = [m for m in ctx.mounts if m["path"] != str(path)]
        if len(ctx.mounts) == before:
            raise MagicUsageError(f"%capsule mount --remove: {path} is not mounted")
        ctx.held_mounts.release(path)
        text = f"Unmounted {path}."
    else:
        try:
            # Opened now, no link followed: the check below and every later bind are of this directory.
            path = ctx.held_mounts.hold(Path(args.path).expanduser())
        except OSError as err:
            raise MagicUsageError(f"%capsule mount: {args.path} is not a directory ({err})") from None
        try:
            ctx.policy.check_mount(path, bool(args.rw))
        except PolicyRefused as err:
            if not any(m["path"] == str(path) for m in ctx.mounts):
                ctx.held_mounts.release(path)
            raise MagicUsageError(f"%capsule mount: refused: {err}") from None
        ctx.mounts = [m for m in ctx.mounts if m["path"] != str(path)]
        ctx.mounts.append({"path": str(path), "writable": bool(args.rw)})
        text = f"Mounted {path} ({'read-write' if args.rw else 'read-only'})."
    for kind in ("subprocess", "wasm"):
        sandbox = ctx.sandboxes.get(kind)
        if sandbox is None or not sandbox.alive:
            continue
        if ctx.cell_running and kind == ctx.active_kind:
            text += f" The {kind} sandbox is running this cell: it sees the change after %capsule restart."
        else:
            # WASI preopens and bind mounts are fixed when a sandbox starts:
            # restart it, keeping its checkpointed names.
            await ctx.replace_sandbox(kind)
            text += f" The {kind} sandbox was restarted with its checkpointed names to apply it."
    return [{"text/plain": text}]


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
