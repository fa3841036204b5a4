"""Snapshots of a namespace, taken and restored INSIDE the sandbox.

Each name is pickled on its own with cloudpickle (protocol 5), so functions,
classes and lambdas defined in the notebook survive, and large buffers (numpy
arrays, bytes) travel out-of-band into content-addressed chunks. A name whose
pickle (and buffers) hash the same as last time is not stored again.

The result is a manifest of plain JSON: per name, the chunk digests of its
pickle and buffers, its type, a short repr and size, or the reason it could
not be saved. The kernel stores manifests without ever unpickling anything.
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
import re
import reprlib
import types
from pathlib import Path
from typing import Any

import cloudpickle

from capsule_kernel.checkpoint.chunks import read_bytes, write_bytes

_IPYTHON_NAMES = re.compile(r"^(_+|_i+|_i\d+|_\d+|_ih|_oh|_dh|In|Out|exit|quit|get_ipython)$")
_short_repr = reprlib.Repr(maxstring=80, maxother=80, maxlist=6, maxdict=6)


def saveable_names(namespace: dict[str, Any], hidden: set[str]) -> list[str]:
    """The user's names: not IPython's bookkeeping, not the initial builtins."""
    return [
        name
        for name in namespace
        if name not in hidden and not _IPYTHON_NAMES.match(name) and not name.startswith("__")
    ]


def describe(value: Any) -> dict[str, Any]:
    """Type, short repr and shape of a value, for %capsule log and diff."""
    kind = type(value)
    info: dict[str, Any] = {"type": f"{kind.__module__}.{kind.__qualname__}".removeprefix("builtins.")}
    try:
        info["repr"] = _short_repr.repr(value)
    except Exception as err:  # noqa: BLE001 - a broken __repr__ must not stop a snapshot
        info["repr"] = f"<repr failed: {type(err).__name__}>"
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple):
        info["shape"] = list(shape)
    elif hasattr(value, "__len__") and not isinstance(value, type):
        try:
            info["len"] = len(value)
        except Exception:  # noqa: BLE001
            pass
    return info


def snapshot_value(value: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    buffers: list[pickle.PickleBuffer] = []
    data = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    return data, buffers


def content_digest(data: bytes, buffers: list[pickle.PickleBuffer]) -> str:
    hasher = hashlib.sha256(data)
    for buffer in buffers:
        raw = buffer.raw()
        hasher.update(len(raw).to_bytes(8, "little"))
        hasher.update(raw)
    return hasher.hexdigest()


def take(
    namespace: dict[str, Any],
    names: list[str],
    previous: dict[str, str],
    chunk_root: Path,
) -> dict[str, Any]:
    """Snapshot the given names; unchanged ones (same digest) are left out.

    Returns {"entries": {name: entry}, "written": bytes newly stored}.
    """
    entries: dict[str, Any] = {}
    written = 0
    for name in names:
        if name not in namespace:
            continue
        value = namespace[name]
        if isinstance(value, types.ModuleType):
            entries[name] = {"module": value.__name__, "type": "module", "repr": f"<module {value.__name__}>"}
            continue
        try:
            data, buffers = snapshot_value(value)
        except Exception as err:  # noqa: BLE001 - any value may refuse pickling; say why
            entries[name] = {**describe(value), "error": f"{type(err).__name__}: {err}"}
            continue
        digest = content_digest(data, buffers)
        if previous.get(name) == digest:
            continue
        pickle_chunks, new_bytes = write_bytes(chunk_root, data)
        written += new_bytes
        buffer_chunks = []
        for buffer in buffers:
            digests, new_bytes = write_bytes(chunk_root, buffer.raw())
            written += new_bytes
            buffer_chunks.append(digests)
        size = len(data) + sum(buffer.raw().nbytes for buffer in buffers)
        entries[name] = {
            **describe(value),
            "digest": digest,
            "pickle": pickle_chunks,
            "buffers": buffer_chunks,
            "size": size,
        }
    return {"entries": entries, "written": written}


def load(entry: dict[str, Any], chunk_root: Path) -> Any:
    """One value back from its entry (runs in the sandbox: this unpickles)."""
    if "module" in entry:
        return importlib.import_module(entry["module"])
    if "error" in entry:
        raise ValueError(f"it was not saved: {entry['error']}")
    data = read_bytes(chunk_root, entry["pickle"])
    buffers = [read_bytes(chunk_root, digests) for digests in entry["buffers"]]
    return pickle.loads(data, buffers=buffers)
