"""Completion and inspection in the Wasm guest: names, attributes, modules after import, dict keys, paths.

A part of Guest (a mixin over its namespace). It answers as IPython's
completer would (matches, cursor span, the _jupyter_types_experimental types),
with the standard library only: the guest has no IPython.
"""

from __future__ import annotations

import builtins
import os
import re
import sys
import types
from typing import Any

_IMPORT = re.compile(r"^\s*(?:import\s+(?:[\w.]+\s*,\s*)*|from\s+)[\w.]*$")

_FROM_IMPORT = re.compile(r"^\s*from\s+([\w.]+)\s+import\s+(?:\w+\s*,\s*)*\w*$")


def _module_names(prefix: str) -> list[str]:
    """Importable module names starting with prefix (a package's submodules after its dot)."""
    import importlib
    import pkgutil

    package, _, partial = prefix.rpartition(".")
    if package:
        try:
            parent = importlib.import_module(package)
        except Exception:  # noqa: BLE001 - nothing to complete
            return []
        names = [f"{package}.{module.name}" for module in pkgutil.iter_modules(getattr(parent, "__path__", None) or [])]
        # A module's modules too (os.path), as IPython offers them.
        names += [f"{package}.{name}" for name, value in vars(parent).items() if isinstance(value, types.ModuleType)]
    else:
        names = [*sys.builtin_module_names, *(module.name for module in pkgutil.iter_modules())]
    hidden = not partial.startswith("_")
    return [
        name for name in names if name.startswith(prefix) and not (hidden and name.rpartition(".")[2].startswith("_"))
    ]


def _module_members(module_name: str, prefix: str) -> list[str]:
    """What `from MODULE import PREFIX` may name: the module's public names and its submodules."""
    import importlib

    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - nothing to complete
        return []
    names = set(dir(module)) | {name.rpartition(".")[2] for name in _module_names(module_name + ".")}
    return [name for name in names if name.startswith(prefix) and (prefix.startswith("_") or not name.startswith("_"))]


_KEY = re.compile(r"(?P<head>[A-Za-z_][\w.]*)\[\s*(?P<quote>['\"])(?P<prefix>[^'\"]*)$")

_QUOTED = re.compile(r"(?P<quote>['\"])(?P<prefix>[^'\"]*)$")


def _dict_keys(head: str, prefix: str, namespace: dict[str, Any]) -> list[str]:
    """The string keys of the mapping `head` names (looked up, never called) that start with prefix."""
    value: Any = namespace.get(head.split(".")[0])
    for part in head.split(".")[1:]:
        value = getattr(value, part, None)
    try:
        keys = list(value.keys()) if hasattr(value, "keys") else []
    except Exception:  # noqa: BLE001 - nothing to complete
        return []
    return [key for key in keys if isinstance(key, str) and key.startswith(prefix)]


def _paths(prefix: str) -> list[str]:
    """Files and directories (with a slash) the guest can see that start with prefix."""
    directory, _, partial = prefix.rpartition("/")
    try:
        entries = os.listdir(directory or ".")
    except OSError:
        return []
    found = []
    for entry in entries:
        if entry.startswith(partial) and (partial.startswith(".") or not entry.startswith(".")):
            path = f"{directory}/{entry}" if directory else entry
            found.append(path + "/" if os.path.isdir(path) else path)
    return found


def _completion_reply(candidates: list[str], start: int, cursor: int, type_of: Any) -> dict[str, Any]:
    """A complete_reply as IPython gives JupyterLab: the matches, and one typed entry per match."""
    matches = sorted(set(candidates))[:500]
    typed = [{"start": start, "end": cursor, "text": m, "type": type_of(m), "signature": ""} for m in matches]
    return {
        "status": "ok",
        "matches": matches,
        "cursor_start": start,
        "cursor_end": cursor,
        "metadata": {"_jupyter_types_experimental": typed},
    }


