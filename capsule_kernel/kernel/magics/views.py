"""How %capsule commands show things: one table as plain text and HTML, the limits table, checkpoint references.

Shared by the command modules (sandbox_cmds, checkpoint_cmds, task_cmds), below them.
"""

from __future__ import annotations

import html
import time
from typing import TYPE_CHECKING

from capsule_kernel.kernel.checkpoint.rows import Checkpoint
from capsule_kernel.kernel.magics.parser import MagicUsageError
from capsule_kernel.protocol.limits import LIMIT_NAMES

if TYPE_CHECKING:
    from capsule_kernel.kernel.magics.context import MagicContext


Bundle = dict[str, str]


def table(title: str, headers: list[str], rows: list[list[str]], notes: list[str] | None = None) -> Bundle:
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
        how = (notes or {}).get(name) or enforcement.get(name) or kernel_enforced(name)
        rows.append([name, settings.limits.describe(name), settings.sources[name], how])
    extra = [f"warning: {w}" for w in settings.warnings]
    return table(title, ["limit", "value", "set by", "enforcement"], rows, extra)


def kernel_enforced(name: str) -> str:
    if name == "timeout":
        return "enforced by the kernel: interrupt, then kill after a grace period"
    if name == "cpu":
        return "watched by the kernel on the sandbox's cgroup: an exception at the limit, a stop 5 CPU s later"
    if name == "fuel":
        return "Wasm cells only: wasmtime fuel, topped up before each cell"
    return ""


def _by_id(checkpoint: Checkpoint, ref: str) -> bool:
    return len(ref) >= 8 and checkpoint.id.startswith(ref)


def find_checkpoint(ctx: MagicContext, ref: str, command: str) -> Checkpoint:
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
            f"{checkpoint.id[:8]} ([{checkpoint.execution_count}] {at(checkpoint.created)}, {checkpoint.status})"
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


def at(created: float) -> str:
    """A checkpoint's time as %capsule log shows it: with the date (a session spans days and kernels)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
