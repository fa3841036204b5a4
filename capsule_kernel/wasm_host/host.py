"""The Wasm sandbox's host process: wasmtime running CPython-for-WASI.

Started by the kernel as ``python -m capsule_kernel.wasm_host.host CONFIG``
with the same frame pipes as the subprocess worker, so the kernel treats both
sandboxes alike. The host runs no user code; the guest does, inside Wasm,
with no ambient authority: the stdlib (embedded in the runtime, read-only),
the guest library read-only, and declared mounts. The host process itself is
confined like a worker (no network, no privileges), as a second wall.

The guest's channel is stdin/stdout used positionally (``fd_pread`` on 0,
``fd_pwrite`` on 1), shadowed here with ``Linker.allow_shadowing``. Inside
those calls the host sits at cell boundaries and sets fuel and the deadline
through the Caller. ``poll_oneoff`` is shadowed so ``time.sleep`` ends at the
deadline or on an interrupt. A cell that never calls the host is stopped by
an epoch increment: a trap, which ends this process; the kernel restarts the
sandbox and restores the last checkpoint.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from capsule_kernel.protocol import chunks, frames
from capsule_kernel.protocol.limits import STOP_GRACE_SECONDS, format_duration, format_size
from capsule_kernel.wasm_host import runtime as wasm_runtime
from capsule_kernel.wasm_host import self_limits as host_limits
from capsule_kernel.wasm_host.guest_frames import UNLIMITED_FUEL, GuestFrames
from capsule_kernel.wasm_host.library import guest_library
from capsule_kernel.wasm_host.stopper import Stopper
from capsule_kernel.wasm_host.wasi_calls import ShadowedWasi

WASM_MEMORY_CEILING = 4 * 1024**3  # wasm32 addresses at most 4 GiB
TRAP_EXIT_CODE = 86
# Fuel one CPU second of host work counts as (half the rate of pure Wasm computation
# here, so a computing cell always meets its fuel limit first, deterministically).
FUEL_PER_HOST_CPU_SECOND = 200_000_000
# A guest frame larger than this (but for snapshot data, bounded by the guest's memory) breaks the channel.
_GUEST_FRAME_FLOOR = 128 * 1024 * 1024


class GuestViolation(Exception):
    """The guest sent a frame outside the vocabulary, or out of sequence: the instance ends."""


_GUEST_ROOT = "/capsule"


class WasmHost(ShadowedWasi, GuestFrames):
    def __init__(self, config: dict[str, Any]) -> None:
        import wasmtime

        self.wasmtime = wasmtime
        self.config = config
        self.limits: dict[str, Any] = dict(config.get("limits", {}))
        self.write_fd = config["write_fd"]
        self.write_lock = threading.Lock()
        self.inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.to_guest = bytearray()
        memory = min(self.limits.get("memory") or WASM_MEMORY_CEILING, WASM_MEMORY_CEILING)
        # The guest must hold a frame's data to send it (base64: 4/3): no frame may be larger.
        cap = min(frames.MAX_FRAME_BYTES, max(_GUEST_FRAME_FLOOR, memory * 4 // 3 + 2**20))
        self.from_guest = frames.FrameDecoder(frames.GUEST, limit=cap)
        self.report_fd: int | None = config.get("report_fd")
        # The cell the guest holds: its count, and how far it got (execute -> cell_end -> done -> idle).
        self.cell: int | None = None
        self.phase = "idle"
        self.fuel_budget: int | None = None
        self.snapshot_sent: int | None = None
        self.ready_sent = False
        self.guest_handlers = {
            "ready": self._guest_ready,
            "cell_start": self._guest_cell_start,
            "cell_end": self._guest_cell_end,
            "snapshot_data": self._guest_snapshot,
            "snapshot_failed": self._guest_snapshot_failed,
            "done": self._guest_done,
            "sleep_ended": lambda caller, message: None,  # noqa: ARG005
            "reply": self._forward,
            "stream": self._forward,
            "display": self._forward,
            "clear_output": self._forward,
            "execute_result": self._forward,
            "error": self._forward,
            "input_request": self._forward,
            "magic": self._forward,
            "task": self._forward,
        }
        self.kernel_handlers = {
            "execute": self._deliver_execute,
            "request": self._deliver_request,
            "limits": self._deliver_limits,
            "input_reply": self._deliver_as_is,
            "magic_reply": self._deliver_as_is,
            "task_reply": self._deliver_as_is,
            "shutdown": self._deliver_as_is,
            "eof": self._deliver_as_is,
            "comm": lambda caller, message: None,  # noqa: ARG005 - no widgets in Wasm cells
        }
        self.chunk_root = Path(config["chunk_root"]) if config.get("chunk_root") else None
        self.spool: str | None = config.get("spool")
        self.enforcement: dict[str, str] = dict(config.get("enforcement", {}))
        self.fuel_at_start = 0
        self.last_fuel: int | None = None
        self.in_cell = False
        self.trap_note: str | None = None

    # -- the kernel side --------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        with self.write_lock:
            frames.write_frame(self.write_fd, message)

    def note(self, text: str) -> None:
        self.send({"type": "stream", "name": "stderr", "text": text})

    def _read_kernel(self) -> None:
        while True:
            try:
                message = frames.read_frame(self.config["read_fd"])
            except (OSError, frames.ProtocolError):
                message = None
            self.inbox.put(message)
            if message is None:
                return

    # -- setting up the instance -------------------------------------------------------

    def build(self) -> tuple[Any, Any]:
        wasmtime = self.wasmtime
        runtime = wasm_runtime.find_runtime()
        engine = wasmtime.Engine(wasm_runtime.engine_config())
        module, _ = wasm_runtime.load_module(engine, runtime, self.note)
        self.stopper = Stopper(engine, lambda: self.inbox.put({"type": "_wake"}))
        store = wasmtime.Store(engine)
        memory = min(self.limits.get("memory") or WASM_MEMORY_CEILING, WASM_MEMORY_CEILING)
        store.set_limits(memory_size=memory)
        self.enforcement["memory"] = f"enforced: Wasm linear memory capped at {format_size(memory)}"
        store.set_fuel(UNLIMITED_FUEL)
        store.set_epoch_deadline(1)
        wasi = wasmtime.WasiConfig()
        library = guest_library(wasm_runtime.cache_dir())
        wasi.argv = [
            "python",
            "-c",
            f"import sys; sys.path.insert(0, {_GUEST_ROOT!r}); "
            "from capsule_kernel.inside.wasm_guest import guest; guest.main()",
        ]
        env = {"PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "CAPSULE_SANDBOX": "wasm"}
        if self.chunk_root is not None:
            env["CAPSULE_SNAPSHOTS"] = "1"
        wasi.env = list(env.items())
        wasi.preopen_dir(str(library), _GUEST_ROOT, False)
        mounts = []
        for mount in self.config.get("mounts", []):
            # The kernel's held descriptor when it sent one: the directory it checked, whatever the path is now.
            host_path = f"/proc/self/fd/{int(mount['fd'])}" if mount.get("fd") is not None else mount["path"]
            wasi.preopen_dir(host_path, mount["path"], bool(mount.get("writable")))
            mounts.append(f"{mount['path']} ({'rw' if mount.get('writable') else 'ro'})")
        self.enforcement["files"] = "Wasm: no host files but " + (", ".join(mounts) if mounts else "no mounts")
        self.enforcement["network"] = "Wasm: no sockets (and the host process has no network)"
        self.enforcement["procs"] = "Wasm: no processes or threads"
        wasi.stdout_custom = lambda data: self._raw_output("stdout", data)
        wasi.stderr_custom = lambda data: self._raw_output("stderr", data)
        store.set_wasi(wasi)
        linker = wasmtime.Linker(engine)
        linker.define_wasi()
        linker.allow_shadowing = True
        i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
        positional = wasmtime.FuncType([i32, i32, i32, i64, i32], [i32])
        linker.define_func("wasi_snapshot_preview1", "fd_pread", positional, self._fd_pread, access_caller=True)
        linker.define_func("wasi_snapshot_preview1", "fd_pwrite", positional, self._fd_pwrite, access_caller=True)
        # The guest's clocks are the host's, so poll_oneoff can read absolute deadlines.
        clock = wasmtime.FuncType([i32, i64, i32], [i32])
        linker.define_func("wasi_snapshot_preview1", "clock_time_get", clock, self._clock_time_get, access_caller=True)
        poll = wasmtime.FuncType([i32, i32, i32, i32], [i32])
        linker.define_func("wasi_snapshot_preview1", "poll_oneoff", poll, self._poll_oneoff, access_caller=True)
        return store, linker.instantiate(store, module)

    def _raw_output(self, name: str, data: bytes) -> None:
        self.send({"type": "stream", "name": name, "text": data.decode("utf-8", "replace")})

    # -- shadowed WASI calls -------------------------------------------------------------

    # -- frames in both directions ------------------------------------------------------

    def _violation(self, what: str) -> None:
        """The guest broke the protocol: nothing more it says is believed, and the instance ends."""
        self.trap_note = f"broke the protocol (it sent {what}), so the Wasm instance was stopped"
        raise GuestViolation(self.trap_note)

    def _deliver_limits(self, caller: Any, message: dict[str, Any]) -> dict[str, Any]:  # noqa: ARG002
        self.limits = dict(message.get("limits", {}))
        return message

    def _deliver_as_is(self, caller: Any, message: dict[str, Any]) -> dict[str, Any]:  # noqa: ARG002
        return message

    def _deliver_execute(self, caller: Any, message: dict[str, Any]) -> dict[str, Any]:
        """The cell boundary: the host sets fuel and the deadline from the kernel's request, and only here."""
        wasmtime = self.wasmtime
        self.limits = dict(message.get("limits", self.limits))
        self.fuel_budget = self.limits.get("fuel")
        fuel = self.fuel_budget or UNLIMITED_FUEL
        wasmtime.Store.set_fuel(caller, fuel)
        self.fuel_at_start = fuel
        self.last_fuel = None
        wasmtime.Store.set_epoch_deadline(caller, 1)
        self.in_cell = True
        self.cell, self.phase, self.snapshot_sent = int(message["execution_count"]), "running", None
        cpu, reason = self._cpu_budget()
        self.stopper.begin_cell(self.limits.get("timeout"), cpu, reason)
        self.send({"type": "started", "execution_count": self.cell})
        return message

    def _cpu_budget(self) -> tuple[float | None, str]:
        """CPU seconds the cell may use on the host's main thread (Wasm and the host calls it makes)."""
        budgets = []
        if self.limits.get("cpu"):
            budgets.append((float(self.limits["cpu"]), f"the CPU limit of {format_duration(self.limits['cpu'])} (cpu)"))
        if self.fuel_budget:
            seconds = self.fuel_budget / FUEL_PER_HOST_CPU_SECOND
            budgets.append((seconds, f"its fuel budget of {self.fuel_budget:,} units, counting the host's work for it"))
        if not budgets:
            return None, ""
        # Twice the budget: the soft limits (fuel traps, timeouts) come first for ordinary cells.
        seconds, reason = min(budgets)
        return seconds * 2 if reason.startswith("its fuel") else seconds, reason

    def _deliver_request(self, caller: Any, message: dict[str, Any]) -> dict[str, Any]:
        self.wasmtime.Store.set_fuel(caller, UNLIMITED_FUEL)
        self.wasmtime.Store.set_epoch_deadline(caller, 1)
        if message.get("kind") == "restore":
            message = self._with_restore_bytes(message)
        return message

    def _with_restore_bytes(self, message: dict[str, Any]) -> dict[str, Any]:
        """Entries name chunks; the guest has no access to them, so the bytes travel in the frame."""
        args = dict(message.get("args", {}))
        entries = {}
        for name, entry in args.get("entries", {}).items():
            entry = dict(entry)
            if "pickle" in entry and self.chunk_root is not None:
                try:
                    data = chunks.read_bytes(self.chunk_root, entry["pickle"])
                    entry["data"] = base64.b64encode(data).decode("ascii")
                    entry["buffer_data"] = [
                        base64.b64encode(chunks.read_bytes(self.chunk_root, d)).decode("ascii")
                        for d in entry.get("buffers", [])
                    ]
                except chunks.ChunkError as err:
                    entry["unreadable"] = str(err)
            entries[name] = entry
        args["entries"] = entries
        return {**message, "args": args}

    # -- what the guest sends, and when it may -------------------------------------------

    # -- running ----------------------------------------------------------------------

    def run(self) -> int:
        threading.Thread(target=self._read_kernel, name="capsule-wasm-reader", daemon=True).start()
        threading.Thread(target=self._relay_interrupts, name="capsule-wasm-sigint", daemon=True).start()
        try:
            store, instance = self.build()
        except (wasm_runtime.RuntimeUnavailable, self.wasmtime.WasmtimeError) as err:
            self.send({"type": "trap", "reason": f"could not start the Wasm runtime: {err}"})
            return TRAP_EXIT_CODE
        try:
            instance.exports(store)["_start"](store)
        except GuestViolation as violation:
            self._report_trap(str(violation))
            return TRAP_EXIT_CODE
        except self.wasmtime.ExitTrap as exit_trap:
            if exit_trap.code == 0 and not self.in_cell and self.trap_note is None:
                return 0
            self._report_trap(
                self.trap_note or f"exited with code {exit_trap.code} (the cell called os._exit or the runtime gave up)"
            )
            return TRAP_EXIT_CODE
        except self.wasmtime.Trap as trap:
            self._report_trap(self._describe_trap(trap))
            return TRAP_EXIT_CODE
        except self.wasmtime.WasmtimeError as err:
            self._report_trap(f"failed inside wasmtime: {err}")
            return TRAP_EXIT_CODE
        finally:
            with contextlib.suppress(Exception):
                del instance
                del store  # host callbacks hold references: release the store now
        return 0

    def _describe_trap(self, trap: Any) -> str:
        if self.trap_note:
            return self.trap_note
        reason = self._trap_reason(trap)
        if self.phase == "done" and self.cell is not None:
            # Its "done" came, then more work: the time is the cell's, not the next one's.
            reason = f"{reason} (cell [{self.cell}] went on running after it reported its end)"
        return reason

    def _trap_reason(self, trap: Any) -> str:
        code = trap.trap_code
        codes = self.wasmtime.TrapCode
        if code == codes.OUT_OF_FUEL:
            return f"ran out of fuel: the cell used its whole budget of {self.limits.get('fuel'):,} units (fuel)"
        if code == codes.INTERRUPT:
            why = self.stopper.stopped_hard or "interrupt"
            if why == "cpu":
                return f"used {self.stopper.cpu_reason}, so the Wasm instance was stopped"
            if why == "timeout":
                limit = format_duration(self.limits.get("timeout"))
                return (
                    f"exceeded the wall-clock limit of {limit} (timeout) and did not stop within "
                    f"{STOP_GRACE_SECONDS:g} s, so the Wasm instance was stopped"
                )
            return (
                "was interrupted and the cell did not stop within "
                f"{STOP_GRACE_SECONDS:g} s (pure computation never yields), so the Wasm instance was stopped"
            )
        message = str(trap).strip().splitlines()[0] if str(trap).strip() else "trap"
        return f"trapped ({message}): the Wasm instance cannot continue"

    def _report_trap(self, reason: str) -> None:
        with contextlib.suppress(OSError):
            self.send({"type": "trap", "reason": reason})

    def _relay_interrupts(self) -> None:
        while True:
            signal.sigwait({signal.SIGINT})
            stopper = getattr(self, "stopper", None)
            if stopper is not None:
                stopper.interrupt()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    config = json.loads(argv[0])
    # SIGINT is taken by a thread with sigwait: the main thread is inside Wasm
    # and would not run a Python handler until the guest called the host.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    for fd in (config["read_fd"], config["write_fd"], config.get("report_fd")):
        if fd is not None:
            os.set_inheritable(fd, False)
    host_limits.die_with_parent(config["parent_pid"])
    enforcement: dict[str, str] = {}
    _, enforcement["host_network"] = host_limits.isolate_network()
    limits = dict(config["limits"])
    # The host needs address space for Wasm's memory reservations; the guest's
    # memory is capped by the store instead.
    enforcement.update(host_limits.apply_rlimits({**limits, "memory": None}))
    enforcement["privileges"] = host_limits.drop_privileges()
    config["enforcement"] = enforcement
    sys.exit(WasmHost(config).run())


if __name__ == "__main__":
    main()
