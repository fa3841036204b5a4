"""What each ``%capsule`` subcommand does, run by the kernel (never the sandbox).

Each command takes the kernel as its context and returns mime bundles to show;
a bad argument raises MagicUsageError before anything changes.
"""

from __future__ import annotations

import contextlib
import html
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capsule_kernel.magics.parser import MagicHelp, MagicUsageError, parse, usage_text
from capsule_kernel.sandbox.limits import LIMIT_NAMES, LimitError, format_duration, format_size
from capsule_kernel.sandbox.wasm_runtime import RuntimeUnavailable, find_runtime

if TYPE_CHECKING:
    from capsule_kernel.checkpoint.store import Checkpoint
    from capsule_kernel.kernel import CapsuleKernel

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


def limits_table(kernel: CapsuleKernel, title: str = "Sandbox limits", notes: dict[str, str] | None = None) -> Bundle:
    settings = kernel.limit_settings
    enforcement = kernel.sandbox.enforcement if kernel.sandbox else {}
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


async def _sandbox_started(kernel: CapsuleKernel) -> None:
    """Wait for a sandbox that is starting (the first starts right after kernel_info)."""
    if kernel.sandbox is not None and not kernel.sandbox.ready and not kernel.cell_running:
        with contextlib.suppress(Exception):
            await kernel.ready_sandbox()


async def cmd_limits(kernel: CapsuleKernel, args: Any) -> list[Bundle]:
    changes = {name: getattr(args, name) for name in LIMIT_NAMES if getattr(args, name) is not None}
    await _sandbox_started(kernel)
    if not changes:
        return [limits_table(kernel)]
    try:
        new = kernel.limit_settings.override(changes, "%capsule limits")
    except LimitError as err:
        raise MagicUsageError(f"%capsule limits: {err}") from None
    notes = kernel.sandbox.update_limits(new) if kernel.sandbox else {}
    shown = {name: notes[name] for name in changes if name in notes}
    return [limits_table(kernel, "Sandbox limits (changed: " + ", ".join(changes) + ")", shown)]


async def cmd_status(kernel: CapsuleKernel, args: Any) -> list[Bundle]:  # noqa: ARG001
    await _sandbox_started(kernel)
    sandbox = kernel.sandbox
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
    rows.append(["routing mode", kernel.routing_mode])
    wasm = kernel.sandboxes.get("wasm")
    if wasm is not None and wasm is not sandbox:
        rows.append(["wasm sandbox", f"pid {wasm.pid}, {wasm.cells_run} cells" if wasm.alive else "stopped"])
    if wasm is not None:
        last = f"{wasm.last_fuel:,}" if getattr(wasm, "last_fuel", None) is not None else "-"
        rows.append(["wasm fuel", f"last cell {last}; this instance {getattr(wasm, 'total_fuel', 0):,}"])
    rows += [["session cells", str(kernel.execution_count - 1)]]
    rows += [["session", f"{kernel.session_name} ({kernel.session_source})"]]
    store = kernel.checkpoints.store
    if store is None:
        rows.append(["checkpoints", f"off: {kernel.checkpoints.problem}"])
    else:
        latest = store.latest(kernel.session_name)
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
            [f"limit: {name}", f"{kernel.limit_settings.limits.describe(name)} ({kernel.limit_settings.sources[name]})"]
        )
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


async def cmd_log(kernel: CapsuleKernel, args: Any) -> list[Bundle]:
    store = kernel.checkpoints.store
    if store is None:
        return [{"text/plain": f"Checkpoints are off: {kernel.checkpoints.problem}"}]
    if args.n < 1:
        raise MagicUsageError("%capsule log: -n must be at least 1")
    await kernel.checkpoints_settled()
    timed_rows: list[tuple[float, list[str]]] = []
    for checkpoint in store.history(kernel.session_name, args.n):
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
                    time.strftime("%H:%M:%S", time.localtime(checkpoint.created)),
                    checkpoint.status,
                    unsaved or "-",
                ],
            )
        )
    if kernel.promises is not None:
        await kernel.promises.settled()
        for cell in (await kernel.promises.interrupted(kernel.session_name))[-args.n :]:
            param = cell["param"] or {}
            created = cell["created"] / 1000
            when = time.strftime("%H:%M:%S", time.localtime(created))
            first = str(param.get("first_line", ""))[:40]
            timed_rows.append((created, [f"[{cell['cell']}]", "-", first, "-", "-", when, "interrupted", "-"]))
    rows = [row for _, row in sorted(timed_rows, key=lambda item: item[0])]
    title = f"Checkpoints of session {kernel.session_name}"
    if not rows:
        return [{"text/plain": f"{title}: none yet (one is taken after every successful cell)"}]
    headers = ["cell", "checkpoint", "first line", "changed", "size", "time", "status", "not saved"]
    return [_table(title, headers, rows)]


