"""What one task is: its options (checked against the operator's policy), its code, and its key.

Runs in the KERNEL. A ``%%capsule task`` cell and a ``@task`` call both end
up as a TaskSpec: the body (source text the kernel never runs), the sandbox
kind, the task's limits (the notebook's, narrowed or raised within the
operator's ceilings), the retry rule and the names it reads. The key that
makes a task run once per set of inputs is a hash of what changes its
result: name, body, kind, mounts and the digests of its input values.
"""

from __future__ import annotations

import ast
import hashlib
import json
import keyword
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from IPython.core.inputtransformer2 import TransformerManager

from capsule_kernel.kernel.policy import Policy, PolicyRefused
from capsule_kernel.kernel.sandbox.held_mounts import HeldMounts
from capsule_kernel.kernel.settings import RETRYABLE_ERRORS, TASK_LIMITS, TaskSettings
from capsule_kernel.protocol.limits import LimitError, Limits, parse_count, parse_duration

# Names the task's code uses in its sandbox (dunder names: never checkpointed, never the user's).
RETURN_CLASS = "__capsule_task_return__"
RESULT_NAME = "__capsule_task_result__"
EMIT_NAME = "__capsule_task_emit__"
RESULT_MIME = "application/vnd.capsule.task-result+json"
# Words of `%%capsule task` that are actions, not task names.
ACTIONS = ("wait", "cancel")


