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

import copyreg
import functools
import hashlib
import importlib
import io
import pickle
import re
import reprlib
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle

from capsule_kernel.protocol.chunks import (
    ChunkSource,
    ChunkWriter,
    Mapper,
    chunk_digest,
    map_bytes,
    pieces,
    read_bytes,
)
from capsule_kernel.protocol.peeks import EVERY_NAME, OPAQUE_NAMES, PEEK_CALLS, PLAIN_TYPES

_IPYTHON_NAMES = re.compile(r"^(_+|_i+|_i\d+|_\d+|_ih|_oh|_dh|In|Out|exit|quit|get_ipython)$")
# Values whose pickle is smaller than this are re-hashed after every cell, so
# an in-place change nobody named (through an object shared inside another
# value, a library's callback) is still caught. Larger values are re-hashed
# when the cell names them, rebinds them, or calls a notebook function that
# names them (names_reached). Small enough that re-hashing them costs a cell
# well under a millisecond, so every cell can afford its own checkpoint.
SMALL_VALUE_BYTES = 64 * 1024
# How many names a cell's calls are followed to, at most (then: every name).
_MAX_REACHED = 4096
# A name bound to the same object as an earlier name is saved as an alias of
# it, so `b = a` comes back as one object, not two copies. Values whose
# identity nobody can observe (numbers, strings, modules) are left alone.
ALIAS = "alias:"
_IDENTITY_FREE = (type(None), bool, int, float, complex, str, bytes, types.ModuleType)
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


class NotHere(Exception):
    """A value the worker does not pickle itself (Budget): too large, or its pickling may run the notebook's code."""


class Budget:
    """Bytes a snapshot taken in the worker itself may still pickle before it gives up (NotHere)."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def spend(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise NotHere


# Types whose pickling runs no code of the notebook's. The pickler does not even ask about exact
# ints, floats, strings, bytes, lists, tuples, dicts, sets and frozensets; functions and classes
# are cloudpickle's (it walks their code and globals, calling nothing of theirs).
_PICKLED_WITHOUT_USER_CODE = frozenset(
    {
        complex, bytearray, range, slice, type(None), type(Ellipsis),
        types.FunctionType, types.BuiltinFunctionType, types.CodeType, types.CellType, types.ModuleType,
    }
)  # fmt: skip
# numpy's own arrays, scalars and dtypes pickle in C.
_NUMPY_MODULES = ("numpy", "numpy.dtypes")


# What a class may define that makes pickling its instances run its own code.
_CUSTOM_PICKLING = frozenset(
    {"__reduce__", "__reduce_ex__", "__getstate__", "__getnewargs__", "__getnewargs_ex__", "__getattr__",
     "__getattribute__"}
)  # fmt: skip


class _HerePickler(cloudpickle.Pickler):
    """cloudpickle for the worker's own snapshots: anything whose pickling could run a notebook's
    __reduce__ or __getstate__ (a class of its that defines one, a subclass of a builtin) is left to a
    forked child, where a slow or side-effecting one can neither delay the reply nor touch the namespace."""

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if (
            kind in _PICKLED_WITHOUT_USER_CODE
            or isinstance(obj, type)
            or kind.__module__ in _NUMPY_MODULES
            or _by_cloudpickle(kind)
            or _plain_instance(kind)
        ):
            return super().reducer_override(obj)
        raise NotHere


def _by_cloudpickle(kind: type) -> bool:
    """Types cloudpickle reduces with code of its own (a mappingproxy, a property, a method), files
    excepted: it reads an open file's contents, which may be any size."""
    return kind in cloudpickle.Pickler._dispatch_table and not issubclass(kind, io.IOBase)


@functools.lru_cache(maxsize=1024)
def _plain_instance(kind: type) -> bool:
    """Instances pickle as their class and __dict__ (or slots), by the interpreter alone: a plain
    Python class (a dataclass, say) on `object`, with no pickling hook, attribute hook, metaclass
    or copyreg reducer of its own. Asked once per class."""
    if type(kind) is not type or kind in copyreg.dispatch_table:
        return False
    bases = kind.__mro__[:-1]
    return kind.__mro__[-1] is object and all(
        base.__module__ != "builtins"
        and not _CUSTOM_PICKLING.intersection(vars(base))
        and _plain_dict(vars(base).get("__dict__"))
        for base in bases
    )


