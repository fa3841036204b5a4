"""%capsule network: what the allowed-hosts proxy decided for this session's cells, newest last."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from capsule_kernel.kernel.magics.views import Bundle, table
from capsule_kernel.protocol.limits import format_size, format_value

if TYPE_CHECKING:
    from capsule_kernel.kernel.magics.context import MagicContext


async def cmd_network(ctx: MagicContext, args: Any) -> list[Bundle]:
    limits = ctx.policy.limits
    setting = f"network: {format_value('network', limits.limits.network)} ({limits.sources.get('network', 'default')})"
    audit = ctx.network_audit
    if audit is None:
        return [{"text/plain": f"{setting}\nNo store, so no audit of requests (checkpoints are off)."}]
    await audit.flush()
    rows = []
    for row in audit.recent(ctx.session_name, args.n):
        if row.get("tampered"):
            rows.append(["?", "?", "?", "?", "a row that fails its MAC (not written by this kernel)", "", ""])
            continue
        when = time.strftime("%H:%M:%S", time.localtime(row["at"]))
        verdict = "allowed" if row["allowed"] else "refused"
        cell = f"task {row['task']}" if row["task"] else ("" if row["cell"] is None else f"[{row['cell']}]")
        reason = "" if row["allowed"] else row["reason"]
        moved = f"{format_size(row['sent'])} / {format_size(row['received'])}" if row["allowed"] else ""
        rows.append([when, cell, row["method"], f"{row['host']}:{row['port']}", f"{verdict} {reason}".rstrip(), moved,
                     row["address"]])  # fmt: skip
    if not rows:
        return [{"text/plain": f"{setting}\nNo request has gone through the proxy in session {ctx.session_name}."}]
    headers = ["time", "cell or task", "method", "host", "decision", "sent / received", "address"]
    return [table(f"Network requests of session {ctx.session_name} ({setting})", headers, rows)]
