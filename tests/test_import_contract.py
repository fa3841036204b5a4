"""The import contract (issues 13 and 26): a module's folder says its process and trust, and imports keep to it.

Read from the source with ast (every import, also those inside functions and
under TYPE_CHECKING), so it holds for code paths no test happens to run.
Fails, for one, when wasm_host/host.py imported inside/snapshot.py for a helper
(write_entry), or protocol/limits.py imported the kernel's store: checked.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "capsule_kernel"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("capsule_kernel")}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "shims" not in p.parts}


def graph(*, top_level_only: bool = False) -> dict[str, set[str]]:
    """Module -> the Capsule modules it imports (a package's own __init__ is not an edge)."""
    return {
        name: {
            dep
            for dep in imports(path, top_level_only=top_level_only)
            if dep in MODULES and dep != name and not name.startswith(dep + ".")
        }
        for name, path in MODULES.items()
    }


def folder(module: str) -> str:
    """The process and trust level a module runs at: its first folder under capsule_kernel."""
    path = MODULES[module].relative_to(PACKAGE)
    return path.parts[0] if len(path.parts) > 1 else "root"


# What each folder may import, by folder. root holds __init__ (the version), __main__ (the
# kernel's entry) and tasks.py (the public alias of inside/tasks.py, imported in the sandbox).
MAY_IMPORT = {
    "protocol": {"protocol"},
    "inside": {"inside", "protocol", "root"},
    "kernel": {"kernel", "protocol", "keeper", "wasm_host", "root"},
    "wasm_host": {"wasm_host", "protocol"},
    "keeper": set(),
    "client": {"client", "kernel", "protocol", "root"},
    "root": {"kernel", "inside", "root"},
}
# The kernel imports these of wasm_host/: which python.wasm, and where its cache is (no guest bytes).
KERNEL_MAY_IMPORT_FROM_WASM_HOST = {"capsule_kernel.wasm_host", "capsule_kernel.wasm_host.runtime"}
# The keeper is started by path (python -I -S keeper.py); the kernel imports it only to find that path.
KERNEL_MAY_IMPORT_FROM_KEEPER = {"capsule_kernel.keeper", "capsule_kernel.keeper.keeper"}


def test_every_module_lives_in_a_folder_that_names_its_process():
    loose = {name for name in MODULES if folder(name) == "root"}
    assert loose == {"capsule_kernel", "capsule_kernel.__main__", "capsule_kernel.tasks"}, sorted(loose)
    for name in ("protocol", "inside", "kernel", "wasm_host", "keeper", "client"):
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc, f"{name}/__init__.py says which process it runs in and what it may trust"


def test_each_folder_imports_only_what_its_trust_allows():
    edges = graph()
    wrong = sorted(
        (name, dep) for name, deps in edges.items() for dep in deps if folder(dep) not in MAY_IMPORT[folder(name)]
    )
    assert not wrong, f"imports across the trust map: {wrong}"
    kernel = {name for name in MODULES if folder(name) == "kernel"}
    reached = {dep for name in kernel for dep in edges[name]}
    assert not {d for d in reached if folder(d) == "wasm_host"} - KERNEL_MAY_IMPORT_FROM_WASM_HOST
    assert not {d for d in reached if folder(d) == "keeper"} - KERNEL_MAY_IMPORT_FROM_KEEPER
    root = {"capsule_kernel.__main__": "kernel", "capsule_kernel.tasks": "inside"}
    for name, side in root.items():
        assert {folder(d) for d in edges[name]} <= {side, "root"}, name


def reachable(start: set[str], edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += edges.get(name, set())
    return seen


def test_the_kernel_and_the_client_never_reach_the_inside():
    """Through any chain of imports: the kernel side never loads code that unpickles what a sandbox made."""
    edges = graph()
    start = {"capsule_kernel.__main__"} | {n for n in MODULES if folder(n) in {"kernel", "client", "wasm_host"}}
    crossing = sorted(n for n in reachable(start, edges) if folder(n) == "inside" or n == "capsule_kernel.tasks")
    assert not crossing, f"the kernel side reaches the inside: {crossing}"
    assert "capsule_kernel.kernel.session.controller" in reachable({"capsule_kernel.__main__"}, edges)


def test_no_import_cycles():
    """No cycles anywhere: counting imports inside functions and under TYPE_CHECKING too."""
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(name: str) -> None:  # Tarjan's strongly connected components
        index[name] = low[name] = len(index)
        stack.append(name)
        for dep in edges[name]:
            if dep not in index:
                visit(dep)
                low[name] = min(low[name], low[dep])
            elif dep in stack:
                low[name] = min(low[name], index[dep])
        if low[name] == index[name]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == name:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in edges:
        if name not in index:
            visit(name)
    assert not cycles, f"import cycles: {cycles}"


# What the Wasm guest imports as it is (wasm_host.library.guest_library ships these files).
SHIPPED = {
    name
    for name in MODULES
    if folder(name) == "protocol"
    or name.startswith("capsule_kernel.inside.wasm_guest")
    or MODULES[name].parent == PACKAGE / "inside"
} | {"capsule_kernel", "capsule_kernel.tasks"}


def test_what_the_guest_imports_is_stdlib_cloudpickle_or_shipped():
    """protocol/ and inside/ (but worker/) run in the Wasm guest too: stdlib, cloudpickle and each other only."""
    assert "capsule_kernel.inside.streams" in SHIPPED and "capsule_kernel.inside.worker.shell" not in SHIPPED
    for module in sorted(SHIPPED):
        tree = ast.parse(MODULES[module].read_text())
        for node in tree.body:  # top level: a function-level import runs only outside the guest
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                ok = top in sys.stdlib_module_names or name == "__future__" or name in SHIPPED
                ok = ok or (top == "cloudpickle" and folder(module) == "inside")
                assert ok, f"{module} imports {name}"


def test_protocol_is_stdlib_only():
    for module in (name for name in MODULES if folder(name) == "protocol"):
        for name in imports(MODULES[module]):
            assert name.startswith("capsule_kernel.protocol"), f"{module} imports {name}"


def test_the_guest_library_ships_what_the_guest_imports(tmp_path):
    """Every shared module is in the guest's library, so the guest never carries a copy of its own."""
    from capsule_kernel.wasm_host.library import guest_library

    library = guest_library(tmp_path)
    for module in SHIPPED:
        shipped = library / MODULES[module].relative_to(PACKAGE.parent)
        assert shipped.read_bytes() == MODULES[module].read_bytes(), module
    assert not (library / "capsule_kernel" / "inside" / "worker").exists()
    assert not (library / "capsule_kernel" / "kernel").exists()
