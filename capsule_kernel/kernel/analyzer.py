"""The execution-mode analyzer: what a cell is, before anything runs it.

Works on the cell after IPython's input transformations (so ``%magic`` and
``!shell`` become the calls IPython would make) and reads the AST only: the
kernel process never executes user code. The plan says how the cell must be
run (plain, top-level await, or defining coroutines), which names it reads,
writes and deletes, what it imports, which calls may block, and whether it
uses magics or the shell. Routing (router.py) decides from it; checkpoints
will use the names it writes and the values it may mutate.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from IPython.core.inputtransformer2 import TransformerManager

from capsule_kernel.protocol.peeks import OPAQUE_NAMES, PEEK_ATTRIBUTES, PEEK_CALLS, PEEK_METHODS

ExecutionMode = Literal["sync", "top-level-await", "async-def"]

_BUILTINS = frozenset(dir(builtins))

# Calls that can block the cell for a long or unbounded time, by category.
_BLOCKING = {
    "time.sleep": "sleep",
    "input": "input",
    "getpass.getpass": "input",
    "open": "file",
    "io.open": "file",
    "os.system": "subprocess",
    "os.popen": "subprocess",
    "os.wait": "subprocess",
    "os.waitpid": "subprocess",
    "shutil.copyfile": "file",
    "shutil.copytree": "file",
    "shutil.rmtree": "file",
}
_BLOCKING_PREFIXES = {
    "subprocess.": "subprocess",
    "socket.": "network",
    "requests.": "network",
    "httpx.": "network",
    "urllib.request.": "network",
    "http.client.": "network",
    "ftplib.": "network",
    "smtplib.": "network",
}
_MUTATING_METHODS = frozenset(
    {
        "append",
        "extend",
        "insert",
        "remove",
        "pop",
        "clear",
        "sort",
        "reverse",
        "update",
        "add",
        "discard",
        "setdefault",
        "popitem",
        "difference_update",
        "intersection_update",
        "symmetric_difference_update",
        "fill",
        "resize",
        "put",
        "write",
        "set",
        "drop",
    }
)
_MAGIC_METHODS = {"run_line_magic": "line", "run_cell_magic": "cell"}
_SHELL_METHODS = frozenset({"system", "getoutput"})


@dataclass(frozen=True)
class ExecutionPlan:
    """What the analyzer found in one cell."""

    source_hash: str
    mode: ExecutionMode = "sync"
    reads: frozenset[str] = frozenset()
    writes: frozenset[str] = frozenset()
    deletes: frozenset[str] = frozenset()
    mutates: frozenset[str] = frozenset()
    imports: frozenset[str] = frozenset()
    blocking_calls: tuple[str, ...] = ()
    magics: tuple[str, ...] = ()
    uses_shell: bool = False
    # Names the cell only looks at in ways that cannot change them or hand out
    # a piece of them (len(x), x.shape, x.sum(), x[i:j].mean()): with a plain
    # value (the worker checks its type) a checkpoint need not hash them again.
    peeks: frozenset[str] = frozenset()
    # The cell reaches the namespace by means no name shows (globals(), exec,
    # eval, a %magic or !shell through get_ipython()): any name may change.
    opaque: bool = False
    syntax_error: str | None = None
    # The cell as IPython would run it, when that differs from the source
    # (magics, !shell, help?): what a sandbox without IPython is given.
    transformed: str | None = None

    @property
    def uses_magics(self) -> bool:
        return bool(self.magics)

    def summary(self) -> dict[str, object]:
        """JSON-friendly view for metadata and %capsule status."""
        return {
            "mode": self.mode,
            "reads": sorted(self.reads),
            "writes": sorted(self.writes),
            "deletes": sorted(self.deletes),
            "imports": sorted(self.imports),
            "blocking_calls": list(self.blocking_calls),
            "magics": list(self.magics),
            "uses_shell": self.uses_shell,
            "syntax_error": self.syntax_error,
        }


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


class _Scope:
    def __init__(self, params: set[str] | None = None) -> None:
        self.bound: set[str] = set(params or ())
        self.globals: set[str] = set()


class _Visitor(ast.NodeVisitor):
    """One pass over the module; nested scopes only contribute free reads."""

    def __init__(self) -> None:
        self.reads: set[str] = set()
        self.writes: set[str] = set()
        self.deletes: set[str] = set()
        self.mutates: set[str] = set()
        self.imports: set[str] = set()
        self.aliases: dict[str, str] = {}
        self.blocking: list[str] = []
        self.magics: list[str] = []
        self.uses_shell = False
        self.top_level_await = False
        self.defines_async = False
        self.scopes: list[_Scope] = []

    # -- names --------------------------------------------------------------
    @property
    def at_module(self) -> bool:
        return not self.scopes

    def _bind(self, name: str) -> None:
        if self.at_module:
            self.writes.add(name)
            self.deletes.discard(name)
        elif name in self.scopes[-1].globals:
            self.writes.add(name)
        else:
            self.scopes[-1].bound.add(name)

    def _load(self, name: str) -> None:
        if self.at_module:
            if name not in self.writes:
                self.reads.add(name)
            return
        if any(name in scope.bound for scope in self.scopes):
            return
        if name not in self.writes:
            self.reads.add(name)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Store):
            self._bind(node.id)
        elif isinstance(node.ctx, ast.Del):
            if self.at_module:
                self.deletes.add(node.id)
                self.writes.discard(node.id)
        else:
            self._load(node.id)

    def visit_Global(self, node: ast.Global) -> None:
        if self.scopes:
            self.scopes[-1].globals.update(node.names)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.imports.add(alias.name.split(".")[0])
            bound = alias.asname or alias.name.split(".")[0]
            self.aliases[bound] = alias.name if alias.asname else alias.name.split(".")[0]
            self._bind(bound)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self.imports.add(node.module.split(".")[0])
        for alias in node.names:
            if alias.name == "*":
                continue
            bound = alias.asname or alias.name
            if node.module and node.level == 0:
                self.aliases[bound] = f"{node.module}.{alias.name}"
            self._bind(bound)

    # -- scopes -------------------------------------------------------------
    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        for decorator in getattr(node, "decorator_list", []):
            self.visit(decorator)
        args = node.args
        for default in [*args.defaults, *[d for d in args.kw_defaults if d is not None]]:
            self.visit(default)
        if not isinstance(node, ast.Lambda):
            self._bind(node.name)
        params = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
        params.update(a.arg for a in (args.vararg, args.kwarg) if a is not None)
        self.scopes.append(_Scope(params))
        body = node.body if isinstance(node.body, list) else [node.body]
        # Bind every local first, so a read before a later assignment is local.
        for statement in body:
            for child in ast.walk(statement):
                if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                    self.scopes[-1].bound.add(child.id)
                elif isinstance(child, ast.Global):
                    self.scopes[-1].globals.update(child.names)
        self.scopes[-1].bound -= self.scopes[-1].globals
        for statement in body:
            self.visit(statement)
        self.scopes.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._visit_function(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self.defines_async = True
        self._visit_function(node)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._visit_function(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for child in [*node.decorator_list, *node.bases, *node.keywords]:
            self.visit(child)
        self._bind(node.name)
        self.scopes.append(_Scope())
        for statement in node.body:
            self.visit(statement)
        self.scopes.pop()

    def _visit_comprehension(self, node: ast.AST) -> None:
        generators = node.generators  # type: ignore[attr-defined]
        self.visit(generators[0].iter)
        self.scopes.append(_Scope())
        for index, generator in enumerate(generators):
            if index:
                self.visit(generator.iter)
            self.visit(generator.target)
            for condition in generator.ifs:
                self.visit(condition)
        for name in ("elt", "key", "value"):
            if hasattr(node, name):
                self.visit(getattr(node, name))
        self.scopes.pop()

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _visit_comprehension

    # -- await --------------------------------------------------------------
    def visit_Await(self, node: ast.Await) -> None:
        if self.at_module:
            self.top_level_await = True
        self.generic_visit(node)

    def visit_AsyncFor(self, node: ast.AsyncFor) -> None:
        if self.at_module:
            self.top_level_await = True
        self.generic_visit(node)

    def visit_AsyncWith(self, node: ast.AsyncWith) -> None:
        if self.at_module:
            self.top_level_await = True
        self.generic_visit(node)

    # -- calls and mutation -------------------------------------------------
    def _resolve(self, dotted: str) -> str:
        head, _, rest = dotted.partition(".")
        full = self.aliases.get(head, head)
        return f"{full}.{rest}" if rest else full

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Call)
            and isinstance(func.value.func, ast.Name)
            and func.value.func.id == "get_ipython"
        ):
            if func.attr in _MAGIC_METHODS and node.args and isinstance(node.args[0], ast.Constant):
                prefix = "%" if _MAGIC_METHODS[func.attr] == "line" else "%%"
                self.magics.append(prefix + str(node.args[0].value))
            elif func.attr in _SHELL_METHODS:
                self.uses_shell = True
        dotted = _dotted(func)
        if dotted:
            resolved = self._resolve(dotted)
            category = _BLOCKING.get(resolved)
            if category is None:
                category = next((c for p, c in _BLOCKING_PREFIXES.items() if resolved.startswith(p)), None)
            if category is not None and (dotted.split(".")[0] not in _BUILTINS or dotted in _BLOCKING):
                self.blocking.append(f"{resolved} ({category})")
        if isinstance(func, ast.Attribute) and func.attr in _MUTATING_METHODS:
            root = _root_name(func.value)
            if root:
                self.mutates.add(root)
        self.generic_visit(node)

    def _note_target_mutation(self, target: ast.AST) -> None:
        if isinstance(target, (ast.Attribute, ast.Subscript)):
            root = _root_name(target)
            if root:
                self.mutates.add(root)
                self._load(root)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                self._note_target_mutation(element)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for target in node.targets:
            self._note_target_mutation(target)
            self.visit(target)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.visit(node.value)
        self._note_target_mutation(node.target)
        if isinstance(node.target, ast.Name):
            self._load(node.target.id)
        self.visit(node.target)


class Analyzer:
    """Plans cells, remembering recent plans by source hash."""

    def __init__(self, cache_size: int = 512) -> None:
        self._transformer = TransformerManager()
        self._cache: OrderedDict[str, ExecutionPlan] = OrderedDict()
        self._cache_size = cache_size

    def plan(self, code: str) -> ExecutionPlan:
        digest = hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest()
        cached = self._cache.get(digest)
        if cached is not None:
            self._cache.move_to_end(digest)
            return cached
        plan = self._analyze(code, digest)
        self._cache[digest] = plan
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return plan

    def _analyze(self, code: str, digest: str) -> ExecutionPlan:
        flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        transformed = None
        try:
            # Plain Python parses as is: IPython's transforms only change cells
            # that do not (magics, !shell, help?, prompts, leading indentation),
            # and they cost more than the parse itself.
            tree = compile(code, "<cell>", "exec", flags=flags)
        except (SyntaxError, ValueError):
            try:
                source = self._transformer.transform_cell(code)
            except Exception as err:  # noqa: BLE001 - IPython reports it properly when the cell runs
                return ExecutionPlan(digest, syntax_error=f"{type(err).__name__}: {err}")
            try:
                tree = compile(source, "<cell>", "exec", flags=flags)
                transformed = source
            except (SyntaxError, ValueError) as err:
                where = f" (line {err.lineno})" if isinstance(err, SyntaxError) else ""
                return ExecutionPlan(digest, syntax_error=f"{type(err).__name__}: {getattr(err, 'msg', err)}{where}")
        visitor = _Visitor()
        visitor.visit(tree)
        peeks, opaque = _peeks(tree)
        if visitor.top_level_await:
            mode: ExecutionMode = "top-level-await"
        elif visitor.defines_async:
            mode = "async-def"
        else:
            mode = "sync"
        reads = {name for name in visitor.reads if name not in _BUILTINS or name in visitor.writes}
        reads.discard("get_ipython")
        return ExecutionPlan(
            source_hash=digest,
            mode=mode,
            reads=frozenset(reads),
            writes=frozenset(visitor.writes),
            deletes=frozenset(visitor.deletes),
            mutates=frozenset(visitor.mutates - visitor.writes),
            imports=frozenset(visitor.imports),
            blocking_calls=tuple(dict.fromkeys(visitor.blocking)),
            magics=tuple(dict.fromkeys(visitor.magics)),
            uses_shell=visitor.uses_shell,
            peeks=frozenset(peeks - visitor.writes - visitor.mutates - visitor.deletes),
            opaque=opaque,
            transformed=transformed,
        )


def _peeks(tree: ast.AST) -> tuple[set[str], bool]:
    """(names every load of which is a peek, whether the cell is opaque); see ExecutionPlan.

    A table, not a proof: a peek of a value whose type is not plain (the
    worker's check) is looked at as any read.
    """
    parent: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parent[child] = node
    peeks: set[str] = set()
    others: set[str] = set()
    opaque = False
    for node in ast.walk(tree):
        if not isinstance(node, ast.Name) or not isinstance(node.ctx, ast.Load):
            continue
        if node.id in OPAQUE_NAMES:
            opaque = True
        (peeks if _is_peek(node, parent) else others).add(node.id)
    return peeks - others, opaque


def _is_peek(name: ast.Name, parent: dict[ast.AST, ast.AST]) -> bool:
    above = parent.get(name)
    if isinstance(above, ast.Call):
        return isinstance(above.func, ast.Name) and above.func.id in PEEK_CALLS and name in above.args
    if isinstance(above, ast.Subscript) and above.value is name and isinstance(above.ctx, ast.Load):
        name, above = above, parent.get(above)  # x[i:j].mean(): only through a method below
        if not (isinstance(above, ast.Attribute) and above.attr in PEEK_METHODS):
            return False
    if not (isinstance(above, ast.Attribute) and above.value is name and isinstance(above.ctx, ast.Load)):
        return False
    if above.attr in PEEK_ATTRIBUTES and not isinstance(parent.get(above), ast.Call):
        return True
    call = parent.get(above)
    return above.attr in PEEK_METHODS and isinstance(call, ast.Call) and call.func is above
