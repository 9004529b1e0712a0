"""poolsvc/_core.pyi against the compiled module it describes (and the pure twin's names).

Every public name of ``poolsvc._core`` is in the stub and every name of the
stub is in the module; the same for each class's public members.  Where
Cython's ``embedsignature`` gives a signature (the first docstring line of a
function, method or class), the stub's parameter names, order and defaults
match it.  The module is imported directly: these checks run whichever
backend the suite selects, and skip only when the extension is not built.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import re
import types
from pathlib import Path

import pytest

import poolsvc
from poolsvc import _pure, errors

STUB = Path(poolsvc.__file__).with_name("_core.pyi")
#: Dunder members that are part of a class's interface (the rest are object's machinery).
INTERFACE_DUNDERS = {"__len__", "__contains__", "__iter__", "__getitem__", "__enter__", "__exit__"}
#: The compiled allocators' shared bitmap; the pure twins keep their own structures.
COMPILED_ONLY = {"FreeMap"}


@pytest.fixture(scope="module")
def core() -> types.ModuleType:
    try:
        return importlib.import_module("poolsvc._core")
    except ImportError as exc:  # pragma: no cover - depends on the build
        pytest.skip(f"compiled core not built: {exc}")


@pytest.fixture(scope="module")
def stub() -> ast.Module:
    return ast.parse(STUB.read_text())


def public(name: str) -> bool:
    return not name.startswith("_")


def stub_names(tree: ast.Module) -> dict[str, ast.AST]:
    names: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and public(node.name):
            names[node.name] = node
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.asname and public(alias.asname):
                    names[alias.asname] = node
    return names


def module_names(module: types.ModuleType) -> set[str]:
    return {n for n in dir(module) if public(n) and not isinstance(getattr(module, n), types.ModuleType)}


def class_members(node: ast.ClassDef) -> dict[str, ast.AST]:
    members: dict[str, ast.AST] = {}
    for item in node.body:
        if isinstance(item, ast.FunctionDef):
            members.setdefault(item.name, item)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            members[item.target.id] = item
    return members


def runtime_members(cls: type) -> set[str]:
    return {n for n in vars(cls) if public(n) or n in INTERFACE_DUNDERS}


def embedded_params(doc: str | None, name: str) -> list[tuple[str, object]] | None:
    """(name, default) pairs of ``name(...)`` on the docstring's first line, without ``self``."""
    first = (doc or "").splitlines()[0] if doc else ""
    match = re.fullmatch(rf"(?:\w+\.)?{re.escape(name)}\((.*)\)(?:\s*->.*)?", first.strip())
    if not match:
        return None
    params: list[tuple[str, object]] = []
    for part in filter(None, (p.strip() for p in match.group(1).split(","))):
        declared, _, default = part.partition("=")
        pname = declared.split()[-1]  # "FrameTable table" -> "table"
        if pname == "self":
            continue
        params.append((pname, ast.literal_eval(default.strip()) if default else inspect.Parameter.empty))
    return params


def stub_params(fn: ast.FunctionDef) -> list[tuple[str, object]]:
    args = fn.args.args
    defaults = [inspect.Parameter.empty] * (len(args) - len(fn.args.defaults)) + [
        ast.literal_eval(d) for d in fn.args.defaults]
    pairs = [(a.arg, d) for a, d in zip(args, defaults, strict=True)]
    return [p for p in pairs if p[0] != "self"]


def test_module_names_match_the_stub(core, stub):
    assert module_names(core) == set(stub_names(stub))


def test_pure_twin_offers_the_stub_names(stub):
    kernels = {n for n, node in stub_names(stub).items() if not isinstance(node, ast.ImportFrom)} - COMPILED_ONLY
    assert kernels <= module_names(_pure), kernels - module_names(_pure)


def test_reexported_errors_are_the_errors_module_classes(core, stub):
    for name, node in stub_names(stub).items():
        if isinstance(node, ast.ImportFrom):
            assert getattr(core, name) is getattr(errors, name)


def test_class_members_match_the_stub(core, stub):
    for name, node in stub_names(stub).items():
        if not isinstance(node, ast.ClassDef):
            continue
        stubbed = set(class_members(node)) - {"__init__"}
        assert runtime_members(getattr(core, name)) - {"__init__"} == stubbed, name


def test_signatures_match_embedsignature(core, stub):
    checked = 0
    for name, node in stub_names(stub).items():
        obj = getattr(core, name)
        if isinstance(node, ast.FunctionDef):
            expected = embedded_params(obj.__doc__, name)
            assert expected is not None, f"{name} has no embedded signature"
            assert stub_params(node) == expected, name
            checked += 1
        elif isinstance(node, ast.ClassDef):
            members = class_members(node)
            ctor = embedded_params(obj.__doc__, name)
            if ctor is not None:
                init = members.get("__init__")
                assert ctor == (stub_params(init) if isinstance(init, ast.FunctionDef) else []), name
                checked += 1
            for mname, mnode in members.items():
                value = vars(obj).get(mname)
                if not isinstance(mnode, ast.FunctionDef) or not callable(value) or mname.startswith("__"):
                    continue
                expected = embedded_params(value.__doc__, mname)
                assert expected is not None, f"{name}.{mname} has no embedded signature"
                assert stub_params(mnode) == expected, f"{name}.{mname}"
                checked += 1
    assert checked > 50  # the stub's functions, methods and constructors were all compared