def _checkpoint(kernel: CapsuleKernel, ref: str, command: str) -> Checkpoint:
    store = kernel.checkpoints.store
    if store is None:
        raise MagicUsageError(f"%capsule {command}: checkpoints are off ({kernel.checkpoints.problem})")
    found = store.find(kernel.session_name, ref)
    if found is None:
        raise MagicUsageError(
            f"%capsule {command}: no checkpoint {ref!r} in session {kernel.session_name} (see %capsule log)"
        )
    return found


async def cmd_restore(kernel: CapsuleKernel, args: Any) -> list[Bundle]:
    await kernel.checkpoints_settled()
    target = _checkpoint(kernel, args.ref, "restore")
    sandbox = await kernel.ready_sandbox()
    before = await kernel.checkpoints.current_names(sandbox)
    outcome = await kernel.checkpoints.restore(target, sandbox, replace=True)
    await kernel.namespace_replaced(target)
    kernel.checkpoints.record_restore(
        kernel.session_name, kernel.execution_count, f"%capsule restore {args.ref}", target
    )
    removed = sorted(set(before) - set(target.entries))
    lines = [f"The namespace is now as after cell [{target.execution_count}]: {outcome}."]
    if removed:
        lines.append("Removed (created later): " + ", ".join(removed))
    lines.append("This restore is itself a checkpoint: %capsule log shows it, and you can go forward again.")
    return [{"text/plain": "\n".join(lines)}]


async def cmd_resume(kernel: CapsuleKernel, args: Any) -> list[Bundle]:  # noqa: ARG001
    store = kernel.checkpoints.store
    if store is None:
        raise MagicUsageError(f"%capsule resume: checkpoints are off ({kernel.checkpoints.problem})")
    await kernel.checkpoints_settled()
    latest = store.latest(kernel.session_name)
    if latest is None:
        raise MagicUsageError(f"%capsule resume: session {kernel.session_name} has no checkpoint to resume from")
    return [{"text/plain": await kernel.resume(latest)}]


async def cmd_gc(kernel: CapsuleKernel, args: Any) -> list[Bundle]:  # noqa: ARG001
    if kernel.checkpoints.store is None:
        raise MagicUsageError(f"%capsule gc: checkpoints are off ({kernel.checkpoints.problem})")
    await kernel.checkpoints_settled()
    grace = kernel.settings.gc_grace
    dropped, files, freed = await kernel.checkpoints.collect_garbage(grace)
    keep = kernel.checkpoints.keep
    return [
        {
            "text/plain": (
                f"Freed {format_size(freed) if freed else '0 B'} ({files} chunk files); dropped {dropped} checkpoints "
                f"beyond the newest {keep if keep else 'unlimited'} per session. Chunks used in the last "
                f"{format_duration(grace)} are kept in case another kernel is writing them."
            )
        }
    ]


async def cmd_session(kernel: CapsuleKernel, args: Any) -> list[Bundle]:
    if args.name is None:
        return [{"text/plain": f"Session: {kernel.session_name} ({kernel.session_source})"}]
    name = args.name.strip()
    if not name:
        raise MagicUsageError("%capsule session: the name must not be empty")
    await kernel.switch_session(name, "%capsule session")
    return [{"text/plain": f"Checkpoints now go to session {name}."}]


def _describe(entry: dict[str, Any]) -> str:
    shape = (
        f" shape={tuple(entry['shape'])}" if "shape" in entry else (f" len={entry['len']}" if "len" in entry else "")
    )
    return f"{entry.get('type', '?')}{shape}: {entry.get('repr', '')}"