def _completion_type(match: str, namespace: dict[str, Any]) -> str:
    """IPython's words for a match's kind: module, class, function, keyword, instance."""
    import keyword

    if keyword.iskeyword(match):
        return "keyword"
    head, *rest = match.split(".")
    value: Any = namespace.get(head, getattr(builtins, head, None))
    if value is None:
        return "module" if head in sys.modules or not rest else "instance"
    for part in rest:
        value = getattr(value, part, None)
    if isinstance(value, types.ModuleType):
        return "module"
    if isinstance(value, type):
        return "class"
    if callable(value):
        return "function"
    return "instance"


class GuestCompletion:
    """complete() and inspect() for the guest's namespace."""

    def complete(self, code: str, cursor: int) -> dict[str, Any]:
        """Names and attributes, as rlcompleter would (the WASI build lacks it: no readline); modules after import."""
        import keyword

        token = re.search(r"[\w.]*$", code[:cursor]).group(0)  # type: ignore[union-attr]
        line = code[:cursor].rpartition("\n")[2]
        imported = _FROM_IMPORT.match(line)
        key = _KEY.search(line)
        quoted = _QUOTED.search(line)
        if key or quoted:
            # Inside a string: a mapping's keys after d[', else paths, as IPython offers them.
            prefix = (key or quoted).group("prefix")  # type: ignore[union-attr]
            found = _dict_keys(key.group("head"), prefix, self.namespace) if key else _paths(prefix)
            kind = "dict key" if key else "path"
            return _completion_reply(found, cursor - len(prefix), cursor, lambda _: kind)
        if _IMPORT.match(line):
            # As IPython's module completer: module names, not the namespace's (import o -> os, not object).
            candidates = _module_names(token)
        elif imported:
            candidates = _module_members(imported.group(1), token)
        elif "." in token:
            head, _, prefix = token.rpartition(".")
            try:
                value = eval(head, self.namespace)
            except Exception:  # noqa: BLE001 - nothing to complete
                value, candidates = None, []
            else:
                candidates = [f"{head}.{name}" for name in dir(value) if name.startswith(prefix)]
            if prefix and not prefix.startswith("_"):
                candidates = [c for c in candidates if not c.rpartition(".")[2].startswith("_")]
        else:
            names = set(self.namespace) | set(dir(builtins)) | set(keyword.kwlist)
            candidates = [name for name in names if name.startswith(token) and not name.startswith("__")]
        return _completion_reply(
            candidates, cursor - len(token), cursor, lambda match: _completion_type(match, self.namespace)
        )

    def inspect(self, code: str, cursor: int, detail_level: int) -> dict[str, Any]:
        import inspect

        before = re.search(r"[\w.]*$", code[:cursor]).group(0)  # type: ignore[union-attr]
        after = re.match(r"\w*", code[cursor:]).group(0)  # type: ignore[union-attr]
        dotted = (before + after).strip(".")
        if not dotted:
            return {"status": "ok", "data": {}, "metadata": {}, "found": False}
        head, *rest = dotted.split(".")
        if head in self.namespace:
            value = self.namespace[head]
        elif hasattr(builtins, head):
            value = getattr(builtins, head)
        else:
            return {"status": "ok", "data": {}, "metadata": {}, "found": False}
        for part in rest:
            value = getattr(value, part)
        lines = [f"Type:      {type(value).__name__}", f"String form: {repr(value)[:200]}"]
        try:
            lines.append(f"Signature: {dotted}{inspect.signature(value)}")
        except (TypeError, ValueError):
            pass
        doc = inspect.getdoc(value)
        if doc:
            lines.append("Docstring:\n" + doc)
        if detail_level and callable(value):
            try:
                lines.append("Source:\n" + inspect.getsource(value))
            except (OSError, TypeError):
                pass
        return {"status": "ok", "data": {"text/plain": "\n".join(lines)}, "metadata": {}, "found": True}
