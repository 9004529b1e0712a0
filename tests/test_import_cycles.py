"""No import cycle inside the poolsvc package.

Every module under ``poolsvc/`` is parsed (never imported); its imports are
resolved to modules of the package (relative imports against the module's own
package; ``from pkg import name`` names the submodule ``pkg.name`` when there
is one, else the module ``pkg``), and the graph of those edges must have no
cycle.

Counted: every import outside a function body, including those under
``if TYPE_CHECKING:`` (a cycle of type-only imports still ties two modules'
designs together).  Not counted: imports inside a function or method body.
Those run when the function is first called, after every module-level import
of both modules has completed, so they cannot create the partially-initialised
module an import cycle produces; the package uses them to keep ``import
poolsvc`` and the command-line entry points cheap (loading a module only when
its feature is used).
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "poolsvc"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


class _Imports(ast.NodeVisitor):
    """The import statements of a module outside function bodies."""

    def __init__(self) -> None:
        self.found: list[ast.Import | ast.ImportFrom] = []

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        pass  # imports inside functions are not counted (see the module doc)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Lambda(self, node: ast.Lambda) -> None:
        pass

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append(node)


def edges(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports outside function bodies."""
    tree = ast.parse(path.read_text(), str(path))
    visitor = _Imports()
    visitor.visit(tree)
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in visitor.found:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = []
            for alias in node.names:
                sub = f"{prefix}.{alias.name}"
                targets.append(sub if sub in known else prefix)
        for target in targets:
            # ``import a.b.c`` depends on a.b.c (and its parents, which every module shares)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def package_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph = {name: edges(name, path, known) for name, path in mods.items()}
    # a package's own __init__ is imported before any of its modules: not an edge of theirs
    return {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_the_package():
    graph = package_graph()
    assert "poolsvc.tee.driver" in graph["poolsvc.system"]
    assert "poolsvc.tee.msg" in graph["poolsvc.tee.secure"]
    assert "poolsvc.tee.driver" not in graph["poolsvc.tee.secure"]


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_relative_imports_resolve(tmp_path):
    pkg = tmp_path / "poolsvc"
    (pkg / "sub").mkdir(parents=True)
    mod = pkg / "sub" / "m.py"
    mod.write_text("from .. import errors\nfrom ..tee.msg import x\nfrom . import other\n"
                   "def f():\n    from .. import late\n")
    known = {"poolsvc.errors", "poolsvc.tee.msg", "poolsvc.sub.other", "poolsvc.late", "poolsvc.sub.m"}
    # the import inside f() is not counted
    assert edges("poolsvc.sub.m", mod, known) == {"poolsvc.errors", "poolsvc.tee.msg", "poolsvc.sub.other"}
