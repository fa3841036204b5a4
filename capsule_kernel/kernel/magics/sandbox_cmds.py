"""%capsule limits, status, mode and mount: what the sandbox runs under, and the changes a notebook may ask for.

A change is checked against the operator's policy (Policy) before anything changes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capsule_kernel.kernel.magics.parser import MagicUsageError
from capsule_kernel.kernel.magics.views import Bundle, limits_table, table
from capsule_kernel.kernel.policy import PolicyRefused
from capsule_kernel.protocol.limits import LIMIT_NAMES, LimitError, format_duration, format_size
from capsule_kernel.wasm_host.runtime import RuntimeUnavailable, find_runtime

if TYPE_CHECKING:
    from capsule_kernel.kernel.magics.context import MagicContext


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
        # A power loss within this of a reply can lose that cell (a kill of any process cannot).
        rows.append(["on disk", ctx.checkpoints.window.summary()])
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
    return [table("Capsule status", ["", ""], rows)]


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
        return [table("Mounts", ["path", "access"], rows or [["(none)", "-"]], notes)]
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
