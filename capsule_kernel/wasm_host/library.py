"""The guest's library: protocol/, inside/ (never inside/worker/), cloudpickle and the shims, copied once.

A WASI preopen exposes whole directories, so the site-packages around these
files stay out of the guest's reach.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

# WASI errno values (wasi_snapshot_preview1).


def guest_library(cache: Path) -> Path:
    """The guest's read-only library: our pure-Python modules, cloudpickle and the shims.

    Copied once per version of their sources into the cache, since a WASI
    preopen exposes whole directories and the site-packages around these
    files must stay out of the guest's reach.
    """
    import cloudpickle

    package = Path(__file__).resolve().parents[1]
    # The package's __init__ and the public tasks alias, protocol/ and inside/ (never inside/worker/,
    # which needs the real CPython): the guest imports these as they are, from their own files.
    shipped = [package / "__init__.py", package / "tasks.py"]
    shipped += sorted((package / "protocol").glob("*.py")) + sorted((package / "inside").glob("*.py"))
    shipped += sorted((package / "inside" / "wasm_guest").glob("*.py"))
    files: dict[str, Path] = {f"capsule_kernel/{path.relative_to(package)}": path for path in shipped}
    shims = package / "inside" / "wasm_guest" / "shims"
    for path in sorted(shims.rglob("*.py")):
        files[str(path.relative_to(shims))] = path
    cloudpickle_dir = Path(cloudpickle.__file__).parent
    for path in sorted(cloudpickle_dir.glob("*.py")):
        files[f"cloudpickle/{path.name}"] = path
    hasher = hashlib.sha256()
    for name, source in sorted(files.items()):
        hasher.update(name.encode())
        hasher.update(source.read_bytes() if source else b"")
    target = cache / f"guest-{hasher.hexdigest()[:16]}"
    if target.is_dir():
        return target
    staging = cache / f".guest-{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    for name, source in files.items():
        destination = staging / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(source.read_bytes() if source else b"")
    try:
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another kernel won the race
    return target
