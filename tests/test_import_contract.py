"""The import contract (issue 13): the kernel side never imports what unpickles or runs inside a sandbox.

Read from the source with ast (every import, also those inside functions),
so it holds for code paths no test happens to run. Fails, for one, when
sandbox/wasm.py imported a constant from wasm_host (which imports the
unpickling snapshot module): checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "capsule_kernel"

# Modules that run inside a sandbox or unpickle what a sandbox made.
INSIDE = {
    "capsule_kernel.checkpoint.snapshot",
    "capsule_kernel.sandbox.worker",
    "capsule_kernel.sandbox.worker_io",
    "capsule_kernel.sandbox.worker_shell",
    "capsule_kernel.sandbox.worker_requests",
    "capsule_kernel.sandbox.worker_snapshots",
    "capsule_kernel.sandbox.worker_chunks",
    "capsule_kernel.sandbox.worker_supervisor",
    "capsule_kernel.sandbox.wasm_guest",
    "capsule_kernel.sandbox.wasm_host",  # a process of its own: it handles the guest's pickles as bytes
    "capsule_kernel.tasks",  # the notebook's side of tasks: it loads task results
    "capsule_kernel.sandbox.inside",
    "capsule_kernel.sandbox.inside.stops",
    "capsule_kernel.sandbox.inside.streams",
    "capsule_kernel.sandbox.inside.requests",
    "capsule_kernel.sandbox.inside.ledger",
}
# The kernel process's modules: the protocol face and everything it imports.
KERNEL_SIDE = {"capsule_kernel.kernel", "capsule_kernel.__main__", "capsule_kernel.cli"}


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


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "wasm_shims" not in p.parts}


def graph(*, top_level_only: bool) -> dict[str, set[str]]:
    return {
        name: {dep for dep in imports(path, top_level_only=top_level_only) if dep in MODULES and dep != name}
        for name, path in MODULES.items()
    }


def reachable(start: set[str], edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += edges.get(name, set())
    return seen


def test_the_kernel_side_never_imports_the_inside():
    edges = graph(top_level_only=False)
    kernel_side = reachable(KERNEL_SIDE, edges)
    crossing = {(name, dep) for name in kernel_side for dep in edges[name] if dep in INSIDE and name not in INSIDE}
    assert not crossing, f"kernel-side modules import sandbox-side ones: {sorted(crossing)}"
    assert "capsule_kernel.session.controller" in kernel_side  # the walk does reach the session


def test_no_import_cycles():
    edges = graph(top_level_only=True)
    for start in edges:
        stack = [(start, [start])]
        while stack:
            name, path = stack.pop()
            for dep in edges[name]:
                assert dep != start, f"import cycle: {' -> '.join([*path, dep])}"
                if dep not in path and len(path) < 12:
                    stack.append((dep, [*path, dep]))


# What the Wasm guest imports as it is (wasm_host.guest_library ships these files): the
# standard library only, or other files that are shipped too.
SHIPPED = {
    "capsule_kernel.sandbox.frames",
    "capsule_kernel.sandbox.limits",
    *(name for name in MODULES if name.startswith("capsule_kernel.sandbox.inside")),
}


def test_what_the_guest_shares_is_stdlib_only():
    """frames.py, limits.py and sandbox/inside/ run in the Wasm guest too: stdlib (and each other) only."""
    import sys

    assert "capsule_kernel.sandbox.inside.streams" in SHIPPED
    for module in sorted(SHIPPED):
        tree = ast.parse(MODULES[module].read_text())
        for node in tree.body:  # top level: a function-level import runs only on the kernel side (limits.py)
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                ok = name.split(".")[0] in sys.stdlib_module_names or name == "__future__" or name in SHIPPED
                assert ok, f"{module} imports {name}"


def test_the_guest_library_ships_what_the_guest_imports(tmp_path):
    """Every shared module is in the guest's library, so the guest never carries a copy of its own."""
    from capsule_kernel.sandbox.wasm_host import guest_library

    library = guest_library(tmp_path)
    for module in SHIPPED:
        shipped = library / MODULES[module].relative_to(PACKAGE.parent)
        assert shipped.read_bytes() == MODULES[module].read_bytes(), module