async def cmd_diff(kernel: CapsuleKernel, args: Any) -> list[Bundle]:
    await kernel.checkpoints_settled()
    a = _checkpoint(kernel, args.a, "diff")
    b = _checkpoint(kernel, args.b, "diff")
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


async def cmd_restart(kernel: CapsuleKernel, args: Any) -> list[Bundle]:  # noqa: ARG001
    await kernel.restart_sandbox("restarted by %capsule restart")
    text = f"Started a fresh sandbox (pid {kernel.sandbox.pid}); the namespace was reset."
    return [{"text/plain": text}]


def cmd_mode(kernel: CapsuleKernel, args: Any) -> list[Bundle]:
    explanations = {
        "subprocess": "every cell runs in the subprocess sandbox (CPython with your packages, under OS limits)",
        "wasm": "every cell runs in the Wasm sandbox; cells it cannot run (native imports, shell) are refused",
        "auto": "the analyzer sends pure-Python, stdlib-only cells to Wasm and the rest to the subprocess sandbox; "
        "names a cell reads are brought over from the other sandbox",
    }
    if args.mode is None:
        text = f"Routing mode: {kernel.routing_mode}: {explanations[kernel.routing_mode]}."
        return [{"text/plain": text + "\nChange it with %capsule mode subprocess | wasm | auto."}]
    if args.mode in ("wasm", "auto"):
        try:
            find_runtime()
        except RuntimeUnavailable as err:
            raise MagicUsageError(f"%capsule mode {args.mode}: no Wasm runtime: {err}") from None
    old, kernel.routing_mode = kernel.routing_mode, args.mode
    return [{"text/plain": f"Routing mode: {args.mode} (was {old}): {explanations[args.mode]}."}]


async def cmd_mount(kernel: CapsuleKernel, args: Any) -> list[Bundle]:
    if args.path is None:
        if args.rw or args.remove:
            raise MagicUsageError("%capsule mount: --rw and --remove need a PATH")
        rows = [[m["path"], "read-write" if m.get("writable") else "read-only"] for m in kernel.mounts]
        notes = [
            "Both sandboxes see these directories at the same paths. Wasm cells see no other host file;",
            "the subprocess sandbox also sees the working directory and a read-only system and Python.",
        ]
        return [_table("Mounts", ["path", "access"], rows or [["(none)", "-"]], notes)]
    path = Path(args.path).expanduser().resolve()
    if args.remove:
        before = len(kernel.mounts)
        kernel.mounts = [m for m in kernel.mounts if m["path"] != str(path)]
        if len(kernel.mounts) == before:
            raise MagicUsageError(f"%capsule mount --remove: {path} is not mounted")
        text = f"Unmounted {path}."
    else:
        if not path.is_dir():
            raise MagicUsageError(f"%capsule mount: {path} is not a directory")
        kernel.mounts = [m for m in kernel.mounts if m["path"] != str(path)]
        kernel.mounts.append({"path": str(path), "writable": bool(args.rw)})
        text = f"Mounted {path} ({'read-write' if args.rw else 'read-only'})."
    for kind in ("subprocess", "wasm"):
        sandbox = kernel.sandboxes.get(kind)
        if sandbox is None or not sandbox.alive:
            continue
        if kernel.cell_running and kind == kernel.active_kind:
            text += f" The {kind} sandbox is running this cell: it sees the change after %capsule restart."
        else:
            # WASI preopens and bind mounts are fixed when a sandbox starts:
            # restart it, keeping its checkpointed names.
            await kernel.replace_sandbox(kind)
            text += f" The {kind} sandbox was restarted with its checkpointed names to apply it."
    return [{"text/plain": text}]


def cmd_help(kernel: CapsuleKernel, args: Any) -> list[Bundle]:  # noqa: ARG001
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
    "help": cmd_help,
}


async def run(kernel: CapsuleKernel, line: str) -> list[Bundle]:
    """Run one %capsule line; MagicUsageError for bad arguments."""
    try:
        args = parse(line)
    except MagicHelp as help_text:
        return [{"text/plain": str(help_text)}]
    if args.command is None:
        return [{"text/plain": usage_text()}]
    result = COMMANDS[args.command](kernel, args)
    if hasattr(result, "__await__"):
        result = await result
    return result