def _plain_dict(attribute: Any) -> bool:
    """A class's `__dict__` is the interpreter's descriptor (or absent: slots), not a property of its own."""
    return attribute is None or isinstance(attribute, types.GetSetDescriptorType)


class _CappedFile(io.BytesIO):
    """A pickle's output that stops it past its budget: the C pickler writes each 64 KiB frame as it ends."""

    def __init__(self, budget: Budget) -> None:
        super().__init__()
        self.budget = budget

    def write(self, data: Any) -> int:
        self.budget.spend(memoryview(data).nbytes)
        return super().write(data)


def snapshot_value(value: Any, budget: Budget | None = None) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """A value's pickle and out-of-band buffers; with a budget (the worker's own snapshot), NotHere
    as soon as they pass it or meet a value whose pickling may run the notebook's code."""
    buffers: list[pickle.PickleBuffer] = []
    if budget is None:
        data = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
        return data, buffers

    def keep(buffer: pickle.PickleBuffer) -> None:
        budget.spend(buffer.raw().nbytes)
        buffers.append(buffer)

    out = _CappedFile(budget)
    _HerePickler(out, protocol=5, buffer_callback=keep).dump(value)
    return out.getvalue(), buffers


def _raw(buffer: Any) -> memoryview | bytes:
    return buffer.raw() if isinstance(buffer, pickle.PickleBuffer) else buffer


def chunk_layout(
    data: bytes, buffers: list[Any], mapper: Mapper = map, name_chunk: Callable[[memoryview], str] | None = None
) -> tuple[str, list[str], list[list[str]]]:
    """The value's digest and the names of its chunks, each byte hashed once.

    The value's digest is a hash of its chunk names (a Merkle list), so
    finding out whether a 900 MB list of arrays changed costs one pass of
    SHA-256 over it, and that pass already names the chunks to store.
    `name_chunk` replaces plain hashing (a ChunkWriter also stores each
    chunk); all pieces of the value go through `mapper` in one batch.
    """
    parts = [pieces(data), *(pieces(_raw(buffer)) for buffer in buffers)]
    names = iter(mapper(name_chunk or chunk_digest, [piece for part in parts for piece in part]))
    pickle_chunks, *buffer_chunks = [[next(names) for _ in part] for part in parts]
    listing = "\n".join(",".join(chunks) for chunks in [pickle_chunks, *buffer_chunks])
    return hashlib.sha256(listing.encode()).hexdigest(), pickle_chunks, buffer_chunks


def pickled(
    namespace: dict[str, Any],
    names: list[str],
    previous: dict[str, str],
    mapper: Mapper = map,
    aliases: dict[str, str] | None = None,
    name_chunk: Callable[[memoryview], str] | None = None,
    budget: Budget | None = None,
) -> Iterator[tuple[str, dict[str, Any], bytes | None, list[pickle.PickleBuffer]]]:
    """Each named value as (name, entry, pickle, buffers); unchanged ones (same digest) left out.

    Modules, aliases (`aliases`: name -> the name bound to the same object)
    and values that refuse pickling come with pickle None and an entry that
    says so. Shared by the subprocess sandbox (which writes chunks itself)
    and the Wasm guest (which hands the bytes to its host). The entry names
    the chunks the bytes split into; `mapper` may hash them in parallel,
    and `name_chunk` may store each one as it hashes it (chunk_layout).
    With a `budget`, NotHere (snapshot_value).
    """
    aliases = aliases or {}
    for name in names:
        if name not in namespace:
            continue
        value = namespace[name]
        if name in aliases:
            digest = ALIAS + aliases[name]  # the target's own entry holds the content
            if previous.get(name) != digest:
                yield name, {**describe(value), "alias": aliases[name], "digest": digest, "size": 0}, None, []
            continue
        if isinstance(value, types.ModuleType):
            digest = f"module:{value.__name__}"  # re-imported by name: the name is its content
            if previous.get(name) != digest:
                entry = {"module": value.__name__, "type": "module", "repr": f"<module {value.__name__}>"}
                yield name, {**entry, "digest": digest, "size": 0}, None, []
            continue
        try:
            data, buffers = snapshot_value(value, budget)
        except NotHere:
            raise
        except Exception as err:  # noqa: BLE001 - any value may refuse pickling; say why
            yield name, {**describe(value), "error": f"{type(err).__name__}: {err}"}, None, []
            continue
        digest, pickle_chunks, buffer_chunks = chunk_layout(data, buffers, mapper, name_chunk)
        if previous.get(name) == digest:
            continue
        size = len(data) + sum(buffer.raw().nbytes for buffer in buffers)
        entry = {**describe(value), "digest": digest, "size": size, "pickle": pickle_chunks, "buffers": buffer_chunks}
        yield name, entry, data, buffers