class TaskRefused(ValueError):
    """The task cannot be run as asked (a bad option, or one the operator's policy refuses)."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    body: str  # the cell's body as typed, or a description of a @task call
    code: str  # what the task sandbox runs (see task_code)
    kind: str  # "wasm" or "subprocess"
    limits: Limits
    retries: int
    backoff: float
    backoff_max: float
    retry_on: frozenset[str]
    inputs: tuple[str, ...]
    inputs_explicit: bool
    mounts: tuple[tuple[str, bool], ...] = ()
    given_key: str | None = None
    rerun: bool = False
    background: bool = False
    bind: bool = True  # bind the result to NAME (a @task call returns it to its caller instead)
    refusal: str | None = None  # why the chosen sandbox cannot run it: the task fails as `refused`
    options: dict[str, Any] = field(default_factory=dict)  # as given, for the record
    record_key: str | None = None  # a key already made (a record's, run again): used as it is

    def key(self, input_digests: Mapping[str, str], scope: str) -> str:
        """The task's identity: the same key means the same result.

        `scope` is the notebook's view (TaskScheduler.scope): notebook,
        session, working directory, mounts, the operator's policy. A record
        answers only the view that made it, so one notebook never receives,
        or replaces, another's result; `--id NAME` names a key within it.
        """
        if self.record_key:
            return self.record_key
        identity: dict[str, Any] = {"scope": scope}
        if self.given_key:
            identity["id"] = self.given_key
        else:
            identity |= {
                "name": self.name,
                "body": self.body,
                "kind": self.kind,
                "mounts": [list(m) for m in self.mounts],
                "inputs": dict(sorted(input_digests.items())),
            }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]

    def to_json(self) -> dict[str, Any]:
        """What the task record keeps, so a later kernel can run it again (resume)."""
        return {
            "name": self.name,
            "body": self.body,
            "code": self.code,
            "kind": self.kind,
            "limits": self.limits.to_json(),
            "retries": self.retries,
            "backoff": self.backoff,
            "backoff_max": self.backoff_max,
            "retry_on": sorted(self.retry_on),
            "inputs": list(self.inputs),
            "inputs_explicit": self.inputs_explicit,
            "mounts": [list(m) for m in self.mounts],
            "given_key": self.given_key,
            "options": self.options,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskSpec:
        return cls(
            name=str(data["name"]),
            body=str(data["body"]),
            code=str(data["code"]),
            kind=str(data["kind"]),
            limits=Limits.from_json(data["limits"]),
            retries=int(data["retries"]),
            backoff=float(data["backoff"]),
            backoff_max=float(data["backoff_max"]),
            retry_on=frozenset(data["retry_on"]),
            inputs=tuple(data["inputs"]),
            inputs_explicit=bool(data["inputs_explicit"]),
            mounts=tuple((str(p), bool(w)) for p, w in data["mounts"]),
            given_key=data.get("given_key"),
            options=dict(data.get("options", {})),
        )


def check_name(name: str) -> str:
    if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("__") or name in ACTIONS:
        raise TaskRefused(f"{name!r} cannot name a task: it must be a Python identifier (not wait or cancel)")
    return name


def build(
    policy: Policy,
    *,
    held: HeldMounts | None = None,
    name: str,
    body: str,
    code: str,
    default_kind: str,
    options: Mapping[str, Any],
) -> TaskSpec:
    """A TaskSpec from options in the ``%%capsule task`` vocabulary; TaskRefused says what is wrong.

    ``default_kind`` is the kind when no --sandbox option and no
    ``[tasks] sandbox`` decide; the operator's policy has the last word.
    """
    settings: TaskSettings = policy.settings.tasks
    check_name(name)
    kind = default_kind
    if options.get("sandbox"):
        kind = str(options["sandbox"])
    elif settings.sandbox:
        kind = settings.sandbox
    if kind not in ("wasm", "subprocess"):
        raise TaskRefused(f"--sandbox {kind}: a task runs in wasm or subprocess")
    changes: dict[str, Any] = dict(settings.limits)
    for limit in TASK_LIMITS:
        if options.get(limit) is not None:
            changes[limit] = options[limit]
    if options.get("allowed_hosts") is not None:
        # A narrower network for this task: checked against the operator's, as every task limit is.
        changes["network"] = _words(options["allowed_hosts"])
    presets = dict(settings.compute)
    compute = options.get("compute")
    if compute is not None:
        if options.get("fuel") is not None:
            raise TaskRefused("--fuel and --compute say the same thing: give one")
        if compute not in presets:
            raise TaskRefused(f"--compute {compute}: one of {', '.join(presets)}")
        changes["fuel"] = presets[compute]
    try:
        policy.check_task_sandbox(kind)
        limits = policy.task_limits(changes)
        retries = parse_count(_given(options, "retries", settings.retries)) or 0
        backoff = parse_duration(_given(options, "backoff", settings.backoff)) or 0.0
    except (LimitError, PolicyRefused) as err:
        raise TaskRefused(str(err)) from None
    retry_on = options.get("retry_on")
    kinds = frozenset(settings.retry_on) if retry_on is None else frozenset(_words(retry_on))
    unknown = sorted(kinds - set(RETRYABLE_ERRORS))
    if unknown:
        raise TaskRefused(f"--retry-on {','.join(unknown)}: known are {', '.join(RETRYABLE_ERRORS)}")
    mounts = []
    for raw in options.get("mount") or ():
        path, _, access = str(raw).partition(":")
        writable = access == "rw"
        if access not in ("", "rw", "ro"):
            raise TaskRefused(f"--mount {raw}: a host directory, optionally :rw or :ro")
        try:
            # Held open from now on: the task's launch binds this directory, whatever the path becomes.
            target = held.hold(Path(path).expanduser()) if held is not None else Path(path).expanduser().resolve()
        except OSError as err:
            raise TaskRefused(f"--mount {raw}: a host directory, optionally :rw or :ro ({err})") from None
        try:
            policy.check_mount(target, writable)
        except PolicyRefused as err:
            raise TaskRefused(str(err)) from None
        mounts.append((str(target), writable))
    inputs = options.get("inputs")
    given_key = options.get("id")
    return TaskSpec(
        name=name,
        body=body,
        code=code,
        kind=kind,
        limits=limits,
        retries=retries,
        backoff=backoff,
        backoff_max=settings.backoff_max,
        retry_on=kinds,
        inputs=tuple(_words(inputs)) if inputs is not None else (),
        inputs_explicit=inputs is not None,
        mounts=tuple(mounts),
        given_key=str(given_key) if given_key else None,
        rerun=bool(options.get("rerun")),
        background=bool(options.get("background")),
        options={k: v for k, v in options.items() if v not in (None, False, [], ())},
    )


def _given(options: Mapping[str, Any], name: str, default: Any) -> Any:
    value = options.get(name)
    return default if value is None else value


def _words(value: Any) -> list[str]:
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


# -- the code a task sandbox runs ---------------------------------------------------------


_transformer = TransformerManager()


def python_source(body: str) -> str:
    """The body as plain Python: IPython's transforms (magics, !shell) applied where it needs them."""
    try:
        compile(body, "<task>", "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        return body
    except (SyntaxError, ValueError):
        return _transformer.transform_cell(body)


class _TopLevelReturns(ast.NodeVisitor):
    """The `return` statements of the body itself (not of functions or classes it defines)."""

    def __init__(self) -> None:
        self.found: list[ast.Return] = []

    def visit_Return(self, node: ast.Return) -> None:
        self.found.append(node)

    def _skip(self, node: ast.AST) -> None:  # noqa: ARG002 - a visitor method: the node is not entered
        return None

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = _skip


def task_code(body: str) -> str:
    """The body, changed in place so that its result can be read after it ran, line numbers kept.

    A top-level ``return X`` becomes ``raise __capsule_task_return__(X)``;
    a last expression statement ``X`` becomes ``__capsule_task_result__ = (X)``.
    Only those spans change, so a traceback points at the user's lines.
    SyntaxError propagates (the caller reports it as the task's error).
    """
    source = python_source(body)
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits: list[tuple[int, int, int, int, str]] = []  # (line, col, end line, end col, new text)
    visitor = _TopLevelReturns()
    for statement in tree.body:
        visitor.visit(statement)
    for node in visitor.found:
        value = ast.get_source_segment(source, node.value) if node.value is not None else "None"
        edits.append((node.lineno, node.col_offset, node.end_lineno or node.lineno, node.end_col_offset or 0,
                      f"raise {RETURN_CLASS}(({value}))"))  # fmt: skip
    last = tree.body[-1] if tree.body else None
    if isinstance(last, ast.Expr):
        segment = ast.get_source_segment(source, last)
        edits.append((last.lineno, last.col_offset, last.end_lineno or last.lineno, last.end_col_offset or 0,
                      f"{RESULT_NAME} = ({segment})"))  # fmt: skip
    for line, col, end_line, end_col, text in sorted(edits, reverse=True):
        start = _offset(lines, line, col)
        end = _offset(lines, end_line, end_col)
        joined = "".join(lines)
        # The span's own newlines stay in `text`: every line keeps its number.
        lines = (joined[:start] + text + joined[end:]).splitlines(keepends=True)
    return "".join(lines)


def _offset(lines: list[str], line: int, col: int) -> int:
    """Character offset of (1-based line, UTF-8 byte column) in the joined lines."""
    before = sum(len(text) for text in lines[: line - 1])
    return before + len(lines[line - 1].encode("utf-8")[:col].decode("utf-8", "ignore"))


# Run once in every task sandbox before the body (its names are dunders: never saved, never the user's).
PRELUDE = f'''
class {RETURN_CLASS}(BaseException):
    """A top-level `return` in a task body."""
    value = None
    def __init__(self, value):
        super().__init__()
        type(self).value = value
        {RETURN_CLASS}.returned = True
{RETURN_CLASS}.returned = False
{RESULT_NAME} = None
def __capsule_text_progress__():
    """A task's output is text (its cell, its status line), never a widget: tqdm.auto picks its text bar."""
    import sys
    shell = sys.modules.pop("ipykernel.zmqshell", None)  # what tqdm.autonotebook looks for
    try:
        import tqdm.autonotebook
    except Exception:
        pass
    finally:
        if shell is not None:
            sys.modules["ipykernel.zmqshell"] = shell
__capsule_text_progress__()

def __capsule_warm__():
    """Imported now, while the sandbox waits in the pool: the emit step then costs no import."""
    import base64, json
    try:
        import cloudpickle
    except ImportError:
        pass
__capsule_warm__()

def {EMIT_NAME}(name, limit):
    import base64, json
    value = {RETURN_CLASS}.value if {RETURN_CLASS}.returned else {RESULT_NAME}
    kind = type(value)
    out = {{"type": f"{{kind.__module__}}.{{kind.__qualname__}}".removeprefix("builtins."), "repr": repr(value)[:200]}}
    try:
        text = json.dumps(value, allow_nan=False)
        if len(text) > limit:
            raise ValueError("too large for the envelope")
        out["json"] = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        pass
    try:
        import cloudpickle
        out["pickle"] = base64.b64encode(cloudpickle.dumps(value, protocol=5)).decode("ascii")
    except Exception as err:
        out["unpicklable"] = f"{{type(err).__name__}}: {{err}}"
    display({{{RESULT_MIME!r}: out}}, raw=True)
'''


def call_code(payload: str) -> str:
    """A @task call's code: unpickle (function, args, kwargs) in the task's sandbox and call it.

    ``payload`` must be base64 (the caller checks): it is pasted into the code
    as a string literal, and nothing else from the sandbox is.
    """
    assert all(c.isalnum() or c in "+/=" for c in payload)
    return (
        "import base64 as __capsule_b64__, cloudpickle as __capsule_pickle__\n"
        f"__capsule_call__ = __capsule_pickle__.loads(__capsule_b64__.b64decode('{payload}'))\n"
        f"{RESULT_NAME} = __capsule_call__[0](*__capsule_call__[1], **__capsule_call__[2])\n"
    )


def emit_code(name: str, json_limit: int) -> str:
    return f"{EMIT_NAME}({name!r}, {json_limit})"
