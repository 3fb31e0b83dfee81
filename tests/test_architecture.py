"""The shape of the package: layers import only downwards, no import cycle, no file over 450
lines, and no type checks on kinds of module sets outside the module forward."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cnnsplit_jax"

#: packages / top-level modules of cnnsplit_jax, bottom (0) to top; a module may import from
#: a lower layer or from its own package, never from a higher layer or a sibling of its layer
LAYERS = {"progress": 0, "mesh": 0, "distributed": 0, "models": 1, "data": 1, "checkpoint": 2, "train": 3, "modules": 3, "splitters": 4,
          "evaluate": 5, "compose": 5, "reuse": 6, "pipeline": 7, "cli": 8}


def _files():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _unit(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """Absolute names of the cnnsplit_jax modules ``path`` imports (module level or inside functions)."""
    tree = ast.parse(path.read_text())
    pkg = _module_name(path).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("cnnsplit_jax"):
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("cnnsplit_jax"))
    return out


def test_layers_import_only_downwards():
    bad = []
    for f in _files():
        unit = _unit(f)
        if unit in ("__init__", "__main__"):
            continue
        for mod in _imports(f):
            parts = mod.split(".")
            if len(parts) < 2 or parts[1] not in LAYERS:
                continue
            other = parts[1]
            if other != unit and LAYERS[other] >= LAYERS[unit]:
                bad.append(f"{f.relative_to(PKG)} imports {mod}")
    assert not bad, bad


def test_no_import_cycle_between_files():
    names = {_module_name(f): f for f in _files()}
    graph = {}
    for name, f in names.items():
        deps = set()
        for mod in _imports(f):
            while mod and mod not in names:
                mod = mod.rpartition(".")[0]
            if mod and mod != name and not name.startswith(mod + "."):  # a package importing its own parts
                deps.add(mod)
        graph[name] = deps
    state, cycle = {}, []

    def visit(n, stack):
        state[n] = 1
        for d in graph[n]:
            if state.get(d) == 1:
                cycle.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])
    assert not cycle, cycle


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PKG)))
def test_no_file_over_450_lines(path):
    assert len(path.read_text().splitlines()) <= 450


def test_kinds_are_not_told_apart_by_type_checks():
    kinds = ("ModuleSet", "ConcernModuleSet", "MaskedGroup", "ExtractedGroup", "ConcernGroup", "ResNet")
    found = []
    for f in _files():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                if any(k in ast.unparse(node) for k in kinds):
                    found.append(f"{f.relative_to(PKG)}: {ast.unparse(node)}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "hasattr":
                if "nodes" in ast.unparse(node):
                    found.append(f"{f.relative_to(PKG)}: {ast.unparse(node)}")
    assert not found, found


def _functions():
    for f in _files():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f, node


def test_no_function_over_80_lines():
    long = [f"{f.relative_to(PKG)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for f, n in _functions() if n.end_lineno - n.lineno + 1 > 80]
    assert not long, long


def test_models_are_asked_through_the_protocol_not_probed():
    """``models.protocol.require`` / ``has`` answer what a model can do; no code probes a
    model's attributes to guess its family (``adapted``, ``blocks``, ``calls``, ``mask_kind``)."""
    probes = ("adapted", "blocks", "calls", "mask_kind", "nodes")
    found = []
    for f in _files():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr") \
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in probes:
                found.append(f"{f.relative_to(PKG)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found


def test_no_method_is_told_apart_by_its_name_outside_the_registry():
    """A method is known by name only in ``splitters/registry.py``: no comparison (``==``,
    ``!=``, ``in``) with a method name anywhere else in the package."""
    from cnnsplit_jax.splitters import METHODS

    names, found = set(METHODS), []
    for f in _files():
        if f.relative_to(PKG).as_posix() == "splitters/registry.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                consts += [e for c in node.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set))
                           for e in c.elts if isinstance(e, ast.Constant)]
                if any(c.value in names for c in consts):
                    found.append(f"{f.relative_to(PKG)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found
