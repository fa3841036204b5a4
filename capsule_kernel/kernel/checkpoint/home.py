"""Where a store lives and who it serves: CAPSULE_HOME, the session and notebook names, the store's key.

Below the store's parts (store.py, sandbox_rows.py, chunk_intake.py), so none imports another back.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Mapping
from pathlib import Path


def default_home(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    if environ.get("CAPSULE_HOME"):
        return Path(environ["CAPSULE_HOME"])
    import platformdirs

    return Path(platformdirs.user_data_dir("capsule-kernel"))


def session_identity(environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Who this notebook is, and how we know: the frontend's path, or a fresh id."""
    environ = os.environ if environ is None else environ
    if environ.get("JPY_SESSION_NAME"):
        return environ["JPY_SESSION_NAME"], "JPY_SESSION_NAME (the notebook's path)"
    if environ.get("CAPSULE_SESSION"):
        return environ["CAPSULE_SESSION"], "CAPSULE_SESSION"
    return f"session-{uuid.uuid4().hex[:12]}", "fresh id (set CAPSULE_SESSION to reuse the session later)"


def notebook_identity(session: str, environ: Mapping[str, str] | None = None) -> str:
    """Which notebook a kernel serves: the operator's CAPSULE_NOTEBOOK, else the session it starts in.

    The batch runner names a run's notebook (its output path) apart from
    each attempt's session, so a resumed run may switch into its dead
    attempt's session: that session's owner is the same notebook.
    """
    environ = os.environ if environ is None else environ
    return environ.get("CAPSULE_NOTEBOOK") or session


KEY_FILE = "checkpoint.key"


def store_key(home: Path) -> bytes:
    """The key that authenticates checkpoint rows: made once, readable by the kernel's user only.

    It lives in CAPSULE_HOME, which no sandbox can see; a row rewritten in
    capsule.sqlite by anything without it fails verification.
    """
    path = home / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < 32:
            raise OSError(f"{path} is not a Capsule checkpoint key") from None
        return key
    key = secrets.token_bytes(32)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key
