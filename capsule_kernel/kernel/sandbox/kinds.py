"""The sandbox kinds: a name ("subprocess", "wasm") -> the client class that runs one.

One table for the session's sandboxes and the tasks' alike, below both.
"""

from __future__ import annotations

from capsule_kernel.kernel.sandbox.process import SandboxProcess
from capsule_kernel.kernel.sandbox.subprocess import SubprocessSandbox
from capsule_kernel.kernel.sandbox.wasm import WasmSandbox

SANDBOX_KINDS: dict[str, type[SandboxProcess]] = {"subprocess": SubprocessSandbox, "wasm": WasmSandbox}
