"""SandboxProcess against a real confined worker, below the kernel: what one sandbox leaves to the next."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path
from typing import Any

from capsule_kernel.kernel.sandbox.subprocess import SubprocessSandbox
from capsule_kernel.kernel.session.controller import Cell
from capsule_kernel.protocol.limits import default_limits


def _sandbox(tmp_path: Path, events: list[dict[str, Any]]) -> SubprocessSandbox:
    return SubprocessSandbox(default_limits(), events.append, cwd=tmp_path, chunk_root=tmp_path / "chunks")


def test_a_sandbox_killed_before_its_end_of_file_was_read_leaves_no_watched_fd(tmp_path):
    """The replacement's pipes reuse the dead sandbox's fd numbers and must still be heard.

    Fails without closing through _forget_fd (checked: fd 26 stayed in the
    selector). In the kernel that was: the selector kept the
    dead frame pipe's key, the next sandbox's pipe got the same number, its
    add_reader only swapped the callback, and its ``ready`` was never read (the
    restart after a timeout then hung for the 60 s start-up limit; seen in CI).
    """
    events: list[dict[str, Any]] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        first = _sandbox(tmp_path, events)
        await first.start()
        frame_fd = first._from_worker
        assert frame_fd is not None
        # Dead before the loop runs again: its end of file on the frame pipe is never dispatched.
        first.kill()
        assert first.process is not None
        first.process.wait()
        await first._reaped()
        watched = set(loop._selector.get_map())  # type: ignore[attr-defined]
        assert frame_fd not in watched, "a closed pipe is still watched"
        second = _sandbox(tmp_path, events)
        await asyncio.wait_for(second.start(), timeout=45)
        reply = await asyncio.wait_for(
            second.execute(asdict(Cell("print(6 * 7)", False, True, {}, False, 1))),
            timeout=45,
        )
        assert reply["status"] == "ok", reply
        await second.shutdown()

    asyncio.run(scenario())
    assert any(e.get("type") == "stream" and "42" in e.get("text", "") for e in events), events