def take(
    namespace: dict[str, Any],
    names: list[str],
    previous: dict[str, str],
    chunk_root: Path,
    mapper: Mapper = map,
    aliases: dict[str, str] | None = None,
    known: dict[str, str] | None = None,
    *,
    durable: bool = True,
    budget: Budget | None = None,
) -> dict[str, Any]:
    """Snapshot the given names into chunk files (`durable=False`: into a spool the kernel copies from).

    Each chunk is stored as soon as it is hashed (a ChunkWriter), so the
    disk writes while other chunks are still being hashed. Chunks of a value
    found unchanged are already in the store and are not written again.
    `known` maps fingerprints of large chunks to their names (ChunkWriter).
    Returns {"entries": {name: entry}, "written": bytes newly stored,
    "fingerprints": those of the large chunks seen, for next time}.
    With a `budget`, NotHere (snapshot_value; the chunks written
    until then stay in the spool, unnamed: the kernel never adopts them).
    """
    writer = ChunkWriter(chunk_root, known, durable=durable)
    values = pickled(namespace, names, previous, mapper, aliases, name_chunk=writer, budget=budget)
    entries = {name: entry for name, entry, _, _ in values}
    return {"entries": entries, "written": writer.written, "fingerprints": writer.seen}


def alias_targets(namespace: dict[str, Any], names: list[str]) -> dict[str, str]:
    """Each name bound to the same object as an earlier name -> that earlier name.

    "Earlier" is namespace order (the order names were first bound), so the
    target of a group stays put while its names are only rebound.
    """
    first: dict[int, str] = {}
    targets = {}
    for name in names:
        value = namespace[name]
        if isinstance(value, _IDENTITY_FREE):
            continue
        target = first.setdefault(id(value), name)
        if target != name:
            targets[name] = target
    return targets


def _recorded_alias(digest: str | None) -> str | None:
    return digest[len(ALIAS) :] if digest and digest.startswith(ALIAS) else None


def names_changed_by(namespace: dict[str, Any], candidates: list[str], peeks: list[str]) -> list[str]:
    """What a cell's checkpoint must look at: its candidates, minus plain values it only
    peeked at, plus what its notebook functions reach (names_reached)."""
    skipped: set[str] = set()
    if not PEEK_CALLS.intersection(namespace):  # len(x) is the builtin's, not a notebook function
        skipped = {name for name in peeks if name in namespace and _plain(namespace[name])}
    return sorted(names_reached(namespace, [name for name in candidates if name not in skipped]))


def _plain(value: Any) -> bool:
    kind = type(value)
    return kind in PLAIN_TYPES or (kind.__name__ == "ndarray" and kind.__module__ == "numpy")


def names_reached(namespace: dict[str, Any], candidates: list[str] | set[str]) -> set[str]:
    """The names a cell may have changed: those it names, and the globals its notebook functions name.

    A cell calling `add()`, where the notebook's `add` appends to a global
    list, changes that list without naming it. Followed through functions,
    methods, partials, notebook classes and their instances' classes, to the
    names their code (and its nested code) mentions, transitively. A cell
    that reads globals(), exec, eval or the like may touch anything: then
    every name.
    """
    if EVERY_NAME in candidates:
        return set(namespace)
    reached = set(candidates)
    stack = [name for name in reached if name in namespace]
    while stack:
        for code in _code_of(namespace[stack.pop()], namespace):
            for name in code.co_names:
                if name in OPAQUE_NAMES:
                    return set(namespace)  # a notebook function using globals() or exec
                if name in namespace and name not in reached:
                    if len(reached) >= _MAX_REACHED:
                        return set(namespace)
                    reached.add(name)
                    stack.append(name)
    return reached


def _code_of(value: Any, namespace: dict[str, Any]) -> Iterator[types.CodeType]:
    """The code objects of a notebook-defined callable (or of an instance's notebook class)."""
    if isinstance(value, functools.partial):
        value = value.func
    if isinstance(value, types.MethodType):
        value = value.__func__
    if isinstance(value, types.FunctionType):
        if value.__globals__ is namespace:
            yield from _nested(value.__code__)
        return
    kind = value if isinstance(value, type) else type(value)
    if kind in PLAIN_TYPES:
        return  # a list, a dict, a number: no notebook code
    attributes = [attribute for base in kind.__mro__[:-1] for attribute in list(vars(base).values())]
    for attribute in attributes:  # a method is the notebook's when its globals are the namespace
        function = getattr(attribute, "__func__", attribute)  # staticmethod, classmethod
        if isinstance(function, property):
            function = function.fget
        if isinstance(function, types.FunctionType) and function.__globals__ is namespace:
            yield from _nested(function.__code__)


def _nested(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _nested(const)


def changed_names(
    namespace: dict[str, Any],
    hidden: set[str],
    known_ids: dict[str, int],
    sizes: dict[str, int],
    digests: dict[str, str],
    candidates: list[str],
) -> tuple[list[str], list[str], dict[str, int], dict[str, str]] | None:
    """What the next snapshot must look at: (names to pickle, names removed, ids now, aliases).

    A name is looked at when it was rebound (a new object), when the cell
    named it, when it is small enough to re-hash every time (an in-place
    change nobody named), when it was never saved, or when it became or
    stopped being an alias. When any name of an alias group is looked at,
    so is the group's target: a change made through `b` is a change of `a`.
    None: nothing can have changed.
    """
    names = saveable_names(namespace, hidden)
    current = {name: id(namespace[name]) for name in names}
    # Names saved before (digests) count too: after a failed snapshot known_ids is empty.
    removed = sorted(name for name in {*known_ids, *digests} if name not in current)
    wanted = set(candidates)
    targets = alias_targets(namespace, names)
    todo = {
        name
        for name in names
        if known_ids.get(name) != current[name]
        or name in wanted
        or name not in digests
        or targets.get(name) != _recorded_alias(digests.get(name))
        or (name not in targets and sizes.get(name, 0) < SMALL_VALUE_BYTES)
    }
    todo.update(targets[name] for name in list(todo) if name in targets)
    if not todo and not removed:
        return None
    ordered = [name for name in names if name in todo]
    return ordered, removed, current, {name: targets[name] for name in ordered if name in targets}


def load_all(
    entries: dict[str, Any],
    namespace: dict[str, Any],
    load_one: Callable[[dict[str, Any]], Any],
    merge: bool,
    explain: Callable[[BaseException], str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Load entries into a namespace, aliases last; return (restored names, failures by name).

    `load_one(entry)` brings back one value. An alias is bound to its
    target's restored object; when merging (not replacing), a target not
    among the entries is the one the namespace holds already. `explain`
    words a failure (default: explain_failure).
    """
    explain = explain or explain_failure
    restored, failed = [], {}
    plain = {name: entry for name, entry in entries.items() if "alias" not in entry}
    for name, entry in plain.items():
        try:
            namespace[name] = load_one(entry)
        except Exception as err:  # noqa: BLE001 - one value that cannot come back must not stop the others
            failed[name] = explain(err)
            namespace.pop(name, None)
            continue
        restored.append(name)
    for name, entry in entries.items():
        if name in plain:
            continue
        target = entry["alias"]
        if target in restored or (merge and target not in entries and target in namespace):
            namespace[name] = namespace[target]
            restored.append(name)
        else:
            why = failed.get(target, "it is not in the checkpoint")
            failed[name] = f"it is the same object as {target}, which could not be restored ({why})"
            namespace.pop(name, None)
    return restored, failed


def explain_failure(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


# What a value made in the Wasm sandbox may be built from when it is loaded outside Wasm:
# data, never code. Anything else (a function, a class, a __reduce__ that calls
# something) is refused by name; the value is reported as not brought over.
DATA_ONLY_TYPES = frozenset(
    [
        ("builtins", name)
        for name in (
            "dict",
            "list",
            "tuple",
            "set",
            "frozenset",
            "str",
            "bytes",
            "bytearray",
            "int",
            "float",
            "complex",
            "bool",
            "slice",
            "range",
            "NoneType",
            "Ellipsis",
            "NotImplemented",
        )
    ]
    + [("collections", name) for name in ("OrderedDict", "defaultdict", "deque", "Counter")]
    + [("datetime", name) for name in ("date", "time", "datetime", "timedelta", "timezone")]
    + [("decimal", "Decimal"), ("fractions", "Fraction"), ("uuid", "UUID"), ("uuid", "SafeUUID")]
    + [("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")]
)
MADE_IN_WASM = "wasm"
# Inside the Wasm guest its own values load as they were made; the rule is for every other sandbox.
_OUTSIDE_WASM = sys.platform != "wasi"


class DataOnlyUnpickler(pickle.Unpickler):
    """Loads pickles made in the Wasm sandbox as inert data (DATA_ONLY_TYPES), refusing everything else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in DATA_ONLY_TYPES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"it was made in the Wasm sandbox and may cross only as data; it needs {module}.{name}"
        )


def _module(entry: dict[str, Any]) -> Any:
    """A module entry: a dotted name, and for a value made in Wasm a standard-library one."""
    name = entry["module"]
    if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
        raise ValueError(f"{name!r} is not a module name")
    wasm_made = entry.get("made_in") == MADE_IN_WASM and _OUTSIDE_WASM
    if wasm_made and name.split(".")[0] not in sys.stdlib_module_names:
        raise ValueError(f"it was made in the Wasm sandbox, which imports only the standard library, not {name}")
    return importlib.import_module(name)


_CLOUDPICKLE = "cloudpickle.cloudpickle"


class NotebookUnpickler(pickle.Unpickler):
    """Functions defined in the notebook come back living in the notebook's namespace.

    cloudpickle saves a notebook function with a copy of the globals it
    reads and, on loading, gives it a fresh dict of them: a restored `bump()`
    would then change a private copy of `counter`, never the notebook's, and
    a widget's restored callback would append to a list nobody sees. Here a
    function whose globals were the notebook's (`__name__ == "__main__"`)
    gets `home` as its globals, and the values saved with it fill in only
    names `home` lacks (the notebook's own, restored by name, win).
    """

    def __init__(self, data: bytes, buffers: list[Any], home: dict[str, Any]) -> None:
        super().__init__(io.BytesIO(data), buffers=buffers)
        self.home = home

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if module == _CLOUDPICKLE and name == "_make_function":
            return self._make_function(found)
        if module == _CLOUDPICKLE and name == "_function_setstate":
            return self._function_setstate(found)
        return found

    def _make_function(self, make: Callable[..., Any]) -> Callable[..., Any]:
        home = self.home

        def make_function(code: Any, globals_: dict[str, Any], *args: Any) -> Any:
            return make(code, home if globals_.get("__name__") == "__main__" else globals_, *args)

        return make_function

    def _function_setstate(self, setstate: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        home = self.home

        def function_setstate(function: Any, state: Any) -> None:
            if function.__globals__ is not home:
                setstate(function, state)
                return
            attributes, slots = state
            saved = slots["__globals__"]
            slots["__globals__"] = {key: value for key, value in saved.items() if key not in home}
            builtins_before = home.get("__builtins__")
            setstate(function, (attributes, slots))
            if builtins_before is not None:
                home["__builtins__"] = builtins_before  # cloudpickle sets its own module's

        return function_setstate


def _unpickle(entry: dict[str, Any], data: bytes, buffers: list[Any], home: dict[str, Any] | None = None) -> Any:
    if entry.get("made_in") == MADE_IN_WASM and _OUTSIDE_WASM:
        return DataOnlyUnpickler(io.BytesIO(data), buffers=buffers).load()
    if home is not None:
        return NotebookUnpickler(data, buffers, home).load()
    return pickle.loads(data, buffers=buffers)


def load(
    entry: dict[str, Any], chunk_root: Path | ChunkSource, mapper: Mapper = map, home: dict[str, Any] | None = None
) -> Any:
    """One value back from its entry (runs in the sandbox: this unpickles); `home`: the notebook's namespace."""
    if "module" in entry:
        return _module(entry)
    if "error" in entry:
        raise ValueError(f"it was not saved: {entry['error']}")
    data = read_bytes(chunk_root, entry["pickle"], mapper)
    # Large buffers (arrays, frames) are mapped copy-on-write from their chunk files, not copied.
    buffers = [map_bytes(chunk_root, digests, mapper) for digests in entry["buffers"]]
    return _unpickle(entry, data, buffers, home)


def load_bytes(entry: dict[str, Any], data: bytes | None, buffers: list[Any]) -> Any:
    """One value back from bytes already read (the Wasm guest gets them from its host)."""
    if "module" in entry:
        return _module(entry)
    if "error" in entry:
        raise ValueError(f"it was not saved: {entry['error']}")
    if data is None:
        raise ValueError(entry.get("unreadable", "its bytes could not be read"))
    return _unpickle(entry, data, buffers)
